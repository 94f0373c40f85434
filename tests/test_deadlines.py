"""Deadlines (issue 14, items 2 and 3): every invocation knows how long it may still run; outbound calls
are clipped to it, work units start only with time to finish, and what was not started is queued again.

Logic on the in-memory store and queue with a fake clock (the deadline reads the same clock); wire
behaviour against loopback servers: the Metrika sandbox, and a listener that accepts connections and
never answers (a stalled Metrika or CRM). No test waits longer than a fraction of a second."""
from __future__ import annotations

import json
import socket
import time

import pytest

from chalicelib import deadline
from chalicelib.backfill import START_SECONDS, UPLOAD_SECONDS
from chalicelib.crm import CONTACT, ORDER, BackfillPage, EntityRef, EntityRows, slot_waiter
from chalicelib.crm.amocrm.api import AmoCrmClient
from chalicelib.crm.bitrix24.api import Bitrix24Client
from chalicelib.errors import OutOfTime, Transient, http_error
from chalicelib.ingest import INBOX_SECONDS
from chalicelib.metrika.client import MetrikaClient
from chalicelib.metrika.governor import QuotaGovernor, quota_key
from chalicelib.queue import BACKFILL, INBOX, message
from chalicelib.store.memory import MemoryStore
from chalicelib.worker import GROUP_SECONDS, RESERVE_SECONDS
from sandbox.httpserver import Reply, SandboxServer
from tests.core import Clock, Core, deal_rows


