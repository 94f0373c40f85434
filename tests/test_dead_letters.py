"""Dead letters come back (issue 14, item 8).

A message the worker fails on MAX_RECEIVE_COUNT receives goes to the dead-letter queue. On its last
receive the worker flags the entities it names (`dead_lettered_at`) before any work; whatever settles
the entity or queues it again clears the flag; the status page shows flagged entities, the sweep leaves
them to the operator, and `replay {}` or a redrive (route and command) brings them back.

The logic runs on the in-memory harness (tests/core.py); the path through SQS — moto_server applies the
redrive policy itself — runs on the session's moto_server with the sandbox worker loop."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from datetime import datetime, timezone
from urllib.parse import urlencode

import boto3
import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef, EntityRows
from chalicelib.errors import Permanent, Transient, Unavailable, reshape_chalice_error
from chalicelib.operations import DEAD_LETTERED_SHOWN, integration_status, redrive_limit, replay
from chalicelib.queue import BACKFILL, INBOX, MAX_RECEIVE_COUNT, REDRIVE_LIMIT, Received, message, received
from tests.conftest import AMO_SECRET, admin_headers, amocrm_config
from tests.core import Core, deal_rows

LAST = MAX_RECEIVE_COUNT


@pytest.fixture
def core(metrika_sandbox):
    return Core(metrika_sandbox.url)


def body(integration_id: str, crm_id: str, kind: str = ORDER) -> str:
    return json.dumps(message(integration_id, kind, crm_id), sort_keys=True)


def recorded(core: Core, shop: str, *crm_ids: str, kind: str = ORDER) -> None:
    """Entities recorded one by one (as reconciliation does); their messages taken off the queue (the tests hand
    the worker the receive they mean)."""
    core.ingest.record(shop, [EntityRef(kind, c, 1_789_990_000, "update") for c in crm_ids], origin="reconcile")
    core.queue.receive()


# --- the receive count ------------------------------------------------------------------------------

@pytest.mark.parametrize(("attributes", "count"), [
    ({"ApproximateReceiveCount": "5"}, 5), ({"ApproximateReceiveCount": "1"}, 1), ({"ApproximateReceiveCount": 7}, 7),
    ({}, 1), (None, 1), ({"ApproximateReceiveCount": "0"}, 1), ({"ApproximateReceiveCount": "-5"}, 1),
    ({"ApproximateReceiveCount": "five"}, 1), ({"ApproximateReceiveCount": "٥"}, 1),  # an Arabic-Indic digit
    ({"ApproximateReceiveCount": "9" * 2000}, 1), ({"ApproximateReceiveCount": True}, 1),
    ({"ApproximateReceiveCount": 5.0}, 1), ({"ApproximateReceiveCount": ["5"]}, 1), ("5", 1)])
def test_the_receive_count_is_read_from_the_record_or_taken_as_a_first_receive(attributes, count):
    record = {"body": "{}", "receiptHandle": "r", "attributes": attributes}
    assert received(record) == Received("{}", count)
    assert received(record).last_receive is (count >= MAX_RECEIVE_COUNT)
    assert received({"attributes": attributes}).body == ""  # a record without a body is a malformed message


# --- the worker flags on the last receive ----------------------------------------------------------

def test_the_last_receive_flags_the_entity_before_any_work(core):
    """The Lambda may die on this attempt too (timeout, memory): the flag must already be written when
    the CRM is asked. The store failing fails the batch, as before."""
    shop = core.integration()
    recorded(core, shop, "5")
    seen = []

    def dying(integration):
        seen.append(core.store.get_entity(shop, ORDER, "5").get("dead_lettered_at"))
        raise Unavailable("store", "drill")

    core.source.fail = dying
    with pytest.raises(Unavailable):
        core.worker.handle([Received(body(shop, "5"), LAST - 1)])
    assert seen == [None]  # not the last receive: no flag, no write
    with pytest.raises(Unavailable):
        core.worker.handle([Received(body(shop, "5"), LAST)])
    assert seen[1] == int(core.clock())
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is True and state["dead_lettered_at"] == int(core.clock())


def test_a_delivery_on_the_last_receive_clears_the_flag(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    recorded(core, shop, "5")
    report = core.worker.handle([Received(body(shop, "5"), LAST + 3)])  # SQS's count is approximate: ≥ counts
    assert (report.dead_lettered, report.uploaded) == (1, 1)
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is False and "dead_lettered_at" not in state
    assert "5" in metrika_sandbox.counter(core.counter_id).orders


@pytest.mark.parametrize("error", [Transient("amoCRM answered 503", source="amocrm", status=503),
                                   Permanent("amoCRM refused", source="amocrm", status=400)])
def test_a_retry_or_a_park_on_the_last_receive_clears_the_flag(core, error):
    """A retry queues a new message (its own five receives); a park settles the entity: either way the
    dead-letter queue no longer holds what the entity owes."""
    shop = core.integration()
    recorded(core, shop, "5")

    def failing(integration):
        raise error

    core.source.fail = failing
    report = core.worker.handle([Received(body(shop, "5"), LAST)])
    assert report.dead_lettered == 1 and (report.retried, report.parked) == ((1, 0) if error.retryable else (0, 1))
    state = core.store.get_entity(shop, ORDER, "5")
    assert "dead_lettered_at" not in state and state["dirty"] is error.retryable
    assert len(core.queue) == (1 if error.retryable else 0)


def test_only_an_entity_that_owes_a_delivery_is_flagged(core, metrika_sandbox):
    """A duplicate message's last receive, for a deal already delivered, flags nothing: the status page
    never shows a settled deal as dead-lettered. Messages that are not ours flag nothing either."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    recorded(core, shop, "5")
    core.worker.handle([body(shop, "5")])
    report = core.worker.handle([Received(body(shop, "5"), LAST), Received(body(shop, "nobody"), LAST),
                                 Received(body("no-such-integration", "5"), LAST), Received("not json", LAST),
                                 Received(json.dumps({"kind": ORDER, "integration_id": shop}), LAST)])
    assert report.dead_lettered == 0
    assert "dead_lettered_at" not in core.store.get_entity(shop, ORDER, "5")
    assert core.store.get_entity(shop, ORDER, "nobody") is None  # nothing created


