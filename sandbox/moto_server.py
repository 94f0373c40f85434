"""The emulator of the local stack and the test suite: moto's DynamoDB and SQS on one port, served as
`python -m moto.server` serves them (werkzeug, a thread per request, moto's request handler), except
that DynamoDB requests are applied one at a time.

DynamoDB applies the writes to one item one at a time: a conditional write's condition holds for the
item it updates ("Condition expressions",
https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Expressions.ConditionExpressions.html).
moto does not: each request runs on its own thread with no lock, so an UpdateItem can pass its
condition, another write to the same item can land, and the first then applies what it computed from
the item as it was. The queue lease relies on that atomicity: a reconciliation's `mark_dirty` that met
the worker's close that way left a deal dirty with a live lease and no message for 35 minutes (issue 13,
tests/test_emulator_atomicity.py). SQS and the other services are left as they are, so a long poll of
the queue holds up no store request.

    python -m sandbox.moto_server --port 5000
"""
from __future__ import annotations

import argparse
import os
import threading
from typing import Any


def application() -> Any:
    """The WSGI application the stack serves: moto's, with DynamoDB requests applied one at a time."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True  # type: ignore[attr-defined]  # as moto.server: a bug's traceback in the answer
    return one_dynamodb_request_at_a_time(app)


def one_dynamodb_request_at_a_time(app: Any) -> Any:
    """`app` with its DynamoDB requests (JSON protocol: `X-Amz-Target: DynamoDB_20120810.<Operation>`)
    run under one lock, answer included, so no two of them interleave; other requests run freely."""
    lock = threading.Lock()

    def serve(environ: dict, start_response: Any) -> Any:
        if not environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
            return app(environ, start_response)
        with lock:
            answer = app(environ, start_response)
            try:
                return list(answer)  # the whole answer: an item is read in one piece
            finally:
                close = getattr(answer, "close", None)
                if close is not None:
                    close()
    return serve


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
