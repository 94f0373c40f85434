"""The whole service on loopback, no AWS account: DynamoDB+SQS emulator (moto_server), tables and
queues, the Metrika sandbox, amoCRM and Bitrix24 sandboxes with demo accounts, `chalice local` and the
worker loop. Ctrl-C stops everything it started.

    python -m sandbox.local_stack [--port 8000]

`METRIKA_API_URL` set in the environment replaces the Metrika sandbox as the target; `ADMIN_TOKEN`
fixes the admin token (otherwise one is generated and printed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import IO
from urllib.parse import unquote_plus

import requests

ROOT = Path(__file__).resolve().parent.parent
# Credentials the emulator accepts; never real ones (the emulator ignores them).
# `chalice local` with a listen backlog for bursts: http.server's default of 5 pending connections resets
# concurrent clients (API Gateway has no such limit, so local load tests would measure the wrong thing);
# and TCP_NODELAY, or each answer on a keep-alive connection waits 40 ms for the client's delayed ACK of
# its headers (the sandboxes' server does the same, sandbox/httpserver.py). Its own refusals (no token,
# the authorizer's Deny, no such route) answer as API Gateway does in AWS once `tools.gateway_responses`
# ran: `use_gateway_responses`.
CHALICE_LOCAL = ("import chalice.local; chalice.local.ThreadedHTTPServer.request_queue_size = 256; "
                 "chalice.local.ChaliceRequestHandler.disable_nagle_algorithm = True; "
                 "import sandbox.local_stack; sandbox.local_stack.use_gateway_responses(); "
                 "from chalice.cli import main; main()")
AMOCRM_DEMO_TOKEN = "demo-token"
# Our app as registered in the amoCRM sandbox (its "amoMarket"): installs work on the local stack with
# `python -m tools.install` (chalicelib/amocrm_install.py). A fixed, public id; the secret is made per run.
AMOCRM_DEMO_CLIENT_ID = "local-metrika-crm-bridge"
BITRIX24_DEMO_CODE = "democode"
EMULATOR_ENV = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_SESSION_TOKEN": "local",
                "AWS_DEFAULT_REGION": "eu-central-1"}


# A query parameter whose name says it holds a secret (amoCRM's `?secret=`, a token, a key, a password,
# a signature, Bitrix24's `auth`), its name URL-encoded or not: its value never reaches the terminal.
# `chalice local` writes each request's URL to its access log, and the webhook URLs carry the
# integration's secret. A value runs to the next `&` or whitespace: a webhook secret may hold any
# printable character but those (`;`, `#` and quotes included, chalicelib.integrations), and the app
# splits the query on `&` alone, so stopping anywhere earlier would print the rest of the secret.
_PARAMETER = re.compile(r"[?&;]([^=&;?#\s\"']*)=")
_VALUE_END = re.compile(r"[&\s]|$")
# `code`: an amoCRM install's authorization code (with our client secret it is worth a token pair).
_SECRET_NAME = re.compile(r"secret|token|passw|key|signature|auth|^code$", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """`text` with the values of secret-looking query parameters replaced by `[redacted]`."""
    out, position = [], 0
    for parameter in _PARAMETER.finditer(text):
        if parameter.start() < position or not _SECRET_NAME.search(unquote_plus(parameter.group(1))):
            continue  # inside a value already redacted, or not a secret's name
        end = _VALUE_END.search(text, parameter.end()).start()
        out += [text[position:parameter.end()], "[redacted]"]
        position = end
    return "".join(out) + text[position:]


def echo_redacted(source: IO[str], sink: IO[str]) -> None:
    """Copy a child's output line by line, secrets redacted, until it closes (the child exited)."""
    for line in source:
        sink.write(redact_secrets(line))
        sink.flush()


def start_echoed(command: list[str], **kwargs) -> subprocess.Popen:
    """A child whose stdout and stderr reach our stdout through `redact_secrets`."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               errors="replace", **kwargs)
    threading.Thread(target=echo_redacted, args=(process.stdout, sys.stdout), daemon=True).start()
    return process


def gateway_answer(error: Exception) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, body) API Gateway gives in AWS, with the Gateway Responses `tools.gateway_responses`
    sets, for a request `chalice local` refuses itself (its own bodies are `{"message"}` and `{"Message"}`):
    no bearer token (401 UNAUTHORIZED), the authorizer's Deny (403 ACCESS_DENIED), no such route or method
    (API Gateway's 403 "Missing Authentication Token" or, with a bearer header, its
    IncompleteSignatureException: MISSING_AUTHENTICATION_TOKEN, our 404), an authorizer that failed (500).
    None for anything else."""
    from chalice.local import ForbiddenError, InvalidAuthorizerError, NotAuthorizedError
    from tools.gateway_responses import CONTENT_TYPE, RESPONSES
    if isinstance(error, NotAuthorizedError):
        response_type = "UNAUTHORIZED"
    elif isinstance(error, ForbiddenError):
        denied = (error.headers or {}).get("x-amzn-ErrorType") == "AccessDeniedException"
        response_type = "ACCESS_DENIED" if denied else "MISSING_AUTHENTICATION_TOKEN"
    elif isinstance(error, InvalidAuthorizerError):
        response_type = "AUTHORIZER_FAILURE"
    else:
        return None
    status, name, message, parameters = RESPONSES[response_type]
    headers = {key.removeprefix("gatewayresponse.header."): value.strip("'")
               for key, value in {**CONTENT_TYPE, **parameters}.items()}
    body = {"error": name, "message": json.loads(message),
            "request_id": str((error.headers or {}).get("x-amzn-RequestId", ""))}
    return int(status), headers, json.dumps(body).encode()