def test_inbox_batches_and_import_steps_are_not_entity_flags(core, captured_logs):
    """A large body's batch stays in the inbox until expanded (the sweep queues it again), and an import
    step belongs to its job: neither names an entity to flag. Their last receive is logged."""
    shop = core.integration()
    report = core.worker.handle([Received(body(shop, "batch-1", INBOX), LAST), Received(body(shop, "run-1", BACKFILL), LAST)])
    assert report.dead_lettered == 0
    logged = [e for e in (json.loads(r.getMessage()) for r in captured_logs.records if r.name == "metrika_crm_bridge")
              if e["event"] == "last_receive"]
    assert {(e["kind"], e["crm_id"], e["receive_count"]) for e in logged} == {(INBOX, "batch-1", LAST),
                                                                             (BACKFILL, "run-1", LAST)}


def test_a_key_the_store_refuses_skips_only_its_flag(core, metrika_sandbox, monkeypatch):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    recorded(core, shop, "5", "6")
    real = core.store.mark_dead_lettered

    def refusing(integration_id, kind, crm_id):
        if crm_id == "6":
            raise ValueError("key too long")
        return real(integration_id, kind, crm_id)

    monkeypatch.setattr(core.store, "mark_dead_lettered", refusing)
    report = core.worker.handle([Received(body(shop, "6"), LAST), Received(body(shop, "5"), LAST)])
    assert report.dead_lettered == 1 and report.uploaded == 1  # the batch went on


def test_the_store_down_while_flagging_fails_the_batch_before_any_work(core, monkeypatch):
    shop = core.integration()
    recorded(core, shop, "5")

    def down(*args):
        raise Unavailable("store", "drill")

    monkeypatch.setattr(core.store, "mark_dead_lettered", down)
    with pytest.raises(Unavailable):
        core.worker.handle([Received(body(shop, "5"), LAST)])
    assert core.source.calls == []  # nothing was worked on
    # Unflagged, dirty and without a live lease once it runs out: the sweep still finds it.
    assert [e["crm_id"] for e in core.store.stuck_entities(shop, now=core.clock() + 3600)] == ["5"]


# --- the operator's side: status, sweep, replay ------------------------------------------------------

def dead_lettered(core: Core, shop: str, *crm_ids: str) -> None:
    """Entities whose message failed on its last receive (the Lambda died: nothing settled them)."""
    recorded(core, shop, *crm_ids)

    def dying(integration):
        raise Unavailable("store", "the Lambda timed out")

    core.source.fail = dying
    with pytest.raises(Unavailable):
        core.worker.handle([Received(body(shop, c), LAST) for c in crm_ids])
    core.source.fail = None