@pytest.fixture
def stalled_url():
    """A loopback listener that never accepts: the kernel completes the TCP handshake from the backlog,
    the request is sent, and no answer ever comes — a Metrika or a CRM that stalls."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.fixture
def answering_503():
    """A loopback server answering every amoCRM or Bitrix24 call with a 503, counting the calls."""
    server = SandboxServer()
    server.calls = 0

    def unavailable(request):
        server.calls += 1
        return Reply(503, {"error": "INTERNAL_SERVER_ERROR", "error_description": "maintenance"})

    server.route("GET", r"/api/v4/leads", unavailable)
    server.route("POST", r"/rest/1/code/crm\.deal\.get\.json", unavailable)
    server.start()
    yield server
    server.stop()


# --- the deadline itself (pure) ---------------------------------------------------------------------------

def test_without_a_deadline_nothing_is_clipped_or_refused():
    assert deadline.current() is None and deadline.remaining() is None and deadline.usable() is None
    assert deadline.clip((3.05, 30.0), source="metrika", what="Metrika") == (3.05, 30.0)
    assert deadline.has(10_000) and deadline.allows(10_000)


def test_clip_keeps_the_reserve_and_refuses_a_call_it_could_not_finish():
    clock = Clock()
    with deadline.invocation(30, reserve=10, clock=clock):
        assert deadline.remaining() == 30 and deadline.usable() == 20
        assert deadline.clip((3.05, 10.0), source="metrika", what="Metrika") == (3.05, 10.0)  # fits: unchanged
        assert deadline.clip((3.05, 30.0), source="metrika", what="Metrika") == (3.05, 20 - 3.05)
        assert deadline.clip(45.0, source="amocrm", what="amoCRM") == 20
        clock.advance(18.5)  # 1.5 s left for calls: split, half at most to connect
        assert deadline.clip((3.05, 30.0), source="metrika", what="Metrika") == (0.75, 0.75)
        assert not deadline.has(GROUP_SECONDS) and not deadline.allows(1.0) and deadline.allows(0.5)
        clock.advance(1.0)
        with pytest.raises(OutOfTime) as raised:
            deadline.clip((3.05, 30.0), source="metrika", what="Metrika")
    error = raised.value
    assert isinstance(error, Transient) and error.retryable and not error.counts_attempt
    assert error.source == "metrika" and "no time left in this invocation to call Metrika" in error.message
    assert deadline.current() is None  # the block's deadline ends with it


def test_a_year_2100_deadline_or_one_long_past_behaves():
    clock = Clock()
    with deadline.invocation(4_102_444_800, reserve=10, clock=clock):  # seconds up to 2100: just a long time
        assert deadline.clip((3.05, 30.0), source="metrika", what="Metrika") == (3.05, 30.0)
    with deadline.invocation(-5, reserve=10, clock=clock):  # a context already past its end
        assert deadline.remaining() == -5 and not deadline.has(0)
        with pytest.raises(OutOfTime, match=r"\(0\.0 s left for calls\)"):
            deadline.clip(1.0, source="bitrix24", what="Bitrix24")


def test_narrowed_only_shortens_and_nested_deadlines_restore_the_outer_one():
    clock = Clock()
    with deadline.invocation(100, reserve=10, clock=clock):
        with deadline.narrowed(30):
            assert deadline.usable() == 30 and deadline.remaining() == 100  # only the calls' window
            with deadline.narrowed(500):
                assert deadline.usable() == 30  # never lengthened
        assert deadline.usable() == 90
        with pytest.raises(RuntimeError):
            with deadline.invocation(5, clock=clock):
                raise RuntimeError("boom")
        assert deadline.usable() == 90  # restored after an exception too
    with deadline.narrowed(1):
        assert deadline.current() is None  # nothing to narrow


def test_the_api_budget_counts_from_when_api_gateway_received_the_request():
    now = 1_790_000_000.0
    assert deadline.api_seconds(lambda_remaining=None, received_at=None, now=now) == 28.0
    assert deadline.api_seconds(lambda_remaining=27.9, received_at=now - 3.5, now=now) == pytest.approx(24.5)
    assert deadline.api_seconds(lambda_remaining=10.0, received_at=now, now=now) == 10.0  # the Lambda ends first
    # Clocks that disagree: a request "from the future" costs nothing; one "from 1970" (or any older
    # than the authorizer and a cold start together can explain) costs at most MAX_REQUEST_AGE.
    assert deadline.api_seconds(lambda_remaining=None, received_at=now + 60, now=now) == 28.0
    assert deadline.api_seconds(lambda_remaining=None, received_at=0.0, now=now) == 28.0 - deadline.MAX_REQUEST_AGE


def test_an_out_of_time_error_answers_504_naming_what_did_not_answer():
    error = http_error("could not read the counter's time zone",
                       deadline.cut_short((0.6, 0.6), source="metrika", what="Metrika"))
    assert error.status == 504 and error.error == "timeout"
    assert error.message.startswith("could not read the counter's time zone: Metrika did not answer within the 1.2 s")
    assert error.details["source"] == "metrika" and error.details["retryable"] is True


# --- outbound calls clip -----------------------------------------------------------------------------------

def test_a_metrika_call_cut_short_by_the_deadline_is_retried_without_an_attempt(stalled_url):
    """The group starts with just enough time (60 s for calls), its CRM read takes 58.8 of them: the
    upload gets the 1.2 s left, Metrika does not answer, and the entity waits for another invocation,
    its attempts untouched."""
    core = Core(stalled_url)
    shop = core.integration()
    core.source.rows[(ORDER, "5")] = deal_rows("5")
    core.source.fail = lambda integration: core.clock.advance(58.8)  # a slow CRM, on the fake clock
    core.ingest.record(shop, [EntityRef(ORDER, "5", int(core.clock.now), "update")], origin="amocrm")
    started = time.monotonic()
    with deadline.invocation(GROUP_SECONDS + RESERVE_SECONDS, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle(core.queue.receive())
    assert time.monotonic() - started < 2.0  # 0.6 s to connect at most, 0.6 s to read
    assert report.retried == 1 and report.uploaded == 0 and report.failed_groups == 0
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] and state["attempts"] == 0
    assert state["last_error"]["source"] == "metrika"
    assert "Metrika did not answer within the 1.2 s left in this invocation" in state["last_error"]["message"]
    assert core.queue.sent[-1][0] == message(shop, ORDER, "5")  # queued again, with its backoff


def test_a_metrika_timeout_of_its_own_still_counts_an_attempt(stalled_url):
    """The contrast: no deadline, the client's own (short) timeout runs out — Metrika's failure."""
    core = Core(stalled_url)
    core.metrika_for = lambda integration: MetrikaClient(integration["metrika_token"], stalled_url, timeout=(0.2, 0.3))
    core.worker = type(core.worker)(core.store, core.queue, core.metrika_for, core.sources, clock=core.clock)
    shop = core.integration()
    core.source.rows[(ORDER, "5")] = deal_rows("5")
    core.ingest.record(shop, [EntityRef(ORDER, "5", int(core.clock.now), "update")], origin="amocrm")
    report = core.worker.handle(core.queue.receive())
    state = core.store.get_entity(shop, ORDER, "5")
    assert report.retried == 1 and state["attempts"] == 1
    assert state["last_error"]["message"] == "Metrika did not answer in time: ReadTimeout"


def test_no_quick_retry_of_an_answered_503_without_the_time_for_it(metrika_sandbox):
    metrika_sandbox.set_faults(error_503=1.0)
    client = MetrikaClient("y0_deadline", metrika_sandbox.url, sleep=lambda seconds: None)
    with pytest.raises(Transient):
        client.get_order_statuses(7)
    assert len(metrika_sandbox.requests) == 2  # the quick retry, with time
    metrika_sandbox.reset()
    metrika_sandbox.set_faults(error_503=1.0)
    with deadline.invocation(11.2, reserve=10):  # 1.2 s: not enough for a pause and another call
        with pytest.raises(Transient) as raised:
            client.get_order_statuses(7)
    assert len(metrika_sandbox.requests) == 1
    assert raised.value.counts_attempt  # Metrika did fail: this one counts


def test_the_wait_for_a_metrika_slot_ends_with_the_invocations_time():
    """Three requests in flight for the token: the governor would wait 30 s for a slot, but the
    invocation leaves 5 s for calls, so it waits 4 (one second kept for the call) and says why."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    for owner in ("a", "b", "c"):
        assert store.acquire_lease(quota_key("y0_busy"), 3, owner, clock(), 90.0) is not None
    governor = QuotaGovernor(store, "y0_busy", clock=clock, sleep=clock.advance)
    with deadline.invocation(15, reserve=10, clock=clock):
        with pytest.raises(OutOfTime, match="no Metrika request slot came free in the 4.0 s"):
            with governor.request():
                pass
    assert clock.now - Clock().now == pytest.approx(4.0, abs=0.21)
    start = clock.now
    with pytest.raises(Transient) as raised:  # without a deadline: the governor's own 30 s, an attempt
        with governor.request():
            pass
    assert not isinstance(raised.value, OutOfTime) and clock.now - start == pytest.approx(30.0, abs=0.21)
    assert governor.used_today() == 0  # no request of the day's budget spent on either


