"""Issue 14's operator surface under hostile input and faults: each defect a sweep over HTTP, the
commands and the local stack found, pinned by a test. Fast: AWS is faked on loopback (an HTTP server
answering as AWS would, or not answering at all); moto_server only where the route itself is tested."""
from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from sandbox.local_stack import EMULATOR_ENV
from tests import stacks


class FakeAws:
    """An HTTP server on loopback answering every AWS call with `answer(target, body)` →
    (status, headers, body). `calls` records (X-Amz-Target or path, request body)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.answer = lambda target, body: (403, {"x-amzn-ErrorType": "AccessDeniedException"},
                                            b'{"__type": "AccessDeniedException", "message": "not authorized"}')
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = self.headers.get("X-Amz-Target") or self.path
                fake.calls.append((target, body))
                status, headers, payload = fake.answer(target, body)
                self.send_response(status)
                for name, value in {"Content-Type": "application/x-amz-json-1.1", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def client(self, service: str):
        from botocore.config import Config
        return boto3.client(service, endpoint_url=self.url, region_name=EMULATOR_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id="local", aws_secret_access_key="local",
                            config=Config(retries={"total_max_attempts": 1}))


@pytest.fixture(scope="module")
def fake_aws():
    fake = FakeAws()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def aws(fake_aws):
    fake_aws.calls.clear()
    return fake_aws


# --- the commands without a usable AWS account ---------------------------------------------------------

DEPLOYED = {"resources": [{"resource_type": "rest_api", "rest_api_id": "abc123",
                           "rest_api_url": "https://abc123.execute-api.eu-central-1.amazonaws.com/api/"}]}


@pytest.fixture
def operator_env(monkeypatch, tmp_path):
    """An operator's shell with no AWS configuration at all (no region, no credentials, no config files),
    and a fresh default boto3 session (the session caches credentials and region once read)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    project = tmp_path / "project"
    (project / ".chalice" / "deployed").mkdir(parents=True)
    from tools.deploy import ROOT
    (project / ".chalice" / "config.json").write_text((ROOT / ".chalice" / "config.json").read_text())
    (project / ".chalice" / "deployed" / "dev.json").write_text(json.dumps(DEPLOYED))
    return project


def _run_dead_letters(argv, project):
    from tools.dead_letters import main
    return main(argv)


def _run_deploy(argv, project):
    from tools.deploy import main
    return main(argv + ["--project-dir", str(project)])


def _run_gateway_responses(argv, project):
    from tools.gateway_responses import main
    return main(argv + ["--project-dir", str(project)])


COMMANDS = {
    "dead_letters count": (_run_dead_letters, ["count", "--stage", "dev"]),
    "dead_letters redrive": (_run_dead_letters, ["redrive", "--stage", "dev"]),
    "deploy token": (_run_deploy, ["token", "--stage", "dev"]),
    "gateway_responses": (_run_gateway_responses, ["--stage", "dev"]),
}
FAULTS = {
    "no region": ({}, "region"),
    "no credentials": ({"AWS_DEFAULT_REGION": "eu-central-1"}, "credentials"),
    "refused": ({"AWS_DEFAULT_REGION": "eu-central-1", "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"},
                "AccessDenied"),
}


@pytest.mark.parametrize(("command", "fault"), [
    *((command, fault) for command in COMMANDS for fault in ("no region", "refused")),
    ("deploy token", "no credentials"), ("gateway_responses", "no credentials")])  # dead_letters': the SQS adapter's
def test_a_command_without_a_usable_aws_account_says_why_and_exits_non_zero(command, fault, operator_env, aws,
                                                                            monkeypatch, capsys):
    """No region configured, no credentials, or AWS refusing the call (AccessDenied from a loopback fake):
    one line naming the cause, exit 1, and no traceback (an exception out of `main`)."""
    env, cause = FAULTS[fault]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if fault == "refused":
        monkeypatch.setenv("AWS_ENDPOINT_URL", aws.url)
    run, argv = COMMANDS[command]
    assert run(argv, operator_env) == 1
    err = capsys.readouterr().err
    assert cause in err and "Traceback" not in err
    assert fault != "refused" or aws.calls  # it did ask AWS


def test_dead_letters_refuses_a_stage_not_configured_before_asking_aws(operator_env, aws, monkeypatch, capsys):
    from tools.dead_letters import main
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.url)
    assert main(["count", "--stage", "staging"]) == 2
    assert "'staging' is not in .chalice/config.json" in capsys.readouterr().err and not aws.calls


