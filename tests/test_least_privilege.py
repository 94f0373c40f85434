"""Least privilege (issue 14, item 5): each function's IAM policy against the AWS calls its code makes,
both ways — nothing it calls is missing from its policy, nothing its policy grants goes unused.

The policies are generated from one description (tools/policies.py, `ACCESS`). The stack test runs every
function's code paths in process against moto_server, with a botocore `before-call` hook on boto3's
default session recording each call as IAM sees it (`tools.policies.iam_requests`: the action and the
resource ARN) under the function that made it; the test itself (seeding, draining queues) records
nothing. Lambda's own use of a role — the SQS event source mapping polling the events queue, the log
lines — is the only thing a policy may grant beyond what was recorded (`EVENT_SOURCE`, `LOG_ACTIONS`).

moto does not enforce IAM, so this checks the policies against what the code asks for; that AWS grants
a request for these ARNs is checked against AWS's documentation, cited in tools/policies.py."""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from chalice.cli.factory import CLIFactory

from tools import policies
from tools.policies import (ACCESS, ADMIN_TOKEN, AMOCRM_SECRET, BITRIX24_SECRET, CONFIG, DEAD_LETTERS, EVENT_SOURCE, EVENTS, FUNCTIONS,
                            LOG_ACTIONS, QUOTA, STATE, granted_pairs, iam_requests)

ROOT = Path(__file__).resolve().parent.parent
STAGES = tuple(json.loads((ROOT / ".chalice" / "config.json").read_text())["stages"])


# --- the generated files and how Chalice uses them (no emulator) ---------------------------------------

def test_the_committed_policy_files_are_the_generated_ones_and_no_other_policy_file_is_left():
    expected = policies.generated()
    for name, text in expected.items():
        path = ROOT / ".chalice" / name
        assert path.exists() and path.read_text() == text, f"{name} is stale: run python -m tools.policies"
    on_disk = {p.name for p in (ROOT / ".chalice").glob("policy-*.json")}
    assert on_disk == set(expected)  # the old one-policy-per-stage files are gone
    assert policies.main(["--check"]) == 0


@pytest.mark.parametrize("stage", STAGES)
def test_each_function_has_its_own_role_and_policy_file_in_every_stage(stage):
    """Chalice's view of .chalice/config.json: autogen off, and each of the five functions (the
    authorizer `admin` included) reads its own file. A function without one would fall back to
    policy-<stage>.json, which no longer exists: `chalice deploy` would fail, not share a policy."""
    raw = json.loads((ROOT / ".chalice" / "config.json").read_text())
    assert "iam_policy_file" not in raw and "iam_policy_file" not in raw["stages"][stage]
    config = CLIFactory(str(ROOT)).create_config_obj(chalice_stage_name=stage)
    import app
    deployed = {"api_handler", *(h.name for h in app.app.builtin_auth_handlers), *(e.name for e in app.app.event_sources)}
    assert deployed == set(FUNCTIONS)
    for function in FUNCTIONS:
        scoped = config.scope(stage, function)
        assert scoped.autogen_policy is False and scoped.manage_iam_role is True
        assert scoped.iam_policy_file == policies.policy_file(stage, function)


@pytest.mark.parametrize("stage", STAGES)
def test_policies_name_the_stages_own_resources_and_logs_only_their_own_log_group(stage):
    settings = policies.stage_settings(stage)
    log_groups = re.findall(r'LogGroupName: !Sub "(/aws/lambda/[^"]+)"', (ROOT / "infra" / "stage.yaml").read_text())
    assert {g.replace("${Stage}", stage) for g in log_groups} == {
        f"/aws/lambda/{policies.function_name(stage, f)}" for f in FUNCTIONS}  # infra creates every group
    other = "prod" if stage == "dev" else "dev"
    for function in FUNCTIONS:
        document = json.loads((ROOT / ".chalice" / policies.policy_file(stage, function)).read_text())
        pairs = granted_pairs(document)
        text = json.dumps(document)
        assert "*" not in {a for a, _ in pairs} and not any(a.endswith(":*") for a, _ in pairs)
        assert all(r.count(":*:*:") == 1 for _, r in pairs)  # region and account only; names exact
        assert f"-{other}-" not in text and f"/{other}/" not in text
        assert {a for a, _ in pairs if a.startswith("logs:")} == set(LOG_ACTIONS)  # no logs:CreateLogGroup
        assert {r for a, r in pairs if a.startswith("logs:")} == {
            f"arn:aws:logs:*:*:log-group:/aws/lambda/{policies.function_name(stage, function)}:*"}
        assert "sqs:ChangeMessageVisibility" not in text
        if function != "admin":  # only the authorizer reads the admin token; the amoCRM client secret apart
            assert settings.admin_token_parameter.lstrip("/") not in text
            assert {r for a, r in pairs if a.startswith("ssm:")} <= {
                f"arn:aws:ssm:*:*:parameter/{settings.amocrm_client_secret_parameter.lstrip('/')}",
                f"arn:aws:ssm:*:*:parameter/{settings.bitrix24_client_secret_parameter.lstrip('/')}"}
    admin = json.loads((ROOT / ".chalice" / policies.policy_file(stage, "admin")).read_text())
    # No queue, and of the tables one read of the config table (a console link's token digest).
    assert {a for a, _ in granted_pairs(admin)} == {"ssm:GetParameter", "dynamodb:GetItem", *LOG_ACTIONS}
    assert {r for a, r in granted_pairs(admin) if a.startswith("dynamodb:")} == {
        f"arn:aws:dynamodb:*:*:table/{settings.config_table}"}
    assert (f"arn:aws:ssm:*:*:parameter/{settings.admin_token_parameter.lstrip('/')}"
            in {r for _, r in granted_pairs(admin)})
    shared = f"arn:aws:dynamodb:*:*:table/{settings.quota_table}"
    assert shared == "arn:aws:dynamodb:*:*:table/metrika-crm-bridge-quota"  # one table for every stage