def test_a_crm_call_cut_short_by_the_deadline_is_out_of_time_not_a_crm_failure(stalled_url):
    started = time.monotonic()
    with deadline.invocation(11.2, reserve=10):
        with pytest.raises(OutOfTime, match="amoCRM did not answer within the 1.2 s") as amo:
            AmoCrmClient(stalled_url, "t", attempts=4, backoff=0.01).leads(["1"])
        with pytest.raises(OutOfTime):
            Bitrix24Client(stalled_url + "/rest/1/code/", attempts=4, backoff=0.01).deal("1")
    assert amo.value.source == "amocrm" and not amo.value.counts_attempt
    assert time.monotonic() - started < 4.0  # one clipped attempt each, not four of 15 s


def test_a_crm_retry_the_deadline_leaves_no_time_for_raises_the_crms_failure(answering_503):
    with deadline.invocation(11.5, reserve=10):  # time for one call, not for a pause and a second
        with pytest.raises(Transient, match="503") as amo:
            AmoCrmClient(answering_503.url, "t", attempts=4, backoff=0.6).leads(["1"])
        with pytest.raises(Transient, match="503") as bitrix:
            Bitrix24Client(answering_503.url + "/rest/1/code/", attempts=4, backoff=0.6).deal("1")
    assert answering_503.calls == 2  # one each
    assert amo.value.counts_attempt and bitrix.value.counts_attempt and not isinstance(amo.value, OutOfTime)