def test_deploy_in_a_directory_without_a_chalice_project_says_so(tmp_path, capsys):
    from tools.deploy import main
    assert main(["urls", "--stage", "dev", "--project-dir", str(tmp_path)]) == 2
    assert ".chalice/config.json" in capsys.readouterr().err


# --- the authorizer when SSM answers nonsense ----------------------------------------------------------

TOKEN_NAME = "/metrika-crm-bridge/dev/admin-token"
GOOD_TOKEN = "the-admin-token-0123456789abcdef"


def ssm_answer(**fields) -> bytes:
    import time
    parameter = {"Name": TOKEN_NAME, "Type": "SecureString", "Value": GOOD_TOKEN, "Version": 1,
                 "LastModifiedDate": time.time(), **fields}
    return json.dumps({"Parameter": {k: v for k, v in parameter.items() if v is not ...}}).encode()


MALFORMED_SSM = {
    "not JSON (a proxy's page)": b"<html><body>502 Bad Gateway</body></html>",
    "no Parameter": b"{}",
    "Parameter not an object": b'{"Parameter": "x"}',
    "no Value": ssm_answer(Value=...),
    "Value null": ssm_answer(Value=None),
    "Value not text": ssm_answer(Value=42),
    "no Version": ssm_answer(Version=...),
    "Version not a number": ssm_answer(Version="x"),
    "Version a boolean": ssm_answer(Version=True),
    "date unreadable": ssm_answer(LastModifiedDate="yesterday"),
    "date out of range": ssm_answer(LastModifiedDate=1e300),
}


def authorizer_on(aws):
    from chalicelib.admin import AdminTokenCache, read_tokens
    client = aws.client("ssm")
    return AdminTokenCache(lambda now: read_tokens(client, TOKEN_NAME, overlap_seconds=900, now=now))


@pytest.mark.parametrize("answer", MALFORMED_SSM)
def test_a_malformed_ssm_answer_refuses_every_token_instead_of_crashing(answer, aws, captured_logs):
    """A 200 from SSM's endpoint that is not a parameter: the token cannot be checked, so the authorizer
    refuses (API Gateway's 403) as when SSM is down; an exception out of it is API Gateway's 500."""
    aws.answer = lambda target, body: (200, {}, MALFORMED_SSM[answer])
    assert authorizer_on(aws).is_admin(f"Bearer {GOOD_TOKEN}") is False
    assert aws.calls and aws.calls[0][0] == "AmazonSSM.GetParameter"
    logged = [json.loads(r.getMessage()) for r in captured_logs.records if "admin_token_unreadable" in r.getMessage()]
    assert logged and "malformed answer" in logged[0]["error"] and GOOD_TOKEN not in captured_logs.text


def test_a_malformed_previous_version_leaves_the_current_token_working(aws, captured_logs):
    def answer(target, body):
        previous = json.loads(body)["Name"].endswith(":1")
        return 200, {}, b"<html>oops</html>" if previous else ssm_answer(Version=2)
    aws.answer = answer
    assert authorizer_on(aws).is_admin(f"Bearer {GOOD_TOKEN}") is True
    assert [json.loads(body)["Name"] for _, body in aws.calls] == [TOKEN_NAME, f"{TOKEN_NAME}:1"]
    logged = [json.loads(r.getMessage()) for r in captured_logs.records if "previous_unreadable" in r.getMessage()]
    assert logged and logged[0]["version"] == 1 and "malformed answer" in logged[0]["error"]


# --- a redrive never outlives its request ----------------------------------------------------------------

