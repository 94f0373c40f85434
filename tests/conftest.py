"""Shared fixtures: a real moto_server (DynamoDB + SQS) and the Metrika sandbox on loopback.

The app reaches them only through boto3's AWS_ENDPOINT_URL_* variables and METRIKA_API_URL, exactly
as in the local stack.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import uuid

import boto3

import pytest

# The sandboxes listen on loopback: let CRM URLs and connections point there, as the local stack does
# (chalicelib.settings `allow_loopback_crm`). Before anything reads the settings; tests of the
# production default pass `allow_loopback=False` explicitly.
os.environ["ALLOW_LOOPBACK_CRM"] = "1"

from sandbox.local_stack import emulator_env, free_port, start_moto, stop
from sandbox.metrika import MetrikaSandbox

# Random per test run, the same in every xdist worker (they must collect the same parametrised ids).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
_SEEDED = uuid.UUID(_RUN[:32].ljust(32, "0"))


def _secret_part(name: str) -> str:
    return uuid.uuid5(_SEEDED, name).hex


ADMIN_TOKEN = "test-admin-token-" + _secret_part("admin")
METRIKA_TOKEN = "y0_test-metrika-token-" + _secret_part("metrika")
AMO_SECRET = "amo-webhook-secret-" + _secret_part("amo-secret")
AMO_TOKEN = "amo-long-lived-token-" + _secret_part("amo-token")
B24_APP_TOKEN = "b24apptoken" + _secret_part("b24-app")[:21]
B24_WEBHOOK_URL = "https://portal.bitrix24.ru/rest/1/" + _secret_part("b24-url")[:16] + "/"
SECRETS = (ADMIN_TOKEN, METRIKA_TOKEN, AMO_SECRET, AMO_TOKEN, B24_APP_TOKEN, B24_WEBHOOK_URL)


_LOOPBACK = {"127.0.0.1", "localhost", "::1", None}
_real_getaddrinfo = socket.getaddrinfo


def _loopback_only(host, *args, **kwargs):
    if host not in _LOOPBACK and not str(host).startswith("127."):
        raise OSError(f"tests talk to loopback only; refused to resolve {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback_only


def _configured_lambda_context():
    """chalice.test's `lambda_.invoke` gives every function Lambda's default 3 s; deployed, a function
    runs for its timeout in .chalice/config.json, and its deadline (chalicelib.deadline) reads the
    remaining time from this context. The test client's functions get their configured timeout."""
    import chalice.test
    from chalice.cli.factory import CLIFactory
    from chalice.local import LambdaContext
    config = CLIFactory(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).create_config_obj(
        chalice_stage_name="dev")

    class ConfiguredLambdaContext(LambdaContext):
        def __init__(self, function_name, memory_size, max_runtime_ms=None, time_source=None):
            if max_runtime_ms is None:
                max_runtime_ms = config.scope("dev", function_name).lambda_timeout * 1000
            super().__init__(function_name, memory_size, max_runtime_ms, time_source)

    chalice.test.LambdaContext = ConfiguredLambdaContext


_configured_lambda_context()


STACK_FIXTURES = {"moto_url", "service_env", "stack"}


