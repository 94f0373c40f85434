"""The emulator of the local stack and the test suite: moto's DynamoDB and SQS on one port, served as
`python -m moto.server` serves them (werkzeug, a thread per request, moto's request handler).

    python -m sandbox.moto_server --port 5000
"""
from __future__ import annotations

import argparse
import os
from typing import Any


def application() -> Any:
    """The WSGI application the stack serves."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True  # type: ignore[attr-defined]  # as moto.server: a bug's traceback in the answer
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))  # as moto.server: some answers name the port
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import run_simple
    run_simple(args.host, args.port, application(), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