class SlowSqs:
    """SQS in memory whose every call takes `seconds` on `clock` (a settable clock, no sleeping); records
    the time each receive starts."""

    def __init__(self, clock, messages: int, seconds: float = 1.0) -> None:
        self.clock, self.seconds = clock, seconds
        self.dead = [{"Body": json.dumps({"n": n}), "ReceiptHandle": str(n)} for n in range(messages)]
        self.sent: list[str] = []
        self.receives_at: list[float] = []

    def _call(self) -> None:
        self.clock.t += self.seconds

    def get_queue_url(self, QueueName):
        self._call()
        return {"QueueUrl": QueueName}

    def get_queue_attributes(self, QueueUrl, AttributeNames):
        self._call()
        return {"Attributes": {"ApproximateNumberOfMessages": str(len(self.dead)),
                               "ApproximateNumberOfMessagesNotVisible": "0"}}

    def receive_message(self, QueueUrl, MaxNumberOfMessages, **kwargs):
        self.receives_at.append(self.clock.t)
        self._call()
        return {"Messages": self.dead[:MaxNumberOfMessages]}

    def send_message_batch(self, QueueUrl, Entries):
        self._call()
        self.sent += [entry["MessageBody"] for entry in Entries]
        return {"Successful": [{"Id": entry["Id"]} for entry in Entries]}

    def delete_message_batch(self, QueueUrl, Entries):
        self._call()
        handles = {entry["ReceiptHandle"] for entry in Entries}
        self.dead = [m for m in self.dead if m["ReceiptHandle"] not in handles]
        return {"Successful": [{"Id": entry["Id"]} for entry in Entries]}


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_redrive_starts_no_round_that_could_outlive_its_request():
    """An admin route's deadline is API Gateway's 29 s (`chalicelib.deadline`); each SQS call may take up
    to REDRIVE_CALL_SECONDS when SQS hangs, so a round starts only while that much is left. SQS answering
    slowly (1 s a call) stops the redrive early, with what remains said, rather than past the deadline."""
    from chalicelib import deadline
    from chalicelib.queue import REDRIVE_CALL_SECONDS, DeadLetterQueue
    clock = Clock()
    sqs = SlowSqs(clock, messages=300)
    with deadline.invocation(26.0, clock=clock) as invocation:
        result = DeadLetterQueue(sqs, "dlq", "events", clock=clock).redrive()
    assert all(invocation.calls_end - started >= REDRIVE_CALL_SECONDS for started in sqs.receives_at)
    assert invocation.calls_end - (clock.t - sqs.seconds) < REDRIVE_CALL_SECONDS + 3 * sqs.seconds  # it went on as long as it could
    assert result == {"moved": len(sqs.sent), "remaining": 300 - len(sqs.sent), "failed": 0} and 0 < len(sqs.sent) < 300
    assert clock.t <= invocation.end
    unbounded = SlowSqs(Clock(), messages=30)  # no deadline (the command line): all of it
    assert DeadLetterQueue(unbounded, "dlq", "events", clock=unbounded.clock).redrive()["moved"] == 30


def test_the_redrive_client_bounds_each_call_to_fit_an_admin_request(monkeypatch):
    from chalicelib import deadline
    monkeypatch.setenv("AWS_DEFAULT_REGION", EMULATOR_ENV["AWS_DEFAULT_REGION"])
    from chalicelib.queue import REDRIVE_CALL_SECONDS, redrive_client
    config = redrive_client().meta.config
    assert config.retries["total_max_attempts"] == 1  # no retry, no backoff: a failed call is a 503 at once
    assert config.connect_timeout + config.read_timeout <= REDRIVE_CALL_SECONDS
    assert config.read_timeout > 1  # a receive long-polls 1 s
    # Rounds may run for most of an admin request: the calls' time less one hung call.
    budget = deadline.api_seconds(lambda_remaining=None, received_at=None, now=0) - deadline.API_RESERVE
    assert REDRIVE_CALL_SECONDS <= budget / 3


@pytest.fixture
def hung_sqs(monkeypatch):
    """An SQS endpoint that accepts connections and never answers, and redrive timeouts made short
    (the real ones are checked above) so the test waits a fraction of a second."""
    from chalicelib import queue
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(queue, "REDRIVE_CONNECT_SECONDS", 0.2, raising=False)
    monkeypatch.setattr(queue, "REDRIVE_READ_SECONDS", 0.2, raising=False)
    yield
    listener.close()


@pytest.mark.parametrize(("method", "path"), [("GET", "/dead-letters"), ("POST", "/dead-letters/redrive")])
def test_sqs_hanging_is_a_503_within_the_request(method, path, app_client, hung_sqs):
    import time
    from tests.conftest import admin_headers
    answers = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: answers.append(app_client.http.request(
        method, path, headers=admin_headers(), body=b"{}" if method == "POST" else b"")), daemon=True)
    worker.start()
    worker.join(timeout=10)  # botocore's own defaults would hang here for minutes
    assert answers, "the route did not answer within 10 s"
    assert answers[0].status_code == 503 and answers[0].json_body["error"] == "unavailable"
    assert "ReadTimeout" in answers[0].json_body["message"] and time.monotonic() - started < 5