def test_the_status_page_shows_dead_lettered_entities_oldest_first(core):
    shop = core.integration()
    dead_lettered(core, shop, "7")
    core.clock.advance(60)
    dead_lettered(core, shop, *[str(100 + i) for i in range(DEAD_LETTERED_SHOWN + 4)])
    status = integration_status(core.store, shop, requests_today=None)
    shown = status["dead_lettered"]
    assert shown["count"] == DEAD_LETTERED_SHOWN + 5 and len(shown["entities"]) == DEAD_LETTERED_SHOWN
    assert shown["entities"][0] == {"kind": ORDER, "crm_id": "7", "dead_lettered_at": int(core.clock() - 60),
                                    "attempts": 0, "last_error": None}
    assert status["backlog"] == DEAD_LETTERED_SHOWN + 5 and status["failed_count"] == 0


def test_the_sweep_leaves_dead_letters_to_the_operator_and_replay_brings_them_back(core, metrika_sandbox):
    """Every receive of its message failed: the sweep does not feed it round again (a message that kills
    the Lambda would cost five invocations every ten minutes, with a batch of other deals each time).
    `replay {}` queues it — even while its old lease still looks live — and the delivery clears the flag."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5"), (ORDER, "6"): deal_rows("6", contact="12")}
    dead_lettered(core, shop, "5")
    core.ingest.record(shop, [EntityRef(ORDER, "6", 1_789_990_000, "update")], origin="amocrm")  # a live lease
    assert core.store.mark_dead_lettered(shop, ORDER, "6")  # its last receive began; the Lambda is still on it
    core.queue.receive()
    core.clock.advance(3600)
    assert core.ingest.reconcile(shop, core.source)["swept"] == 0 and len(core.queue) == 0
    assert replay(core.store, core.ingest.requeue, shop, {}) == {"replayed": 2, "dead_lettered": 2, "queued": 2}
    core.drain()
    for crm_id in ("5", "6"):
        state = core.store.get_entity(shop, ORDER, crm_id)
        assert state["dirty"] is False and "dead_lettered_at" not in state
    assert set(metrika_sandbox.counter(core.counter_id).orders) == {"5", "6"}
    assert integration_status(core.store, shop, requests_today=None)["dead_lettered"] == {"count": 0, "entities": []}


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_the_sweep_does_not_requeue_an_entity_whose_message_sqs_still_hides(core, stage):
    """The seam between the queue's visibility (6 x the worker's 300 s = 1800 s) and the sweep's claim
    grace: a worker that claimed an entity and then died leaves its message invisible for the whole
    visibility timeout, after which SQS hands it out again. A sweep in between that takes the claim for
    stale queues a second message for it: an entity that kills the Lambda then goes round on two, three
    messages at once, each failing a whole batch of other integrations' deals five times, instead of
    reaching its own fifth receive (and its dead-letter flag) once."""
    import json as json_
    from pathlib import Path
    from tools.infra import visibility_timeout
    config = json_.loads((Path(__file__).resolve().parent.parent / ".chalice" / "config.json").read_text())
    visibility = visibility_timeout(config, stage)
    shop = core.integration()
    recorded(core, shop, "5")

    def dying(integration):
        raise Unavailable("store", "the Lambda ran out of memory")

    core.source.fail = dying
    with pytest.raises(Unavailable):
        core.worker.handle([Received(body(shop, "5"), 1)])  # claimed, then the invocation died
    assert core.source.calls  # it was claimed and read
    core.clock.advance(visibility - 1)  # SQS still hides the message: it comes back by itself
    assert core.ingest.reconcile(shop, core.source)["swept"] == 0 and len(core.queue) == 0
    core.clock.advance(visibility)  # long after the redelivery was due: the message is gone, sweep it
    assert core.ingest.reconcile(shop, core.source)["swept"] == 1


def test_replaying_one_named_dead_lettered_entity_queues_it(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(CONTACT, "11"): EntityRows(contacts=[{"uniq_id": "11", "name": "Иван"}])}
    recorded(core, shop, "11", kind=CONTACT)

    def dying(integration):
        raise Unavailable("store", "the Lambda timed out")

    core.source.fail = dying
    with pytest.raises(Unavailable):
        core.worker.handle([Received(body(shop, "11", CONTACT), LAST)])
    core.source.fail = None
    answer = replay(core.store, core.ingest.requeue, shop, {"kind": "contact", "crm_id": "11"})
    assert answer == {"replayed": 1, "dead_lettered": 1, "queued": 1}
    core.drain()
    assert "11" in metrika_sandbox.counter(core.counter_id).contacts
    assert "dead_lettered_at" not in core.store.get_entity(shop, CONTACT, "11")


def test_a_last_receive_postponed_for_lack_of_time_is_not_left_flagged(core, metrika_sandbox):
    """The seam between the deadline and the dead-letter flag: a message on its last receive is flagged
    before any work, then its group is not started for lack of time and goes back to the queue as a new
    message. The batch succeeds, so nothing reaches the dead-letter queue: the flag must go with the
    re-send, or the status page lists a deal that is on its way and `replay {}` drops its live lease and
    queues it twice. A flag written by an earlier, really dead-lettered message stays."""
    from chalicelib import deadline
    from chalicelib.worker import GROUP_SECONDS, RESERVE_SECONDS
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5"), (ORDER, "6"): deal_rows("6", contact="12")}
    dead_lettered(core, shop, "6")  # its message is in the dead-letter queue
    recorded(core, shop, "5")
    with deadline.invocation(GROUP_SECONDS - 1 + RESERVE_SECONDS, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle([Received(body(shop, "5"), LAST), Received(body(shop, "6"), 2)])
    assert (report.dead_lettered, report.postponed, report.uploaded) == (1, 2, 0)
    assert [m for m, _ in core.queue.sent[-2:]] == [message(shop, ORDER, "5"), message(shop, ORDER, "6")]
    assert "dead_lettered_at" not in core.store.get_entity(shop, ORDER, "5")
    assert "dead_lettered_at" in core.store.get_entity(shop, ORDER, "6")
    shown = integration_status(core.store, shop, requests_today=None)["dead_lettered"]
    assert [e["crm_id"] for e in shown["entities"]] == ["6"]
    core.drain()  # the re-sent messages, with time: both delivered, no flag left
    for crm_id in ("5", "6"):
        state = core.store.get_entity(shop, ORDER, crm_id)
        assert state["dirty"] is False and "dead_lettered_at" not in state


# --- the redrive route's body, and Chalice's own answers ---------------------------------------------

@pytest.mark.parametrize(("given", "limit"), [(None, REDRIVE_LIMIT), ({}, REDRIVE_LIMIT), ({"limit": 1}, 1),
                                              ({"limit": REDRIVE_LIMIT}, REDRIVE_LIMIT)])
def test_the_redrive_limit(given, limit):
    assert redrive_limit(given) == limit


@pytest.mark.parametrize("given", [[], "10", {"limit": 0}, {"limit": -1}, {"limit": REDRIVE_LIMIT + 1},
                                   {"limit": True}, {"limit": "10"}, {"limit": 2.5}, {"limit": 10**40},
                                   {"limit": None}, {"limit": 5, "queue": "other"}])
def test_a_bad_redrive_body_is_a_400(given):
    from chalicelib.errors import ApiError
    with pytest.raises(ApiError) as refused:
        redrive_limit(given)
    assert refused.value.status == 400 and refused.value.error == "invalid_request"
    assert "limit" in refused.value.message


def test_chalices_own_error_bodies_are_reshaped_and_ours_pass_unchanged():
    assert reshape_chalice_error(415, {"Code": "UnsupportedMediaType", "Message": "Unsupported media type: text/plain"}) == {
        "error": "unsupported_media_type", "details": {"header": "Content-Type"},
        "message": "the Content-Type header is not one this route takes (Unsupported media type: text/plain)"}
    assert reshape_chalice_error(405, {"Code": "MethodNotAllowedError", "Message": "Unsupported method: PATCH"})[
        "error"] == "method_not_allowed"
    assert reshape_chalice_error(500, {"Code": "InternalServerError", "Message": "An internal server error occurred."},
                                 request_id="req-1") == {
        "error": "internal_error", "request_id": "req-1", "message": "an unexpected error occurred (request id req-1)"}
    assert reshape_chalice_error(409, {"Code": "ConflictError", "Message": "x"})["error"] == "conflict"
    for ours in ({"error": "invalid_request", "message": "m"}, {"Code": "X", "Message": "m", "extra": 1}, [], "text", None):
        assert reshape_chalice_error(400, ours) is None


# --- over SQS (moto_server) --------------------------------------------------------------------------

class DyingSource:
    """A CRM source whose snapshot fails the whole batch while `dying` (what a Lambda timeout does to a
    batch), else answers from `rows`."""

    def __init__(self):
        self.dying = True
        self.rows = {}

    def snapshot(self, integration, mapping, refs, attributes=()):
        if self.dying:
            raise Unavailable("store", "the Lambda timed out")
        return {(r.kind, r.crm_id): self.rows[(r.kind, r.crm_id)] for r in refs if (r.kind, r.crm_id) in self.rows}

    def changed_since(self, integration, since):
        return []


@pytest.fixture
def sqs(service_env):
    return boto3.client("sqs")


@pytest.fixture
def dlq(sqs, queue):
    """The dead-letter queue, emptied before and after the test (the session shares it)."""
    from chalicelib.settings import get_settings
    url = sqs.get_queue_url(QueueName=get_settings().dead_letter_queue)["QueueUrl"]

    def drain():
        while messages := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
            sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                            for i, m in enumerate(messages)])
    drain()
    yield url
    drain()


@pytest.fixture
def shop(app_client, integration_id):
    import app
    response = app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                                   body=json.dumps(amocrm_config(timezone="Europe/Moscow", counter_id=5160)))
    assert response.status_code == 200, response.body
    app._SOURCES["amocrm"] = source = DyingSource()
    source.rows = {(ORDER, "5"): EntityRows(
        contacts=[{"uniq_id": "c-5", "name": "Иван", "phones": ["+7 916 123-45-67"]}],
        orders=[{"id": "5", "client_uniq_id": "c-5", "order_status": "PAID", "revenue": 15990,
                 "create_date_time": datetime(2026, 11, 1, 7, 0, tzinfo=timezone.utc)}])}
    return integration_id, source


@pytest.fixture
def sandbox_worker(sqs, service_env):
    """The local worker loop; a failed batch is visible again at once (the test does not wait out the
    queue's visibility timeout), so five failures take milliseconds."""
    from app import on_events_message
    from chalicelib.settings import get_settings
    from sandbox.worker import WorkerLoop
    events = sqs.get_queue_url(QueueName=get_settings().events_queue)["QueueUrl"]

    def visible_again(messages):
        sqs.change_message_visibility_batch(QueueUrl=events, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0} for i, m in enumerate(messages)])
    return WorkerLoop(on_events_message, get_settings().events_queue, wait_seconds=0, on_failure=visible_again)


