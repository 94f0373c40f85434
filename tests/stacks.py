"""The app on loopback HTTP, for tests that need the wire: the whole local stack (`make run`) in a child
process, or `chalice local`'s own server for the app alone in this process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sandbox.local_stack import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def local_stack(env: dict[str, str]) -> Iterator[dict]:
    """`python -m sandbox.local_stack` on a free port with this process's environment less AWS and Metrika
    settings, plus `env`. Yields {"api", "admin", "metrika", "amocrm", "bitrix24", "process", "lines",
    "banner"}: `lines` keeps growing with the stack's output (read on a thread, so a full pipe never
    blocks it); `banner` is how many lines its start-up banner took (it prints tokens)."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "METRIKA_API_URL", "ADMIN_TOKEN"))}
    process = subprocess.Popen([sys.executable, "-m", "sandbox.local_stack", "--port", str(port)], cwd=ROOT,
                               env={**environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: [lines.append(line) for line in process.stdout], daemon=True).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines) and process.poll() is None:
            time.sleep(0.1)
        output = "".join(lines)
        assert "Ctrl-C" in output, output
        info = {line.split()[0]: line.split()[-1] for line in lines if line.startswith("  ")}
        urls = {line.split()[0]: next(w for w in line.split() if w.startswith("http"))
                for line in lines if line.startswith("  ") and "http" in line}
        yield {"api": f"http://127.0.0.1:{port}", "admin": info["admin"], "metrika": urls["Metrika"],
               "amocrm": urls["amoCRM"], "bitrix24": urls["Bitrix24"], "process": process, "lines": lines,
               "banner": len(lines)}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def chalice_local(monkeypatch) -> Iterator[str]:
    """The app under `chalice local`'s own HTTP server, in this process, with the local stack's patches
    (`sandbox.local_stack.use_gateway_responses`), restored after the test. Yields its base URL."""
    import chalice.local
    from chalice.cli.factory import CLIFactory

    import app as app_module
    from sandbox.local_stack import use_gateway_responses
    handler = chalice.local.ChaliceRequestHandler
    for patched in ("_send_error_response", "_parse_payload"):
        monkeypatch.setattr(handler, patched, getattr(handler, patched))  # restored after the test
    use_gateway_responses()
    config = CLIFactory(str(ROOT)).create_config_obj(chalice_stage_name="dev")
    # Not create_local_server: it re-classes the app object for good (thread-local requests), which the
    # other tests of this process share. One request at a time needs no such thing.
    server = chalice.local.LocalDevServer(app_module.app, config, "127.0.0.1", 0)
    threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server.server_address[1]}"
    finally:
        server.shutdown()
        server.server.server_close()
