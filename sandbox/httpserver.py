"""A small threaded HTTP server on loopback that the sandboxes (Metrika, CRMs) are built on."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    match: re.Match | None = None
    query_all: dict[str, list[str]] = field(default_factory=dict)  # repeated keys: filter[id][]=1&filter[id][]=2

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Reply]


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # http.server's default backlog of 5 resets bursts of concurrent clients


class SandboxServer:
    """Routes `(method, path regex)` to handlers; `start()` serves on 127.0.0.1 in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._routes: list[tuple[str, re.Pattern, Handler]] = []
        self._host, self._port = host, port
        self._httpd: ThreadingHTTPServer | None = None

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern + r"/?$"), handler))

    def dispatch(self, request: Request) -> Reply:
        for method, pattern, handler in self._routes:
            match = pattern.match(request.path)
            if match and method == request.method:
                request.match = match
                return handler(request)
        return Reply(404, {"errors": [{"error_type": "not_found", "message": f"no such path {request.path}"}],
                           "code": 404, "message": "Not found"})

    @property
    def url(self) -> str:
        assert self._httpd is not None, "not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "SandboxServer":
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes: with Nagle's algorithm the body waits for the
            # client's delayed ACK of the headers (40 ms on Linux) on every keep-alive request, which
            # real CRM and Metrika front ends do not add. TCP_NODELAY sends both at once.
            disable_nagle_algorithm = True

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                query_all = parse_qs(parts.query, keep_blank_values=True)
                request = Request(self.command, parts.path, {k: v[-1] for k, v in query_all.items()},
                                  {k.lower(): v for k, v in self.headers.items()}, body, query_all=query_all)
                try:
                    reply = server.dispatch(request)
                except Exception as exc:  # a sandbox bug must show, not hang the client
                    reply = Reply(500, {"code": 500, "message": f"sandbox error: {exc!r}", "errors": []})
                payload = b"" if reply.body is None else json.dumps(reply.body, ensure_ascii=False).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.headers.pop("Content-Type", "application/json; charset=utf-8"))
                self.send_header("Content-Length", str(len(payload)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

            def log_message(self, *args: Any) -> None:  # quiet: tests read state, not access logs
                pass

        self._httpd = _Server((self._host, self._port), _Handler)
        self._httpd.daemon_threads = True
        # `stop()` waits for the loop to see the shutdown: it looks every 50 ms (the default, 0.5 s, was
        # half a second at the end of every test module with a sandbox of its own)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=type(self).__name__,
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def serve_forever(self) -> None:
        """Run in the foreground until interrupted (for `python -m sandbox.…`)."""
        self.start()
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