def dead_letter_a_deal(app_client, shop, sandbox_worker, sqs, dlq):
    integration_id, _ = shop
    hook = urlencode({"account[id]": "32427762", "leads[status][0][id]": "5", "leads[status][0][last_modified]": "1790000000"})
    answer = app_client.http.post(f"/webhooks/amocrm/{integration_id}?secret={AMO_SECRET}", body=hook.encode(),
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 200 and answer.json_body["queued"] == 1
    for _ in range(MAX_RECEIVE_COUNT + 1):  # five failed receives; on the sixth SQS moves the message
        assert sandbox_worker.run_once() == 0
    waiting = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])
    assert waiting["Attributes"]["ApproximateNumberOfMessages"] == "1"


def test_a_message_failing_five_times_is_flagged_shown_and_redriven_back(app_client, shop, sandbox_worker, sqs, dlq,
                                                                        metrika_sandbox):
    from app import get_store
    integration_id, source = shop
    dead_letter_a_deal(app_client, shop, sandbox_worker, sqs, dlq)
    state = get_store().get_entity(integration_id, ORDER, "5")
    assert state["dirty"] is True and state["dead_lettered_at"] > 0
    status = app_client.http.get(f"/integrations/{integration_id}/status", headers=admin_headers()).json_body
    assert status["dead_lettered"]["count"] == 1 and status["dead_lettered"]["entities"][0]["crm_id"] == "5"
    swept = app_client.http.post(f"/integrations/{integration_id}/reconcile", headers=admin_headers(), body="{}")
    assert swept.status_code == 200 and swept.json_body["swept"] == 0  # left to the operator
    counted = app_client.http.get("/dead-letters", headers=admin_headers())
    assert counted.status_code == 200 and counted.json_body == {"messages": 1, "in_flight": 0}
    assert app_client.http.post("/dead-letters/redrive", headers=admin_headers(),
                                body='{"limit": 0}').json_body["error"] == "invalid_request"
    assert app_client.http.get("/dead-letters").status_code == 401  # an admin route like the others
    source.dying = False  # the cause is fixed
    moved = app_client.http.post("/dead-letters/redrive", headers=admin_headers(), body="{}")
    assert moved.status_code == 200 and moved.json_body == {"moved": 1, "remaining": 0, "failed": 0}
    assert sandbox_worker.drain() == 1
    assert metrika_sandbox.counter(5160).orders["5"]["order_status"] == "PAID"
    state = get_store().get_entity(integration_id, ORDER, "5")
    assert state["dirty"] is False and "dead_lettered_at" not in state
    status = app_client.http.get(f"/integrations/{integration_id}/status", headers=admin_headers()).json_body
    assert status["dead_lettered"] == {"count": 0, "entities": []}