def test_the_crm_rate_limit_wait_is_not_started_past_the_deadline():
    waiter = slot_waiter(lambda scope, interval, now: now + 5.0, "amocrm:abc", 0.2)
    with deadline.invocation(13, reserve=10):
        started = time.monotonic()
        with pytest.raises(OutOfTime, match="wait 5.0 s for amocrm's rate limit"):
            waiter()
        assert time.monotonic() - started < 0.5  # refused at once, not after sleeping


# --- the worker: units of work start only with time --------------------------------------------------------

def test_a_worker_short_of_time_requeues_the_groups_it_did_not_start(metrika_sandbox):
    """Three integrations in one batch; each CRM read takes 30 s (fake clock). With 90 s for calls the
    first two start (90, then 60 s left), the third does not (30 < GROUP_SECONDS): its message goes back
    as it came, its queue lease untouched, no attempt counted, and the batch succeeds. One group at a
    time (threads=1), as the fake clock's 30 s per read assumes; side by side: test_fanout.py."""
    core = Core(metrika_sandbox.url, threads=1)
    ids = [core.integration(name) for name in ("alpha", "bravo", "charlie")]
    for number, integration_id in enumerate(ids, 1):
        core.source.rows[(ORDER, str(number))] = deal_rows(str(number), contact=f"1{number}")
        core.ingest.record(integration_id, [EntityRef(ORDER, str(number), int(core.clock.now), "add")], origin="amocrm")
    lease_before = core.store.get_entity("charlie", ORDER, "3")["queued_until"]
    core.source.fail = lambda integration: core.clock.advance(30)
    sent_before = len(core.queue.sent)
    with deadline.invocation(90 + RESERVE_SECONDS, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle(core.queue.receive())
    assert report.uploaded == 2 and report.postponed == 1 and report.retried == 0
    assert core.source.calls == [[(ORDER, "1")], [(ORDER, "2")]]
    assert core.queue.sent[sent_before:] == [(message("charlie", ORDER, "3"), 0)]
    untouched = core.store.get_entity("charlie", ORDER, "3")
    assert untouched["dirty"] and untouched.get("attempts", 0) == 0 and untouched["queued_until"] == lease_before
    assert not core.store.get_entity("alpha", ORDER, "1")["dirty"]
    core.source.fail = None
    core.drain()  # the next invocation, with time
    assert not core.store.get_entity("charlie", ORDER, "3")["dirty"]
    assert "3" in metrika_sandbox.counter(core.counter_id).orders


def test_a_crashed_group_retried_one_by_one_stops_when_time_runs_short(metrika_sandbox):
    core = Core(metrika_sandbox.url)
    shop = core.integration()
    refs = [EntityRef(ORDER, str(n), int(core.clock.now), "add") for n in range(1, 5)]
    for ref in refs:
        core.source.rows[(ORDER, ref.crm_id)] = deal_rows(ref.crm_id)
    core.ingest.record(shop, refs, origin="amocrm")

    def crash_then_slow(integration):
        if len(core.source.calls) == 1:
            raise KeyError("a CRM answer nobody foresaw")  # the whole group crashes once
        core.clock.advance(30)
    core.source.fail = crash_then_slow
    with deadline.invocation(95 + RESERVE_SECONDS, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle(core.queue.receive())
    assert report.failed_groups == 1 and report.uploaded == 2 and report.postponed == 2
    assert [m for m, _ in core.queue.sent[-2:]] == [message(shop, ORDER, "3"), message(shop, ORDER, "4")]
    assert all(core.store.get_entity(shop, ORDER, n).get("attempts", 0) == 0 for n in ("3", "4"))


def test_a_history_import_step_is_not_started_without_time_for_its_upload(metrika_sandbox):
    core = Core(metrika_sandbox.url, sources={})
    core.sources["amocrm"] = PagedSource(core.clock)
    shop = core.integration()
    core.backfill.start(shop, {"since": int(core.clock.now) - 86400})
    bodies = core.queue.receive()
    with deadline.invocation(START_SECONDS - 1 + RESERVE_SECONDS, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle(bodies)
    job = core.store.get_backfill(shop)
    assert report.postponed == 1 and report.backfill_steps == 0 and core.sources["amocrm"].pages == 0
    assert job["steps"] == 0 and job["attempts"] == 0 and job["error"] is None
    assert core.queue.sent[-1] == (message(shop, BACKFILL, f"{job['run_id']}:0"), 0)  # the same step again


def test_inbox_batches_are_not_expanded_without_time(metrika_sandbox):
    core = Core(metrika_sandbox.url)
    shop = core.integration()
    result = core.ingest.record(shop, [EntityRef(ORDER, str(n), int(core.clock.now), "add") for n in range(30)],
                                origin="amocrm")
    assert result["deferred"] == 30
    bodies = core.queue.receive()
    batch_id = json.loads(bodies[0])["crm_id"]
    with deadline.invocation(INBOX_SECONDS - 1 + RESERVE_SECONDS, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle(bodies)
    assert report.expanded == 0 and report.postponed == 1
    assert core.queue.sent[-1] == (message(shop, INBOX, batch_id), 0)
    assert core.store.get_inbox(shop, batch_id) is not None  # still recorded: nothing is lost
    assert core.store.get_entity(shop, ORDER, "0") is None


# --- the history import's reading leaves time for its upload ---------------------------------------------

class PagedSource:
    """A CRM whose every history page takes `seconds` (fake clock) and holds 5 contacts; pages never
    end. `cut_at`: the page (1-based) whose read the deadline cuts short."""

    def __init__(self, clock, seconds=10.0, cut_at=None):
        self.clock, self.seconds, self.cut_at, self.pages = clock, seconds, cut_at, 0

    def backfill_page(self, integration, mapping, attributes, phase, since, cursor):
        number = (cursor or {}).get("page", 0) + 1
        if number == self.cut_at:
            raise OutOfTime("amoCRM did not answer within the 0.8 s left in this invocation", source="amocrm")
        self.clock.advance(self.seconds)
        self.pages += 1
        ids = [f"{number}-{n}" for n in range(5)]
        return BackfillPage(rows={(CONTACT, i): EntityRows(contacts=[{"uniq_id": i, "name": f"Клиент {i}"}]) for i in ids},
                            event_times={(CONTACT, i): int(self.clock.now) - 3600 for i in ids},
                            cursor={"page": number}, requests=1)


def run_one_step(core, shop, *, seconds):
    core.backfill.start(shop, {"since": int(core.clock.now) - 86400})
    with deadline.invocation(seconds, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle(core.queue.receive())
        left = deadline.usable()
    return report, left, core.store.get_backfill(shop)


def test_a_history_step_stops_reading_in_time_for_its_upload(metrika_sandbox):
    """100 s of invocation, 10 kept for the last writes: reading stops UPLOAD_SECONDS before the calls'
    end (after 30 s, three 10-second pages), and the upload has its 60 s."""
    core = Core(metrika_sandbox.url, sources={})
    core.sources["amocrm"] = source = PagedSource(core.clock)
    shop = core.integration()
    report, left, job = run_one_step(core, shop, seconds=100)
    assert source.pages == 3 and left == pytest.approx(UPLOAD_SECONDS)
    assert report.backfill_steps == 1 and job["steps"] == 1 and job["cursor"] == {"page": 3}
    assert job["counts"]["contacts_sent"] == 15 and len(metrika_sandbox.counter(core.counter_id).contacts) == 15
    assert core.queue.sent[-1][0] == message(shop, BACKFILL, f"{job['run_id']}:1")  # the next step


def test_a_history_step_with_time_to_spare_reads_its_full_60_seconds(metrika_sandbox):
    core = Core(metrika_sandbox.url, sources={})
    core.sources["amocrm"] = source = PagedSource(core.clock)
    shop = core.integration()
    run_one_step(core, shop, seconds=300)
    assert source.pages == 6  # STEP_SECONDS of reading, whatever time is left


def test_a_page_read_cut_short_uploads_what_was_read_and_resumes_there(metrika_sandbox):
    core = Core(metrika_sandbox.url, sources={})
    core.sources["amocrm"] = PagedSource(core.clock, cut_at=3)
    shop = core.integration()
    report, left, job = run_one_step(core, shop, seconds=300)
    assert job["steps"] == 1 and job["cursor"] == {"page": 2} and job["attempts"] == 0
    assert job["counts"]["contacts_sent"] == 10


def test_a_first_page_read_cut_short_retries_the_step_without_an_attempt(metrika_sandbox):
    core = Core(metrika_sandbox.url, sources={})
    core.sources["amocrm"] = PagedSource(core.clock, cut_at=1)
    shop = core.integration()
    report, left, job = run_one_step(core, shop, seconds=300)
    assert job["steps"] == 0 and job["attempts"] == 0 and job["state"] == "running"
    assert "did not answer within" in job["error"]
    assert core.queue.sent[-1] == (message(shop, BACKFILL, f"{job['run_id']}:0"), 1)


# --- app.py: the deadline per invocation, and the API's 504 ------------------------------------------------

class FakeLambdaContext:
    def __init__(self, remaining_ms):
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self):
        return self.remaining_ms


def test_the_worker_takes_its_deadline_from_the_lambda_context():
    import app
    with app.lambda_deadline(FakeLambdaContext(299_500), RESERVE_SECONDS):
        assert deadline.remaining() == pytest.approx(299.5, abs=0.1)
        assert deadline.usable() == pytest.approx(289.5, abs=0.1)
    with app.lambda_deadline(None, RESERVE_SECONDS):  # the local worker loop, a test: no deadline
        assert deadline.current() is None


@pytest.fixture
def api(monkeypatch, stalled_url):
    """The app over chalice's test client with the in-memory store and a stalled Metrika; no DynamoDB."""
    import app
    from chalice.test import Client
    from chalicelib.queue import MemoryQueue
    from chalicelib.settings import get_settings
    monkeypatch.setenv("ADMIN_TOKEN", "deadline-admin-token")
    monkeypatch.setenv("METRIKA_API_URL", stalled_url)
    get_settings.cache_clear()
    store = MemoryStore()
    monkeypatch.setattr(app, "_STORE", store)
    monkeypatch.setattr(app, "_QUEUE", MemoryQueue())
    monkeypatch.setattr(app, "_ADMIN_TOKENS", None)  # an earlier test's cache holds another token
    with Client(app.app, stage_name="dev") as client:
        yield client, store
    get_settings.cache_clear()


HEADERS = {"Authorization": "Bearer deadline-admin-token", "Content-Type": "application/json"}


def test_an_admin_route_whose_metrika_stalls_answers_504_json_within_its_budget(api, monkeypatch):
    """PUT without a time zone reads it from the counter; Metrika stalls. The route has 3.2 s of its
    budget left (2 kept for its writes), so the read is cut after 1.2 s and the answer is our JSON 504
    naming Metrika, not API Gateway's bare 502 at 29 s. Nothing is stored."""
    import app
    client, store = api
    monkeypatch.setattr(app, "api_seconds", lambda: deadline.API_RESERVE + 1.2)
    body = {"crm": "amocrm", "counter_id": 4242, "metrika_token": "y0_deadline",
            "connection": {"base_url": "https://shop.amocrm.ru", "access_token": "t" * 20,
                           "webhook_secret": "s" * 20}}
    started = time.monotonic()
    response = client.http.put("/integrations/shop", headers=HEADERS, body=json.dumps(body))
    assert time.monotonic() - started < 2.5
    assert response.status_code == 504
    assert response.json_body["error"] == "timeout"
    assert response.json_body["message"].startswith("could not read the counter's time zone: Metrika did not answer")
    assert response.json_body["details"]["source"] == "metrika"
    assert store.get_integration("shop") is None


def test_an_out_of_time_error_no_route_caught_is_still_a_504(api, monkeypatch):
    import app
    import chalicelib.operations
    client, store = api
    store.put_integration("shop", {"crm": "amocrm", "counter_id": 4242, "metrika_token": "y0_deadline",
                                   "timezone": "Europe/Moscow", "connection": {}})

    def slow_status(*args, **kwargs):
        raise OutOfTime("amoCRM did not answer within the 0.9 s left in this invocation", source="amocrm")
    monkeypatch.setattr(chalicelib.operations, "integration_status", slow_status)
    app._SOURCES["amocrm"] = object()  # no webhook_health: the status page asks no CRM
    try:
        response = client.http.get("/integrations/shop/status", headers=HEADERS)
    finally:
        app._SOURCES.clear()
    assert response.status_code == 504 and response.json_body["error"] == "timeout"
    assert "amoCRM did not answer" in response.json_body["message"]


def test_api_routes_run_under_the_api_budget(api, monkeypatch):
    """Each route runs under a deadline of `api_seconds()` with the API reserve; none leaks out."""
    import app
    import chalicelib.operations
    client, store = api
    store.put_integration("shop", {"crm": "amocrm", "counter_id": 4242, "metrika_token": "y0_deadline",
                                   "timezone": "Europe/Moscow", "connection": {}})
    seen = {}

    def status(*args, **kwargs):
        seen.update(remaining=deadline.remaining(), usable=deadline.usable())
        return {"ok": True}
    monkeypatch.setattr(chalicelib.operations, "integration_status", status)
    app._SOURCES["amocrm"] = object()
    try:
        assert client.http.get("/integrations/shop/status", headers=HEADERS).json_body == {"ok": True}
    finally:
        app._SOURCES.clear()
    # The test client's Lambda context has the API handler's 28 s; no requestTimeEpoch: from now.
    assert 27.0 < seen["remaining"] <= 28.0 and seen["usable"] == pytest.approx(seen["remaining"] - 2.0, abs=0.05)
    assert deadline.current() is None


def test_the_local_worker_loop_gives_each_batch_the_configured_worker_time():
    """`make run`'s worker loop hands the handler a Lambda context with the stage's worker timeout, so
    the deadline works locally as deployed; tests and benches pass none and run without one."""
    from sandbox.worker import WorkerLoop, configured_worker_timeout

    class OneMessageSqs:
        def get_queue_url(self, QueueName):
            return {"QueueUrl": "http://local/q"}

        def get_queue_attributes(self, QueueUrl, AttributeNames):
            return {"Attributes": {"QueueArn": "arn:aws:sqs:local:0:q"}}

        def receive_message(self, **kwargs):
            return {"Messages": [{"MessageId": "1", "ReceiptHandle": "r", "Body": "{}"}]}

        def delete_message_batch(self, QueueUrl, Entries):
            pass

    seen = []
    handler = lambda event, context: seen.append(context and context.get_remaining_time_in_millis())  # noqa: E731
    assert configured_worker_timeout("dev") == configured_worker_timeout("prod") == 300
    WorkerLoop(handler, "q", sqs=OneMessageSqs(), batch_size=1, lambda_timeout=300).run_once()
    WorkerLoop(handler, "q", sqs=OneMessageSqs(), batch_size=1).run_once()
    assert 299_000 < seen[0] <= 300_000 and seen[1] is None