def test_each_resource_is_reachable_only_by_the_functions_that_use_it():
    """What issue 14 found, as the description answers it: the authorizer touches no table or queue,
    nothing else reads the admin token, the dead-letter queue is the redrive route's alone, and only the
    integration deletion and the confirmation of uploads (a worker job since issue 15) delete items. The
    schedules only list integrations and queue their jobs."""
    def holders(role):
        return {function for function, access in ACCESS.items() if role in access}
    assert ACCESS["admin"] == {ADMIN_TOKEN: ("ssm:GetParameter",), CONFIG: ("dynamodb:GetItem",)}
    assert holders(ADMIN_TOKEN) == {"admin"}
    assert holders(DEAD_LETTERS) == {"api_handler"}
    assert holders(QUOTA) == {"api_handler", "on_events_message"}  # they call Metrika
    assert holders(EVENTS) == set(FUNCTIONS) - {"admin"}
    deleting = {function for function, access in ACCESS.items() for role in (CONFIG, STATE)
                if "dynamodb:DeleteItem" in access.get(role, ())}
    assert deleting == {"api_handler", "on_events_message"}
    # The amoCRM client secret: the install routes (code exchange) and the worker (token refresh) only.
    assert holders(AMOCRM_SECRET) == {"api_handler", "on_events_message"}
    assert holders(BITRIX24_SECRET) == {"api_handler", "on_events_message"}  # the app's install and refreshes
    for schedule in ("reconcile_all", "confirm_uploads", "refresh_tokens"):
        assert ACCESS[schedule] == {CONFIG: ("dynamodb:Scan",), EVENTS: ("sqs:GetQueueUrl", "sqs:SendMessage")}


# --- operations as IAM sees them --------------------------------------------------------------------

@pytest.mark.parametrize(("service", "operation", "params", "expected"), [
    ("dynamodb", "GetItem", {"TableName": "t"}, {("dynamodb:GetItem", "arn:aws:dynamodb:*:*:table/t")}),
    ("dynamodb", "Query", {"TableName": "t", "IndexName": "by-day"},
     {("dynamodb:Query", "arn:aws:dynamodb:*:*:table/t/index/by-day")}),
    ("dynamodb", "BatchWriteItem", {"RequestItems": {"a": [], "b": []}},
     {("dynamodb:BatchWriteItem", "arn:aws:dynamodb:*:*:table/a"), ("dynamodb:BatchWriteItem", "arn:aws:dynamodb:*:*:table/b")}),
    ("dynamodb", "TransactWriteItems", {"TransactItems": [{"Put": {"TableName": "a"}}, {"Update": {"TableName": "b"}},
                                                          {"ConditionCheck": {"TableName": "a"}}, {"Delete": {"TableName": "a"}}]},
     {("dynamodb:PutItem", "arn:aws:dynamodb:*:*:table/a"), ("dynamodb:UpdateItem", "arn:aws:dynamodb:*:*:table/b"),
      ("dynamodb:ConditionCheckItem", "arn:aws:dynamodb:*:*:table/a"), ("dynamodb:DeleteItem", "arn:aws:dynamodb:*:*:table/a")}),
    ("dynamodb", "TransactGetItems", {"TransactItems": [{"Get": {"TableName": "a"}}]},
     {("dynamodb:GetItem", "arn:aws:dynamodb:*:*:table/a")}),
    ("sqs", "SendMessageBatch", {"QueueUrl": "https://sqs.eu-central-1.amazonaws.com/123456789012/q-dlq"},
     {("sqs:SendMessage", "arn:aws:sqs:*:*:q-dlq")}),
    ("sqs", "DeleteMessageBatch", {"QueueUrl": "http://127.0.0.1:5000/123456789012/q/"},
     {("sqs:DeleteMessage", "arn:aws:sqs:*:*:q")}),
    ("sqs", "GetQueueUrl", {"QueueName": "q"}, {("sqs:GetQueueUrl", "arn:aws:sqs:*:*:q")}),
    ("ssm", "GetParameter", {"Name": "/app/dev/admin-token:41"}, {("ssm:GetParameter", "arn:aws:ssm:*:*:parameter/app/dev/admin-token")}),
    ("ssm", "GetParameter", {"Name": "plain"}, {("ssm:GetParameter", "arn:aws:ssm:*:*:parameter/plain")}),
    ("ssm", "GetParameter", {"Name": "arn:aws:ssm:eu-central-1:123456789012:parameter/app/dev/admin-token:7"},
     {("ssm:GetParameter", "arn:aws:ssm:*:*:parameter/app/dev/admin-token")}),
])
def test_each_call_maps_to_the_iam_actions_and_resources_that_authorise_it(service, operation, params, expected):
    assert iam_requests(service, operation, params) == expected