def test_replay_brings_a_dead_letter_back_and_a_later_redrive_sends_nothing_twice(app_client, shop, sandbox_worker,
                                                                                sqs, dlq, metrika_sandbox):
    from app import get_store
    integration_id, source = shop
    dead_letter_a_deal(app_client, shop, sandbox_worker, sqs, dlq)
    source.dying = False
    replayed = app_client.http.post(f"/integrations/{integration_id}/replay", headers=admin_headers(), body="{}")
    assert replayed.json_body == {"replayed": 1, "dead_lettered": 1, "queued": 1}
    assert sandbox_worker.drain() == 1
    assert "dead_lettered_at" not in get_store().get_entity(integration_id, ORDER, "5")
    uploads = len(metrika_sandbox.requests)
    # The old message is still in the dead-letter queue: brought back too, it finds the deal delivered.
    from tools.dead_letters import main
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["redrive", "--stage", "dev"]) == 0
    assert json.loads(out.getvalue().splitlines()[-1]) == {"moved": 1, "remaining": 0, "failed": 0}
    assert sandbox_worker.drain() == 1
    assert len(metrika_sandbox.requests) == uploads  # nothing sent twice
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["count", "--stage", "dev"]) == 0
    assert json.loads(out.getvalue()) == {"messages": 0, "in_flight": 0}