def use_gateway_responses() -> None:
    """Make `chalice local`'s own refusals `gateway_answer`'s, and its bodies whole however they were framed
    (`parse_payload`), so the local stack answers as AWS does."""
    import chalice.local
    chalice_answer = chalice.local.ChaliceRequestHandler._send_error_response

    def send_error_response(handler, error):
        answer = gateway_answer(error)
        if answer is None:
            return chalice_answer(handler, error)
        return handler._send_http_response(*answer)

    chalice.local.ChaliceRequestHandler._send_error_response = send_error_response
    chalice.local.ChaliceRequestHandler._parse_payload = parse_payload


# API Gateway's payload quota ("Quotas for configuring and running a REST API in API Gateway",
# https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-execution-service-limits-table.html).
GATEWAY_MAX_BODY = 10 * 1024 * 1024


def parse_payload(handler) -> tuple[dict, bytes | None]:
    """`chalice local` reads `Content-Length` bytes, so a chunked body (no Content-Length) reached the app
    empty. API Gateway hands Lambda the whole body however it was framed: so does this, reading at most
    GATEWAY_MAX_BODY + 1 bytes (the app's own limit then answers 413) and closing the connection after a
    body it did not read to its end."""
    if "chunked" not in handler.headers.get("transfer-encoding", "").lower():
        length = int(handler.headers.get("content-length", "0"))
        return dict(handler.headers), handler.rfile.read(length) if length > 0 else None
    body, complete = bytearray(), False
    while len(body) <= GATEWAY_MAX_BODY:
        size_line = handler.rfile.readline(1026)
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            break  # not chunked framing: what was read so far goes on, the connection does not
        if size == 0:
            while handler.rfile.readline(1026) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            complete = True
            break
        body += handler.rfile.read(min(size, GATEWAY_MAX_BODY + 1 - len(body)))
        if len(body) > GATEWAY_MAX_BODY:
            break
        handler.rfile.readline(3)  # the CRLF after the chunk
    if not complete:
        handler.close_connection = True
    headers = {k: v for k, v in handler.headers.items() if k.lower() != "transfer-encoding"}
    return {**headers, "Content-Length": str(len(body))}, bytes(body) or None


def free_port() -> int:
    """Ask the OS for a free port, so we never talk to someone else's server on a common one."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def emulator_env(moto_url: str) -> dict[str, str]:
    """boto3's own endpoint variables: the app has no emulator-specific code. CloudFormation and Logs
    for `tools.infra`, which creates the tables and queues through the stacks' templates."""
    return {**EMULATOR_ENV, **{f"AWS_ENDPOINT_URL_{service}": moto_url
                               for service in ("DYNAMODB", "SQS", "CLOUDFORMATION", "CLOUDWATCH_LOGS")}}