@pytest.mark.parametrize(("service", "operation"), [("dynamodb", "DescribeTable"), ("sqs", "PurgeQueue"),
                                                    ("ssm", "GetParametersByPath"), ("kms", "Decrypt")])
def test_a_call_with_no_known_mapping_fails_loudly(service, operation):
    with pytest.raises(ValueError, match="no IAM mapping"):
        iam_requests(service, operation, {})


def test_a_stage_without_an_admin_token_parameter_gets_no_policy():
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    del config["stages"]["dev"]["environment_variables"]["ADMIN_TOKEN_PARAMETER"]
    with pytest.raises(ValueError, match="ADMIN_TOKEN_PARAMETER"):
        policies.generated(config)


# --- both ways, on the emulator ----------------------------------------------------------------------

class Recorder:
    """botocore hooks on boto3's default session: `before-call` records each call that is sent, as
    (action, resource), under the function running now (`acting_as`; nested for the authorizer inside a
    route). `before-call` carries the serialised request; the call's own parameters, which name the
    table, queue or parameter, are kept from `before-parameter-build` in the call's context. Threads
    share it: the history import releases entities on a small pool.

    Each function runs in its own container, as in Lambda: app.py's cached clients, queue URLs and
    integrations are kept per function, so no function is spared a call because another made it first."""

    PARAMS = "least_privilege_params"
    CONTAINER = ("_STORE", "_QUEUE", "_ADMIN_TOKENS", "_SOURCES", "_AMOCRM_SECRET", "_CONSOLE_LINKS")

    def __init__(self) -> None:
        self.calls: dict[str, set[tuple[str, str]]] = defaultdict(set)
        self._stack: list[str] = []
        self._containers: dict[str, dict] = {}
        self._lock = threading.RLock()

    def keep_params(self, params, context, **kwargs) -> None:
        context[self.PARAMS] = params

    def __call__(self, model, context, **kwargs) -> None:
        with self._lock:
            if self._stack:
                self.calls[self._stack[-1]] |= iam_requests(model.service_model.endpoint_prefix, model.name,
                                                            context[self.PARAMS])

    def register(self, events) -> None:
        events.register("before-parameter-build", self.keep_params)
        events.register("before-call", self)

    def unregister(self, events) -> None:
        events.unregister("before-call", self)
        events.unregister("before-parameter-build", self.keep_params)

    @contextmanager
    def acting_as(self, function: str):
        import app
        with self._lock:
            self._stack.append(function)
            outer = {name: getattr(app, name) for name in self.CONTAINER}
            own = self._containers.setdefault(function, {"_STORE": None, "_QUEUE": None, "_ADMIN_TOKENS": None,
                                                         "_SOURCES": {}, "_AMOCRM_SECRET": None,
                                                         "_CONSOLE_LINKS": None})
            for name, value in own.items():
                setattr(app, name, value)
        try:
            yield
        finally:
            with self._lock:
                own.update({name: getattr(app, name) for name in self.CONTAINER})
                for name, value in outer.items():
                    setattr(app, name, value)
                self._stack.pop()


AMO_SECRET = "least-privilege-amocrm-secret-0123"
B24_TOKEN = "lp8w3e7r2t6y1u5i9o4p0a3s8d2f7g1h"
AMO_COUNTER, B24_COUNTER = 9393, 9494
AMO_CLIENT_ID, AMO_CLIENT_SECRET = "lp-amocrm-client-id", "least-privilege-amocrm-client-secret"
AMO_PUBLIC = "http://127.0.0.1:9"  # the app's public URL as amoCRM knows it
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
# Two versions in the SSM parameter's history: the authorizer reads the current one and, within the
# overlap after a rotation, the one before it (`name:<version>`).
OLD_TOKEN, NEW_TOKEN = "least-privilege-old-admin-token", "least-privilege-new-admin-token"