def pytest_collection_modifyitems(config, items):
    """`make check` runs the fast tier: every test that needs no moto_server or local stack (in-process
    sandboxes on loopback are fine: they start in milliseconds). Those that do are marked `stack`."""
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (`rep_setup`, `rep_call`), so a fixture's teardown can tell a
    failed test: the browser tests save a screenshot then (tests/test_console_browser.py)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def moto_url():
    port = free_port()
    # The `queue` fixture empties the events queue after each test with PurgeQueue, delayed retries
    # included; AWS allows one purge a minute per queue, which moto enforces unless told not to.
    os.environ["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
    process = start_moto(port)
    yield f"http://127.0.0.1:{port}"
    stop([process])


@pytest.fixture(scope="session")
def metrika_sandbox():
    sandbox = MetrikaSandbox(default_time_zone="Europe/Moscow").start()
    yield sandbox
    sandbox.stop()


@pytest.fixture(scope="module")
def amocrm(request):
    """An amoCRM sandbox account per test module (its own token)."""
    from sandbox.amocrm import AmoCrmSandbox
    sandbox = AmoCrmSandbox(token=f"amo-{request.module.__name__.rpartition('.')[2]}-token").start()
    yield sandbox
    sandbox.stop()


@pytest.fixture(scope="module")
def bitrix():
    """A Bitrix24 sandbox portal per test module."""
    from sandbox.bitrix24 import Bitrix24Sandbox
    sandbox = Bitrix24Sandbox().start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def worker(service_env):
    """The worker loop of `make run`: the Lambda's queue handler fed from the events queue."""
    from app import on_events_message
    from chalicelib.settings import get_settings
    from sandbox.worker import WorkerLoop
    return WorkerLoop(on_events_message, get_settings().events_queue, wait_seconds=0)


@pytest.fixture(scope="session")
def service_env(moto_url, metrika_sandbox):
    """Environment for the app under test; tables and queues created once through tools.infra."""
    env = {**emulator_env(moto_url), "STAGE": "dev", "ADMIN_TOKEN": ADMIN_TOKEN,
           "METRIKA_API_URL": metrika_sandbox.url, "ADMIN_TOKEN_PARAMETER": "", "ALLOW_LOOPBACK_CRM": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from tools.infra import ensure_resources
    from chalicelib.settings import get_settings
    get_settings.cache_clear()
    ensure_resources(emulator=True)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_sandbox(request):
    if "metrika_sandbox" in request.fixturenames:
        request.getfixturevalue("metrika_sandbox").reset()
    yield


@pytest.fixture
def app_client(service_env):
    import app as app_module
    from chalice.test import Client
    app_module._STORE = app_module._QUEUE = None
    app_module._SOURCES.clear()
    # The test client applies the dev stage's config variables to each request: the same table and
    # queue names as service_env, so settings agree inside and outside requests.
    with Client(app_module.app, stage_name="dev") as client:
        yield client
    app_module._SOURCES.clear()


@pytest.fixture
def queue(service_env):
    """The events queue, emptied for this test; `.bodies()` drains and returns message bodies."""
    from chalicelib.settings import get_settings
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=get_settings().events_queue)["QueueUrl"]

    class Queue:
        def delayed(self) -> int:
            attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesDelayed"])
            return int(attributes["Attributes"]["ApproximateNumberOfMessagesDelayed"])

        def bodies(self):
            out = []
            while True:
                messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
                if not messages:
                    return out
                out += [json.loads(m["Body"]) for m in messages]
                sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                                for i, m in enumerate(messages)])
    drained = Queue()
    sqs.purge_queue(QueueUrl=url)
    yield drained
    # Retries wait out a backoff of seconds on the queue, invisible: the purge drops them too, so they
    # never reach the next test's worker.
    sqs.purge_queue(QueueUrl=url)


@pytest.fixture
def integration_id(request):
    integration_id = "it-" + uuid.uuid4().hex[:12]
    yield integration_id
    # Integrations on one counter share its ids and status list (chalicelib/shared_counter.py): each
    # test's integration leaves the counter, so the next test's is alone on it again. Its config only
    # (two writes): the state it left is under its own id, and deleting thousands of entity items one
    # by one would cost a history-import test seconds.
    if "app_client" in request.fixturenames:
        from chalicelib.settings import get_settings
        client = boto3.client("dynamodb")
        for sort_key in ("CONFIG", "STATUS_MAPPING"):
            client.delete_item(TableName=get_settings().config_table,
                               Key={"pk": {"S": f"INTEGRATION#{integration_id}"}, "sk": {"S": sort_key}})


@pytest.fixture
def captured_logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def admin_headers(token: str = ADMIN_TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def amocrm_config(**overrides) -> dict:
    config = {"crm": "amocrm", "counter_id": 4242, "metrika_token": METRIKA_TOKEN,
              "connection": {"base_url": "https://shop.amocrm.ru", "access_token": AMO_TOKEN,
                             "account_id": "32427762", "webhook_secret": AMO_SECRET}}
    config.update(overrides)
    return config


def bitrix24_config(**overrides) -> dict:
    config = {"crm": "bitrix24", "counter_id": 4243, "metrika_token": METRIKA_TOKEN,
              "connection": {"webhook_url": B24_WEBHOOK_URL, "application_token": B24_APP_TOKEN,
                             "member_id": "7f3c2a9be1d04c5a8e6b0d2f4a1c9e37"}}
    config.update(overrides)
    return config


# --- the deploy artifacts' package build, started with the session (tests/test_deploy_artifacts.py) ---

def pytest_configure(config):
    """`chalice package` mostly waits on pip: started here, in the controlling process only (not in each
    xdist worker), it overlaps the suite instead of holding a worker up."""
    from tests import test_deploy_artifacts as artifacts
    if not hasattr(config, "workerinput") and artifacts.runs_these_tests(config):
        config.stash[_ARTIFACTS_BUILD] = artifacts.start_build()


def pytest_unconfigure(config):
    from tests import test_deploy_artifacts as artifacts
    if _ARTIFACTS_BUILD in config.stash:
        artifacts.stop_build(config.stash[_ARTIFACTS_BUILD])


_ARTIFACTS_BUILD = pytest.StashKey()