def start_moto(port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "sandbox.moto_server", "-H", "127.0.0.1", "-p", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/moto-api/", process=process)
    return process


def stop(processes: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each process, again every half second, and SIGKILL what is left after `timeout`. Again,
    because a signal can land where Python drops the exception its handler raises: moto_server's
    `sys.exit` in the middle of starting a request thread becomes a logged RuntimeError and the server
    serves on (seen when Ctrl-C hits a busy stack: moto_server then held the launcher 10 s)."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in reversed(processes):
        while process.poll() is None and time.monotonic() < deadline:
            try:
                process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                process.terminate()
        if process.poll() is None:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="API port")
    parser.add_argument("--metrika-port", type=int, default=0, help="Metrika sandbox port (default: any free)")
    parser.add_argument("--amocrm-port", type=int, default=0, help="amoCRM sandbox port (default: any free)")
    parser.add_argument("--bitrix24-port", type=int, default=0, help="Bitrix24 sandbox port (default: any free)")
    args = parser.parse_args()
    started = time.monotonic()
    processes: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Ctrl-C stops the stack even when started from a parent that ignores SIGINT (a shell's background
    # job, a test runner's worker): Python leaves an inherited "ignore" in place, and the launcher would
    # then only notice its children stopping and exit 1.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        moto_port = free_port()
        processes.append(start_moto(moto_port))
        # ALLOW_LOOPBACK_CRM: integrations may name the CRM sandboxes (http://127.0.0.1:…); a
        # deployment never sets it.
        env = {**os.environ, **emulator_env(f"http://127.0.0.1:{moto_port}"), "STAGE": "dev",
               "PYTHONUNBUFFERED": "1", "ALLOW_LOOPBACK_CRM": "1"}
        env.setdefault("ADMIN_TOKEN", secrets.token_hex(24))  # hex: a token_urlsafe one may begin with "-", which a command line reads as an option
        env.setdefault("WORKER_BATCHING_WINDOW", "1")  # snappier locally; AWS uses the stage's value
        if not os.environ.get("METRIKA_API_URL"):
            metrika_port = args.metrika_port or free_port()
            processes.append(subprocess.Popen([sys.executable, "-m", "sandbox.metrika", "--port", str(metrika_port)],
                                              cwd=ROOT, env=env))
            env["METRIKA_API_URL"] = f"http://127.0.0.1:{metrika_port}"
            wait_http(env["METRIKA_API_URL"] + "/_sandbox/state", process=processes[-1])
        amocrm_url = f"http://127.0.0.1:{args.amocrm_port or free_port()}"
        api_url = f"http://127.0.0.1:{args.port}"
        # Installs into the amoCRM sandbox (OAuth): our client id and secret, our public URL (the
        # redirect URI and webhook destinations), the sandbox as the one http host an install may name.
        env.setdefault("AMOCRM_CLIENT_ID", AMOCRM_DEMO_CLIENT_ID)
        env.setdefault("AMOCRM_CLIENT_SECRET", secrets.token_hex(24))
        env.update(PUBLIC_URL=api_url, AMOCRM_SANDBOX_HOSTS=amocrm_url.split("://", 1)[1],
                   AMOCRM_AUTH_URL=amocrm_url + "/oauth")
        processes.append(subprocess.Popen([sys.executable, "-m", "sandbox.amocrm", "--port", amocrm_url.rsplit(":", 1)[1],
                                           "--token", AMOCRM_DEMO_TOKEN, "--client-id", env["AMOCRM_CLIENT_ID"],
                                           "--client-secret", env["AMOCRM_CLIENT_SECRET"],
                                           "--redirect-uri", api_url + "/oauth/amocrm",
                                           "--disable-url", api_url + "/oauth/amocrm/disable"],
                                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
        wait_http(amocrm_url + "/_sandbox/state", process=processes[-1])
        bitrix_url = f"http://127.0.0.1:{args.bitrix24_port or free_port()}"
        processes.append(subprocess.Popen([sys.executable, "-m", "sandbox.bitrix24", "--port", bitrix_url.rsplit(":", 1)[1],
                                           "--code", BITRIX24_DEMO_CODE], cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
        wait_http(bitrix_url + "/_sandbox/state", process=processes[-1])
        # The Bitrix24 application (chalicelib/bitrix24_app.py): the sandbox is its OAuth server, with the
        # sandbox's demo client credentials; the install binds its handlers at this API's address.
        from sandbox.bitrix24 import APP_CLIENT_ID, APP_CLIENT_SECRET
        env.update(BITRIX24_OAUTH_URL=bitrix_url, BITRIX24_CLIENT_ID=APP_CLIENT_ID, BITRIX24_CLIENT_SECRET=APP_CLIENT_SECRET)
        env.setdefault("PUBLIC_URL", f"http://127.0.0.1:{args.port}")
        subprocess.run([sys.executable, "-m", "tools.infra", "--stage", "dev", "--emulator"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        # Their output goes through `redact_secrets`: chalice local's access log prints webhook URLs.
        processes.append(start_echoed([sys.executable, "-c", CHALICE_LOCAL, "local", "--no-autoreload",
                                       "--host", "127.0.0.1", "--port", str(args.port), "--stage", "dev"],
                                      cwd=ROOT, env=env))
        processes.append(start_echoed([sys.executable, "-m", "sandbox.worker"], cwd=ROOT, env=env))
        wait_http(api_url + "/health", process=processes[-2])
        print(f"""
metrika-crm-bridge is up in {time.monotonic() - started:.1f} s
  API             {api_url}
  admin token     {env['ADMIN_TOKEN']}
  Metrika target  {env['METRIKA_API_URL']}{'  (sandbox: GET /_sandbox/state shows what it holds)' if not os.environ.get('METRIKA_API_URL') else ''}
  amoCRM sandbox  {amocrm_url}  (token {AMOCRM_DEMO_TOKEN}; a demo account, see README)
  amoCRM install  python -m tools.install amocrm --token {env['ADMIN_TOKEN']} --counter 4242
  Bitrix24 sandbox {bitrix_url}  (incoming webhook {bitrix_url}/rest/1/{BITRIX24_DEMO_CODE}/; a demo portal)
  install Bitrix24 app: python -m tools.install bitrix24 --portal {bitrix_url} --token {env['ADMIN_TOKEN']} --counter 4343
  DynamoDB + SQS  http://127.0.0.1:{moto_port}  (moto_server)
  webhooks        {api_url}/webhooks/amocrm/<integration id>?secret=…, {api_url}/webhooks/bitrix24/<integration id>
Ctrl-C stops everything.""", flush=True)
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        failed = next(p for p in processes if p.poll() is not None)
        print(f"{' '.join(map(str, failed.args[:4]))} exited with {failed.returncode}; stopping", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop(processes)


if __name__ == "__main__":
    main()