@pytest.fixture
def recorded(service_env, moto_url, monkeypatch, request):
    """The app as deployed (the admin token in SSM, no ADMIN_TOKEN) with the recorder on boto3's default
    session, so every client made from here on reports to it; the authorizer's calls recorded as `admin`."""
    import app
    from chalicelib.settings import get_settings
    parameter = policies.stage_settings("dev").admin_token_parameter
    monkeypatch.delenv("ADMIN_TOKEN")
    monkeypatch.setenv("ADMIN_TOKEN_PARAMETER", parameter)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", moto_url)
    ssm = boto3.client("ssm")
    for token in (OLD_TOKEN, NEW_TOKEN):
        ssm.put_parameter(Name=parameter, Value=token, Type="SecureString", Overwrite=True)
    # Installs from amoCRM: the client secret in SSM as deployed (no AMOCRM_CLIENT_SECRET override).
    ssm.put_parameter(Name=policies.stage_settings("dev").amocrm_client_secret_parameter, Value=AMO_CLIENT_SECRET,
                      Type="SecureString", Overwrite=True)
    monkeypatch.delenv("AMOCRM_CLIENT_SECRET", raising=False)
    monkeypatch.setenv("AMOCRM_CLIENT_ID", AMO_CLIENT_ID)
    monkeypatch.setenv("PUBLIC_URL", AMO_PUBLIC)
    amocrm = request.getfixturevalue("amocrm")
    monkeypatch.setenv("AMOCRM_SANDBOX_HOSTS", amocrm.url.split("://", 1)[1])
    monkeypatch.setenv("AMOCRM_AUTH_URL", amocrm.url + "/oauth")
    recorder = Recorder()
    session = boto3._get_default_session()
    recorder.register(session.events)
    get_settings.cache_clear()
    for cached in Recorder.CONTAINER:  # each function gets its own; the session's are put back at the end
        monkeypatch.setattr(app, cached, getattr(app, cached))
    authorize = app.admin.func

    def recorded_authorizer(auth_request):
        with recorder.acting_as("admin"):
            return authorize(auth_request)
    monkeypatch.setattr(app.admin, "func", recorded_authorizer)
    yield recorder
    recorder.unregister(session.events)
    monkeypatch.undo()
    get_settings.cache_clear()


class Stack:
    """The functions as AWS invokes them: routes through Chalice's test client (the authorizer
    included), the worker with SQS events (the event source's receive and delete are the test's, not the
    function's), the schedules with a Lambda context of their configured time."""

    def __init__(self, recorder: Recorder, client, monkeypatch) -> None:
        from app import on_events_message
        from chalicelib.settings import get_settings
        from sandbox.worker import WorkerLoop
        self.recorder, self.client, self.monkeypatch = recorder, client, monkeypatch
        self.sqs = boto3.client("sqs")
        settings = get_settings()
        self.events_url = self.sqs.get_queue_url(QueueName=settings.events_queue)["QueueUrl"]
        self.dead_url = self.sqs.get_queue_url(QueueName=settings.dead_letter_queue)["QueueUrl"]
        self.events_arn = self.sqs.get_queue_attributes(QueueUrl=self.events_url,
                                                        AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.failures: list[BaseException] = []

        def worker(event, context):
            with recorder.acting_as("on_events_message"):
                try:
                    return on_events_message(event, context)
                except BaseException as exc:  # the loop would only log it
                    self.failures.append(exc)
                    raise
        self.worker = worker
        self.loop = WorkerLoop(worker, settings.events_queue, sqs=self.sqs, wait_seconds=0)

    def api(self, method: str, path: str, body=None, *, headers=None):
        """A route's JSON answer, which must be a 200."""
        if headers is None:
            headers = {"Authorization": f"Bearer {NEW_TOKEN}", "Content-Type": "application/json"}
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        with self.recorder.acting_as("api_handler"):
            response = self.client.http.request(method, path, headers=headers, body=body or b"")
        assert response.status_code == 200, (method, path, response.status_code, response.body[:500])
        return response.json_body

    def drain(self) -> int:
        """Run the worker until the events queue is empty; the number of messages handled."""
        handled = self.loop.drain(idle_rounds=1)
        assert not self.failures, self.failures
        return handled

    def take(self) -> list[dict]:
        """Every message on the events queue, received and deleted by the test."""
        messages = []
        while got := self.sqs.receive_message(QueueUrl=self.events_url, MaxNumberOfMessages=10,
                                              AttributeNames=["All"]).get("Messages", []):
            messages += got
            self.sqs.delete_message_batch(QueueUrl=self.events_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])
        return messages

    def worker_batch(self, messages: list[dict], *, receive_count: int | None = None, seconds: float = 300) -> dict:
        """The worker's report on these messages as one SQS event, received for the `receive_count`th
        time, with `seconds` of the invocation left."""
        from chalice.local import LambdaContext
        from sandbox.worker import sqs_event
        if receive_count is not None:
            messages = [{**m, "Attributes": {**m.get("Attributes", {}), "ApproximateReceiveCount": str(receive_count)}}
                        for m in messages]
        return self.worker(sqs_event(messages, self.events_arn),
                           LambdaContext("on_events_message", memory_size=512, max_runtime_ms=int(seconds * 1000)))

    def schedule(self, name: str) -> dict:
        """A schedule's answer (the jobs it queued), fired now: EventBridge's `time` is the run id."""
        event = self.client.events.generate_cw_event(source="aws.events", detail_type="Scheduled Event", detail={},
                                                     resources=[], region="eu-central-1")
        event["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self.recorder.acting_as(name):
            return self.client.lambda_.invoke(name, event).payload

    def empty_dead_letters(self) -> None:
        while got := self.sqs.receive_message(QueueUrl=self.dead_url, MaxNumberOfMessages=10).get("Messages", []):
            self.sqs.delete_message_batch(QueueUrl=self.dead_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])