# --- the local stack prints no secret ------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    '"POST /webhooks/amocrm/shop?secret=ab"SECRETPART HTTP/1.1" 403 -',  # a quote inside the secret
    "\"POST /webhooks/amocrm/shop?secret=ab'SECRETPART HTTP/1.1\" 403 -",
    '"POST /webhooks/amocrm/shop?secret=ab;SECRETPART HTTP/1.1" 403 -',  # the app does not split on ";"
    '"POST /webhooks/amocrm/shop?secret=ab#SECRETPART HTTP/1.1" 403 -',
    '"POST /webhooks/amocrm/shop?s%65cret=SECRETPART HTTP/1.1" 403 -',  # the app decodes the name
    '"POST /webhooks/amocrm/shop?%73ecret=SECRETPART&x=1 HTTP/1.1" 403 -',
    '"POST /webhooks/bitrix24/portal?x=1;secret=SECRETPART HTTP/1.1" 403 -',
    '"GET /rest/user.current?auth=SECRETPART HTTP/1.1" 200 -',  # Bitrix24's access token parameter
    "code 400, message Bad request syntax ('POST /w?secret=SECRETPART\\x01 HTTP/1.1')",
])
def test_no_part_of_a_secret_in_a_query_reaches_the_terminal(line):
    """The webhook secret is any printable ASCII without spaces (chalicelib.integrations); amoCRM sends
    the URL as the operator pasted it."""
    from sandbox.local_stack import redact_secrets
    shown = redact_secrets(line)
    assert "SECRETPART" not in shown and "[redacted]" in shown
    assert shown.endswith(line[line.index(" HTTP/1.1"):])  # the rest of the line is kept


# --- our own queue and store answering a bare 5xx --------------------------------------------------------

def _dead_letter_count(aws):
    from chalicelib.queue import DeadLetterQueue
    return DeadLetterQueue(aws.client("sqs"), "q-dlq", "q").count()


def _event_send(aws):
    from chalicelib.queue import EventQueue, message
    return EventQueue(aws.client("sqs"), "q").send([message("shop", "order", "1")])


def _store_read(aws):
    from chalicelib.store.dynamodb import DynamoStore
    return DynamoStore(aws.client("dynamodb"), "config", "state", quota_table="quota").get_integration("shop")


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("call", [_dead_letter_count, _event_send, _store_read], ids=lambda call: call.__name__)
def test_a_bare_5xx_from_our_queue_or_store_is_unavailable(call, status, aws):
    """A 5xx whose body is not the service's JSON (a load balancer's or an overloaded emulator's HTML page:
    botocore names its code "500") is the service failing, like its own InternalError: `Unavailable`, the
    route's 503 and the worker's retried batch, not an unexpected error (the drill got a 500 here from
    moto_server under load during two concurrent redrives)."""
    from chalicelib.errors import Unavailable
    aws.answer = lambda target, body: (status, {"Content-Type": "text/html"}, b"<html><h1>Server Error</h1></html>")
    with pytest.raises(Unavailable) as raised:
        call(aws)
    assert str(status) in str(raised.value)


# --- the local stack refuses as API Gateway does ------------------------------------------------------------

@pytest.fixture
def chalice_local(monkeypatch):
    """The app under `chalice local`'s own HTTP server, in this process, with the local stack's patches."""
    with stacks.chalice_local(monkeypatch) as url:
        yield url


@pytest.mark.parametrize(("path", "authorization", "status", "error"), [
    ("/dead-letters", None, 401, "unauthorized"),  # no bearer token: API Gateway answers, no authorizer runs
    ("/dead-letters", "Bearer not-the-admin-token", 403, "forbidden"),  # the authorizer's Deny
    ("/no-such-route", None, 404, "not_found"),  # API Gateway's 403 "Missing Authentication Token"
    ("/no-such-route", "Bearer not-the-admin-token", 404, "not_found"),  # its IncompleteSignatureException
])
def test_the_local_stack_refuses_in_the_shape_api_gateway_is_given(path, authorization, status, error, chalice_local):
    """`chalice local` answered these with its own `{"message"}` / `{"Message"}`; deployed, API Gateway
    answers them with the Gateway Responses of tools/gateway_responses.py. Locally now the same."""
    import requests
    close = {"Connection": "close"}  # no keep-alive thread for the server to wait for at shutdown
    answer = requests.get(chalice_local + path, timeout=10,
                          headers={**close, "Authorization": authorization} if authorization else close)
    body = answer.json()
    assert (answer.status_code, body["error"]) == (status, error) and body["message"] and "request_id" in body
    assert set(body) == {"error", "message", "request_id"}
    assert status != 401 or answer.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(chalice_local + "/health", headers=close, timeout=10).json() == {"status": "ok"}  # ours pass