def test_a_redrive_moves_no_more_than_its_limit_and_says_what_remains(sqs, dlq, queue):
    from chalicelib.queue import DeadLetterQueue
    from chalicelib.settings import get_settings
    settings = get_settings()
    for start in (0, 10):
        sqs.send_message_batch(QueueUrl=dlq, Entries=[{"Id": str(i), "MessageBody": f'{{"n": {i}}}'}
                                                      for i in range(start, min(start + 10, 13))])
    dead = DeadLetterQueue(sqs, settings.dead_letter_queue, settings.events_queue)
    assert dead.redrive(limit=12) == {"moved": 12, "remaining": 1, "failed": 0}
    assert dead.redrive(seconds=0) == {"moved": 0, "remaining": 1, "failed": 0}  # out of time: starts no round
    assert dead.redrive() == {"moved": 1, "remaining": 0, "failed": 0}
    assert dead.redrive() == {"moved": 0, "remaining": 0, "failed": 0}  # empty: no receive at all
    assert sorted(b["n"] for b in queue.bodies()) == list(range(13))


def test_the_dead_letter_queue_missing_is_unavailable(sqs):
    from chalicelib.queue import DeadLetterQueue
    with pytest.raises(Unavailable):
        DeadLetterQueue(sqs, "no-such-queue-dlq", "no-such-queue").count()


def test_chalices_own_answers_reach_the_client_in_our_shape(app_client):
    wrong_type = app_client.http.post("/webhooks/amocrm/shop?secret=x", body=b"{}",
                                      headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    assert wrong_type.json_body["error"] == "unsupported_media_type"
    assert wrong_type.json_body["details"] == {"header": "Content-Type"} and "Code" not in wrong_type.json_body
    wrong_method = app_client.http.request("PATCH", "/health")
    assert wrong_method.status_code == 405 and wrong_method.json_body["error"] == "method_not_allowed"
    assert app_client.http.get("/health").json_body == {"status": "ok"}  # our own answers pass unchanged