def test_each_function_calls_exactly_what_its_policy_grants(recorded, queue, metrika_sandbox, amocrm, bitrix,
                                                            monkeypatch):
    """Every function's code paths, then, per function and resource, in both stages: recorded ⊆ policy
    (nothing missing) and policy ⊆ recorded ∪ Lambda's own use (nothing unused)."""
    import app
    import chalicelib.crm.amocrm.source
    import chalicelib.crm.bitrix24.source
    import chalicelib.ingest
    import chalicelib.worker
    from chalice.test import Client
    from chalicelib.store.dynamodb import DynamoStore
    amo, b24 = f"lp-amo-{uuid.uuid4().hex[:8]}", f"lp-b24-{uuid.uuid4().hex[:8]}"
    # Knobs that change no call, only how long the test takes: retries come back at once (their delay is
    # random, 1-2 s for a first one); the CRMs' rate limits are not waited for (the shared limiter's
    # writes still happen); a webhook naming more than one entity is recorded whole in the inbox (more
    # than 10 in production), so a small mass action takes the large-body path.
    monkeypatch.setattr(chalicelib.worker.random, "uniform", lambda low, high: 0.0)
    monkeypatch.setattr(chalicelib.crm.amocrm.source, "MIN_INTERVAL", 0.001)
    monkeypatch.setattr(chalicelib.crm.bitrix24.source, "MIN_INTERVAL", 0.001)
    monkeypatch.setattr(amocrm, "rate_limit", 1000)
    monkeypatch.setattr(chalicelib.ingest, "INLINE_ENTITIES", 1)
    # The schedules walk every integration, and other tests leave theirs behind: ours only (the scan runs).
    listed = DynamoStore.list_integration_ids
    installed = f"amocrm-{amocrm.account_id}"
    monkeypatch.setattr(DynamoStore, "list_integration_ids",
                        lambda self: [i for i in listed(self) if i in (amo, b24, installed)])
    with Client(app.app, stage_name="dev") as client:
        stack = Stack(recorded, client, monkeypatch)
        stack.empty_dead_letters()
        try:
            every_path(stack, amocrm, bitrix, metrika_sandbox, amo, b24)
            bitrix24_app_path(stack, bitrix, recorded_ssm=boto3.client("ssm"), monkeypatch=monkeypatch)
        finally:
            stack.empty_dead_letters()
            queue.bodies()
    assert set(recorded.calls) == set(FUNCTIONS)  # each ran, and nothing ran as no function
    dev = policies.resources(policies.stage_settings("dev"))
    problems = {}
    for stage in STAGES:
        arns = policies.resources(policies.stage_settings(stage))
        in_stage = {dev[role]: arns[role] for role in dev}  # what the dev run named, as this stage names it
        for function in FUNCTIONS:
            called = {(action, in_stage.get(arn, arn)) for action, arn in recorded.calls[function]}
            granted = granted_pairs(json.loads((ROOT / ".chalice" / policies.policy_file(stage, function)).read_text()))
            lambda_own = {(a, arns[role]) for role, actions in EVENT_SOURCE.get(function, {}).items() for a in actions}
            lambda_own |= {(a, policies.log_group_arn(stage, function)) for a in LOG_ACTIONS}
            missing, unused = sorted(called - granted), sorted(granted - called - lambda_own)
            if missing or unused:
                problems[f"{stage} {function}"] = {"missing": missing, "unused": unused}
    assert problems == {}, json.dumps(problems, indent=1)


def every_path(stack: Stack, amocrm, bitrix, metrika_sandbox, amo: str, b24: str) -> None:
    """Each function's paths, in an order that leaves each one something to do. Every step asserts it
    did what it is there for, so a path that silently stops short cannot pass for one that ran."""
    from chalicelib.settings import get_settings
    from sandbox.amocrm import seed_demo
    from sandbox.bitrix24 import seed_demo as seed_portal
    amocrm.reset()
    demo = seed_demo(amocrm)
    lead_id = str(demo["lead_id"])
    more_leads = [amocrm.create_lead(f"Сделка {n}", 7001, 1002, price=100 + n, notify=False) for n in range(2)]
    bitrix.reset()
    portal = seed_portal(bitrix)
    for counter in (AMO_COUNTER, B24_COUNTER):
        metrika_sandbox.add_counter(counter, "Europe/Moscow")
    api = stack.api
    assert api("GET", "/health", headers={}) == {"status": "ok"}
    # Admin routes: integrations (amoCRM's time zone read from the counter), mappings, attributes.
    api("PUT", f"/integrations/{amo}", amo_config(amocrm))
    api("PUT", f"/integrations/{b24}", b24_config(bitrix))
    assert api("GET", f"/integrations/{amo}")["timezone"] == "Europe/Moscow"
    api("GET", f"/integrations/{amo}/status-mapping/defaults")
    api("POST", f"/integrations/{amo}/status-mapping/defaults")
    mapping = api("GET", f"/integrations/{amo}/status-mapping")
    api("PUT", f"/integrations/{amo}/status-mapping", {"entries": mapping["entries"]})
    api("PUT", f"/integrations/{amo}/attributes", {"entries": [
        {"crm_field": "752013", "entity": "order", "name": "lp_tracking", "type": "text"}]})
    assert len(api("GET", f"/integrations/{amo}/attributes")["entries"]) == 1
    # Webhooks: small bodies recorded at once, a mass action recorded whole in the inbox. (The Bitrix24
    # deal is one the portal does not have, its message taken off the queue unworked: the seeded deal
    # is left for the reconciliation below to find.)
    deal = bitrix.event_body("ONCRMDEALUPDATE", "777", B24_TOKEN)
    assert api("POST", f"/webhooks/bitrix24/{b24}", deal, headers=FORM)["queued"] == 1
    assert [json.loads(m["Body"])["integration_id"] for m in stack.take()] == [b24]
    hook = amocrm.webhook_body("leads", "update", amocrm._lead_form(amocrm.leads[demo["lead_id"]]))
    assert api("POST", f"/webhooks/amocrm/{amo}?secret={AMO_SECRET}", hook, headers=FORM)["queued"] == 1
    mass = amocrm.webhook_body_items("leads", "status", [amocrm._lead_form(lead, {"old_status_id": 1001})
                                                         for lead in more_leads])
    assert api("POST", f"/webhooks/amocrm/{amo}?secret={AMO_SECRET}", mass, headers=FORM)["deferred"] == 2
    # The worker: a delivery (CRM read, customers, a product new to the counter, uploads), the inbox
    # expanded into entity messages, then those delivered.
    assert stack.drain() == 4
    counter = metrika_sandbox.counter(AMO_COUNTER)
    assert set(counter.orders) == {lead_id, *(str(lead["id"]) for lead in more_leads)} and counter.products
    # Saving the amoCRM integration again makes the account record the delivery kept (its currency and
    # country) stale, so the next delivery reads the account again (`expire_account`: a write of the
    # state table, from the route).
    from chalicelib.crm.amocrm.account import account_scope
    assert store_as_the_test().get_crm_account(account_scope(amocrm.url))["read_at"] > 0
    api("PUT", f"/integrations/{amo}", amo_config(amocrm))
    assert store_as_the_test().get_crm_account(account_scope(amocrm.url))["read_at"] == 0
    # The catalogue by route (the delivery above met the deal's product first and sent it itself).
    api("POST", f"/integrations/{amo}/products/sync")
    # Reconcile, confirm and status by route (what the first two queue, the worker's and the schedules'
    # paths below cover). The three deals the webhooks delivered are listed, read in bulk, compared with
    # the CRM, and left alone.
    reconciled = api("POST", f"/integrations/{amo}/reconcile", {"since": 0})
    assert (reconciled["found"], reconciled["delivered"], reconciled["queued"]) == (3, 3, 0)
    assert api("POST", f"/integrations/{amo}/confirm", {})["passed"] >= 4
    api("GET", f"/integrations/{amo}/status")
    # The web console: the integrations page, a console link made, listed, used (the authorizer reads its
    # digest) and revoked.
    assert [i["integration_id"] for i in api("GET", "/integrations")["integrations"]] == sorted([amo, b24])
    link = api("POST", f"/integrations/{amo}/console-links", {"label": "lp"})
    assert api("GET", f"/integrations/{amo}/console-links")["links"][0]["link_id"] == link["link_id"]
    as_link = {"Authorization": f"Bearer {link['link'].split('#link=')[1]}"}
    assert api("GET", f"/integrations/{amo}/stages", headers=as_link)["stages"]
    assert api("DELETE", f"/integrations/{amo}/console-links/{link['link_id']}")["revoked"] == link["link_id"]
    # Replay of one deal queues it again. Short of time, the worker queues it back as it came; on the
    # message's last receive it flags the deal before any work, and Metrika refusing the upload sends it
    # back to the queue (a retry); the next batch delivers it.
    assert api("POST", f"/integrations/{amo}/replay", {})["replayed"] == 0
    assert api("POST", f"/integrations/{amo}/replay", {"kind": "order", "crm_id": lead_id})["queued"] == 1
    assert stack.worker_batch(stack.take(), seconds=15)["postponed"] == 1
    metrika_sandbox.set_faults(error_503=1.0, paths="/data/orders/")
    report = stack.worker_batch(stack.take(), receive_count=5)
    metrika_sandbox.set_faults()
    assert (report["dead_lettered"], report["retried"]) == (1, 1)
    assert stack.drain() == 1
    # History import: started by the API, its steps run by the worker.
    api("POST", f"/integrations/{amo}/backfill", {"since": "2020-01-01"})
    stack.drain()
    assert api("GET", f"/integrations/{amo}/backfill")["backfill"]["state"] == "done"
    api("POST", f"/integrations/{amo}/backfill/stop")
    # Dead letters: counted, and moved back to the events queue (the worker's part is above).
    stack.sqs.send_message(QueueUrl=stack.dead_url, MessageBody=json.dumps(
        {"integration_id": amo, "kind": "order", "crm_id": lead_id}, sort_keys=True))
    assert api("GET", "/dead-letters")["messages"] == 1
    assert api("POST", "/dead-letters/redrive", {})["moved"] == 1
    # The schedules queue a job per integration, which the worker runs. Reconciliation finds a deal
    # changed with no event and queues it; the same drain works on it (held: its stage is not mapped).
    # The amoCRM deals (a first run: its cursor dropped, so the listing reaches back to them) are
    # compared with what was delivered and left alone.
    bitrix.update_deal(portal["deal_id"], OPPORTUNITY="16990.00", notify=False)
    boto3.client("dynamodb").delete_item(TableName=get_settings().config_table, Key={  # the test's own call
        "pk": {"S": f"INTEGRATION#{amo}"}, "sk": {"S": "CURSOR#reconcile"}})
    assert store_as_the_test().get_entity(b24, "order", str(portal["deal_id"])) is None
    assert stack.schedule("reconcile_all")["queued"] == 2
    assert stack.drain() >= 3  # the two jobs and the deal (and what else the window held)
    found = store_as_the_test().get_entity(b24, "order", str(portal["deal_id"]))
    assert found["last_error"]["code"] == "unmapped_stage" and not found["dirty"]
    # Confirmation sends a FAILED upload again (its carried entities' list deleted), and records that it
    # read Metrika (the `confirm` cursor: a duplicate of the run reads nothing).
    failed = counter.uploadings[-1]["uploading_id"]
    metrika_sandbox.fail_uploading(failed)
    assert stack.schedule("confirm_uploads")["queued"] == 2
    assert stack.drain() >= 3
    uploads = {u["uploading_id"]: u for u in store_as_the_test().uploads(amo)}
    assert (uploads[failed]["status"], uploads[failed]["resent"]) == ("FAILED", 1)
    # Installing from amoCRM: the install routes read the client secret (SSM) and store the tokens (an
    # UpdateItem); the daily schedule queues a refresh job per integration, and the worker refreshes the
    # idle installed one (the lease and the new pair: UpdateItems; the client secret: SSM).
    installed = install_from_amocrm(stack, amocrm)
    db = boto3.client("dynamodb")  # the test's own write: tokens last refreshed 31 days ago
    db.update_item(TableName=get_settings().config_table, Key={"pk": {"S": f"INTEGRATION#{installed}"},
                                                               "sk": {"S": "TOKENS"}},
                   UpdateExpression="SET refreshed_at = :t", ExpressionAttributeValues={":t": {"N": "1"}})
    assert stack.schedule("refresh_tokens")["queued"] == 3
    assert stack.drain() >= 3
    assert amocrm.token_calls == ["authorization_code", "refresh_token"]
    api("DELETE", f"/integrations/{installed}")
    # Deleting an integration deletes its items in both tables (the smaller one: a call per item).
    api("DELETE", f"/integrations/{b24}")
    db = boto3.client("dynamodb")  # the test's own calls: outside every function, recorded nowhere
    for sort_key in ("CONFIG", "STATUS_MAPPING", "ATTRIBUTES"):  # no other test's schedule walks it
        db.delete_item(TableName=get_settings().config_table, Key={"pk": {"S": f"INTEGRATION#{amo}"},
                                                                   "sk": {"S": sort_key}})


def bitrix24_app_path(stack: Stack, bitrix, *, recorded_ssm, monkeypatch) -> None:
    """The Bitrix24 application: its install (the client secret from SSM, the tokens item written), the
    nudge, and the worker's drain with an expired access token (the refresh: the secret again, read in the
    worker's own container, and the tokens item's conditional writes)."""
    import chalicelib.bitrix24_app
    from chalicelib.bitrix24_app import integration_id_for
    from chalicelib.settings import get_settings
    settings = get_settings()
    monkeypatch.setenv("BITRIX24_OAUTH_URL", bitrix.url)
    monkeypatch.setenv("BITRIX24_CLIENT_ID", bitrix.client_id)
    monkeypatch.delenv("BITRIX24_CLIENT_SECRET", raising=False)
    get_settings.cache_clear()
    recorded_ssm.put_parameter(Name=get_settings().bitrix24_client_secret_parameter, Value=bitrix.client_secret,
                               Type="SecureString", Overwrite=True)
    monkeypatch.setattr(chalicelib.bitrix24_app, "_SECRET", {})  # each function reads it in its own container
    form = {**FORM, "Host": "127.0.0.1:9", "X-Forwarded-Proto": "http"}
    app_id = integration_id_for(bitrix.member_id)
    installed = stack.api("POST", "/install/bitrix24", bitrix.install_body(), headers=form)
    assert installed["integration_id"] == app_id and len(installed["bound"]) == 7
    shown = stack.api("GET", f"/integrations/{app_id}")
    stack.api("PUT", f"/integrations/{app_id}", {**shown, "counter_id": B24_COUNTER, "timezone": "Europe/Moscow",
                                                  "metrika_token": "y0_least_privilege_b24app"})
    bitrix.create_deal("Заказ LP", stage_id="NEW", opportunity="10.00")
    bitrix.expire_access_tokens()
    chalicelib.bitrix24_app._SECRET.clear()
    assert stack.api("POST", "/install/bitrix24/events", bitrix.app_event_body("ONOFFLINEEVENT"), headers=form)["queued"] == 1
    stack.drain()
    assert bitrix.offline == [] and sum(c["ok"] for c in bitrix.oauth_calls) == 2  # the install's and the worker's
    db = boto3.client("dynamodb")
    for sort_key in ("CONFIG", "TOKENS", "CURSOR#drain_nudge"):
        db.delete_item(TableName=settings.config_table, Key={"pk": {"S": f"INTEGRATION#{app_id}"}, "sk": {"S": sort_key}})


def store_as_the_test():
    """The stage's tables through a client of the test's own (recorded under no function)."""
    from chalicelib.settings import get_settings
    from chalicelib.store.dynamodb import DynamoStore
    settings = get_settings()
    return DynamoStore(boto3.client("dynamodb"), settings.config_table, settings.state_table,
                       quota_table=settings.quota_table)


def amo_config(amocrm) -> dict:
    # No time zone: PUT reads it from the counter (a Metrika call, through the quota table).
    return {"crm": "amocrm", "counter_id": AMO_COUNTER, "metrika_token": "y0_least_privilege_amo",
            "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "account_id": str(amocrm.account_id),
                           "webhook_secret": AMO_SECRET}}


def b24_config(bitrix) -> dict:
    return {"crm": "bitrix24", "counter_id": B24_COUNTER, "metrika_token": "y0_least_privilege_b24",
            "timezone": "Europe/Moscow",
            "connection": {"webhook_url": bitrix.webhook_url, "application_token": B24_TOKEN,
                           "member_id": bitrix.member_id, "domain": bitrix.domain}}


def install_from_amocrm(stack: Stack, amocrm) -> str:
    """`GET /install/amocrm`, the user's consent on the sandbox, and our redirect route: the installed id."""
    from urllib.parse import parse_qs, urlsplit
    amocrm.register_integration(client_id=AMO_CLIENT_ID, client_secret=AMO_CLIENT_SECRET,
                                redirect_uri=AMO_PUBLIC + "/oauth/amocrm")
    amocrm.token_calls.clear()
    with stack.recorder.acting_as("api_handler"):
        start = stack.client.http.get("/install/amocrm")
    assert start.status_code == 302, start.body
    location = {k.lower(): v for k, v in start.headers.items()}["location"]
    redirect = amocrm.consent_redirect(AMO_CLIENT_ID, parse_qs(urlsplit(location).query)["state"][0])
    with stack.recorder.acting_as("api_handler"):
        done = stack.client.http.get(redirect[len(AMO_PUBLIC):])
    assert done.status_code == 200 and done.json_body["webhook_registered"], done.body
    return done.json_body["installed"]
