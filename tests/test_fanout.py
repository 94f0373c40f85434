"""Issue 15, items 1 and 2: the schedules fan out (one job message per integration, run by the worker,
each isolated), and the worker runs the integrations of a batch side by side while a Metrika token
still never has more than 3 requests in flight.

Logic on the in-memory store and queue (tests/core.py); the schedule's SQS calls against a recording
client (what it sends and how, counted); CRM and Metrika traffic over loopback HTTP to the sandboxes.
The same paths over moto, policy by policy: test_least_privilege.py."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter as Tally

import pytest
from botocore.exceptions import ClientError

from chalicelib import deadline
from chalicelib.crm import ORDER, EntityRef
from chalicelib.crm.amocrm.source import AmoCrmSource
from chalicelib.errors import OutOfTime, Transient, Unavailable
from chalicelib.metrika.governor import QuotaGovernor
from chalicelib.queue import CONFIRM, MAX_RECEIVE_COUNT, RECONCILE, EventQueue, Received, message
from chalicelib.schedules import JOB_SECONDS, fan_out, run_id, scheduled_at
from chalicelib.store.memory import MemoryStore
from chalicelib.worker import GROUP_SECONDS, RESERVE_SECONDS, WORKER_THREADS
from tests.core import NOW, Clock, Core, deal_rows


# --- helpers -------------------------------------------------------------------------------------------

class Counting:
    """A store (or anything) whose method calls are counted by name."""

    def __init__(self, inner):
        self._inner, self.calls = inner, Tally()

    def __getattr__(self, name):
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attribute(*args, **kwargs)
        return counted


class RecordingSqs:
    """The two SQS calls `EventQueue.send` makes, recorded; `fail_at`: that SendMessageBatch (0-based)
    answers ServiceUnavailable, once."""

    def __init__(self, fail_at: int | None = None):
        self.batches: list[list[dict]] = []
        self.url_lookups = 0
        self.fail_at = fail_at

    def get_queue_url(self, QueueName):
        self.url_lookups += 1
        return {"QueueUrl": f"https://sqs.eu-central-1.amazonaws.com/123456789012/{QueueName}"}

    def send_message_batch(self, QueueUrl, Entries):
        if self.fail_at == len(self.batches):
            self.fail_at = None
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "drill"}}, "SendMessageBatch")
        assert 1 <= len(Entries) <= 10 and len({e["Id"] for e in Entries}) == len(Entries)
        self.batches.append([json.loads(e["MessageBody"]) for e in Entries])
        return {"Successful": [{"Id": e["Id"], "MessageId": e["Id"]} for e in Entries]}

    def bodies(self) -> list[dict]:
        return [body for batch in self.batches for body in batch]


class Forbidden(dict):
    """Sources or anything else the schedule must not touch."""

    def get(self, *args, **kwargs):
        raise AssertionError("the schedule asked for a CRM source")

    __getitem__ = get


class ChangedSource:
    """A CRM source for reconciliation: `changed_since` per integration, counted; `fail` per id."""

    def __init__(self):
        self.listed: Tally = Tally()
        self.changed: dict[str, list[EntityRef]] = {}
        self.fail: dict[str, Exception] = {}
        self.since: dict[str, int] = {}  # the last window asked for, per integration

    def changed_since(self, integration, since):
        integration_id = integration["label"]
        self.listed[integration_id] += 1
        self.since[integration_id] = since
        if integration_id in self.fail:
            raise self.fail[integration_id]
        return [ref for ref in self.changed.get(integration_id, []) if ref.event_time >= since]

    def snapshot(self, integration, mapping, refs, attributes=()):
        return {(r.kind, r.crm_id): deal_rows(r.crm_id, contact=f"c{r.crm_id}") for r in refs}


def job_core(metrika_url: str, names: list[str], **options) -> tuple[Core, ChangedSource]:
    source = ChangedSource()
    core = Core(metrika_url, sources={"amocrm": source}, **options)
    for name in names:
        core.integration(name, label=name)  # `label`: the sources tell integrations apart by it
    return core, source


@pytest.fixture
def scheduler_app(monkeypatch):
    """app.py's schedule handlers over a counted in-memory store and SQS recorded call by call; any CRM
    source or Metrika client asked for fails the test."""
    import app
    from chalice.test import Client
    store, sqs = Counting(MemoryStore()), RecordingSqs()
    monkeypatch.setattr(app, "_STORE", store)
    monkeypatch.setattr(app, "_QUEUE", EventQueue(sqs, "metrika-crm-bridge-dev-events"))
    monkeypatch.setattr(app, "_SOURCES", Forbidden())
    monkeypatch.setattr(app, "get_metrika", lambda integration: pytest.fail("the schedule asked for Metrika"))
    monkeypatch.setattr(app, "time", type("Clock", (), {"time": staticmethod(lambda: NOW)}))  # fire()'s day
    with Client(app.app, stage_name="dev") as client:
        yield client, store, sqs


def fire(client, name: str, at: str = "2026-09-21T10:00:00Z") -> dict:
    event = client.events.generate_cw_event(source="aws.events", detail_type="Scheduled Event", detail={},
                                            resources=[], region="eu-central-1")
    event["time"] = at
    return client.lambda_.invoke(name, event).payload


# --- the schedules fan out -------------------------------------------------------------------------------

@pytest.mark.parametrize(("schedule", "kind"), [("reconcile_all", RECONCILE), ("confirm_uploads", CONFIRM)])
def test_a_schedule_over_1000_integrations_queues_1000_jobs_in_batches_of_ten_and_nothing_else(scheduler_app,
                                                                                                schedule, kind):
    client, store, sqs = scheduler_app
    ids = [f"shop-{n:04d}" for n in range(1000)]
    for integration_id in ids:
        store._inner.put_integration(integration_id, {"crm": "amocrm", "counter_id": 1, "metrika_token": "y0"})
    started = time.monotonic()
    answer = fire(client, schedule)
    elapsed = time.monotonic() - started
    run = str(1789984800)  # 2026-09-21T10:00:00Z
    assert answer["queued"] == 1000 and answer["run"] == run and answer["job"] == schedule
    # One scan, one URL lookup, 100 SendMessageBatch calls of ten: no per-integration read, no CRM, no Metrika.
    assert store.calls == {"list_integration_ids": 1}
    assert sqs.url_lookups == 1 and [len(batch) for batch in sqs.batches] == [10] * 100
    assert sorted(b["integration_id"] for b in sqs.bodies()) == ids
    assert {(b["kind"], b["crm_id"]) for b in sqs.bodies()} == {(kind, run)}
    assert elapsed < 30  # seconds at worst on a loaded machine; ~0.1 s here (the figures: the report)


def test_no_integrations_queue_nothing(scheduler_app):
    client, store, sqs = scheduler_app
    assert fire(client, "reconcile_all")["queued"] == 0
    assert sqs.batches == []


def test_a_schedule_whose_queue_fails_half_way_fails_and_its_retry_only_duplicates(scheduler_app):
    """SQS fails at the 37th batch: the invocation fails (Lambda retries it with the same event). The
    retry queues all again under the same run id: the first 360 twice, which the worker skips."""
    client, store, sqs = scheduler_app
    for n in range(1000):
        store._inner.put_integration(f"shop-{n:04d}", {"crm": "amocrm"})
    sqs.fail_at = 36
    with pytest.raises(Unavailable):
        fire(client, "confirm_uploads")
    assert len(sqs.batches) == 36
    assert fire(client, "confirm_uploads")["queued"] == 1000
    sent = Tally(b["integration_id"] for b in sqs.bodies())
    assert len(sent) == 1000 and Tally(sent.values()) == {2: 360, 1: 640}
    assert {b["crm_id"] for b in sqs.bodies()} == {"1789984800"}


@pytest.mark.parametrize(("event_time", "expected"), [
    ("2026-09-21T10:00:00Z", "1789984800"),
    ("2026-09-21T13:00:00+03:00", "1789984800"),
    ("2026-09-21T10:00:00", "1789984800"),  # no zone: EventBridge's times are UTC
    (None, "1790000000"), ("", "1790000000"), ("yesterday", "1790000000"), (12345, "1790000000"),
    ("9" * 2000, "1790000000"), ("2100-01-01T00:00:00Z", "4102444800"),
])
def test_the_run_id_is_the_schedules_time_or_now(event_time, expected):
    assert run_id(event_time, now=NOW) == expected


@pytest.mark.parametrize(("run", "expected"), [
    ("1789984800", 1789984800), ("0", 0), ("", None), ("-5", None), ("1e9", None), ("١٢٣", None),
    ("9" * 14, None), (str(2**40), None), ("12 ", None)])
def test_a_run_id_that_names_no_time_is_not_compared(run, expected):
    assert scheduled_at(run) == expected


# --- the jobs in the worker ------------------------------------------------------------------------------

def test_each_integration_is_reconciled_by_its_own_job_and_a_failure_is_its_own(metrika_sandbox, captured_logs):
    core, source = job_core(metrika_sandbox.url, ["alpha", "bravo", "charlie", "delta"])
    source.changed["bravo"] = [EntityRef(ORDER, "501", int(core.clock.now) - 30, "update")]
    source.fail["alpha"] = Transient("amoCRM answered 503", source="amocrm")
    source.fail["charlie"] = KeyError("a bug")
    fan_out(core.store, core.queue, "reconcile_all", run=str(int(core.clock.now) - 5))
    report = core.worker.handle(core.queue.receive())
    assert source.listed == {"alpha": 1, "bravo": 1, "charlie": 1, "delta": 1}
    assert (report.jobs, report.failed_jobs, report.jobs_skipped) == (2, 2, 0)
    failed = {json.loads(r.getMessage())["integration_id"]: json.loads(r.getMessage())
              for r in captured_logs.records if '"reconcile_failed"' in r.getMessage()}
    assert set(failed) == {"alpha", "charlie"}
    assert failed["alpha"]["message"] == "amoCRM answered 503" and "KeyError" in failed["charlie"]["traceback"]
    assert core.store.get_cursor("bravo", "reconcile") == int(core.clock.now)
    assert core.store.get_cursor("alpha", "reconcile") is None  # its window starts where it did
    core.drain()  # bravo's deal, found by its job, delivered
    assert "501" in metrika_sandbox.counter(core.counter_id).orders


def test_our_store_failing_in_a_job_fails_the_batch(metrika_sandbox):
    core, source = job_core(metrika_sandbox.url, ["alpha", "bravo"])
    source.fail["alpha"] = Unavailable("store", "drill")
    fan_out(core.store, core.queue, "reconcile_all", run="1")
    with pytest.raises(Unavailable):
        core.worker.handle(core.queue.receive())


def test_duplicate_jobs_run_once_and_a_later_run_runs_again(metrika_sandbox):
    """The same run queued twice (a retried schedule) and a redelivery in a later batch: one
    reconciliation per integration. A run scheduled after the last one did runs."""
    core, source = job_core(metrika_sandbox.url, ["alpha", "bravo"])
    run = str(int(core.clock.now) - 5)
    for _ in range(2):
        fan_out(core.store, core.queue, "reconcile_all", run=run)
    report = core.worker.handle(core.queue.receive())
    assert source.listed == {"alpha": 1, "bravo": 1} and report.jobs == 2  # one of each kind per batch
    core.queue.send([message("alpha", RECONCILE, run)])  # SQS hands one out again, later
    core.clock.advance(60)
    assert core.worker.handle(core.queue.receive()).jobs_skipped == 1
    assert source.listed == {"alpha": 1, "bravo": 1}
    core.clock.advance(600)
    fan_out(core.store, core.queue, "reconcile_all", run=str(int(core.clock.now)))
    assert core.worker.handle(core.queue.receive()).jobs == 2
    assert source.listed == {"alpha": 2, "bravo": 2}


def test_a_crm_clock_hours_behind_ours_keeps_the_window_in_its_clock_and_the_runs_in_ours(metrika_sandbox):
    """The window's position is the CRM's (the newest time it listed, four hours behind ours); whether a
    run was covered is still judged by when reconciliation ran, by our clock, against EventBridge's."""
    core, source = job_core(metrika_sandbox.url, ["alpha"])
    lag = 4 * 3600
    crm_now = lambda: int(core.clock.now) - lag  # noqa: E731
    source.changed["alpha"] = [EntityRef(ORDER, "7", crm_now() - 30, "reconcile")]
    run = str(int(core.clock.now) - 5)
    fan_out(core.store, core.queue, "reconcile_all", run=run)
    assert core.worker.handle(core.queue.receive()).jobs == 1
    assert core.store.get_cursor("alpha", "reconcile_position") == crm_now() - 30
    assert core.store.get_cursor("alpha", "reconcile") == int(core.clock.now)
    core.drain()
    core.clock.advance(60)
    core.queue.send([message("alpha", RECONCILE, run)])  # the same run, handed out again: covered
    assert core.worker.handle(core.queue.receive()).jobs_skipped == 1 and source.listed["alpha"] == 1
    core.clock.advance(600)
    source.changed["alpha"].append(EntityRef(ORDER, "8", crm_now(), "reconcile"))  # its webhook lost
    fan_out(core.store, core.queue, "reconcile_all", run=str(int(core.clock.now)))
    assert core.worker.handle(core.queue.receive()).jobs == 1
    assert source.since["alpha"] == crm_now() - 600 - 60 - 30 - 120  # the last position, less the overlap
    assert [json.loads(m)["crm_id"] for m in core.queue.receive()] == ["8"]  # found; "7", delivered, left alone
    assert core.store.get_cursor("alpha", "reconcile_position") == crm_now()


@pytest.mark.parametrize("run", ["", "not-a-time", "9" * 200, str(2**40)])
def test_a_job_whose_run_id_names_no_time_runs(metrika_sandbox, run):
    core, source = job_core(metrika_sandbox.url, ["alpha"])
    core.store.put_cursor("alpha", "reconcile", int(core.clock.now))
    core.queue.send([message("alpha", RECONCILE, run)])
    assert core.worker.handle(core.queue.receive()).jobs == 1 and source.listed == {"alpha": 1}


def test_a_confirmation_that_read_metrika_is_not_repeated_by_a_duplicate(metrika_sandbox):
    core, source = job_core(metrika_sandbox.url, ["alpha", "bravo"])
    core.ingest.record("alpha", [EntityRef(ORDER, "71", int(core.clock.now), "add")], origin="amocrm")
    core.drain()
    uploads = [u for u in core.store.uploads("alpha") if u["status"] == "SENT"]
    assert uploads  # bravo has none

    def listings():
        return sum(1 for r in metrika_sandbox.requests if r["path"].endswith("/last_uploadings"))
    before = listings()
    run = str(int(core.clock.now))
    core.clock.advance(5)
    fan_out(core.store, core.queue, "confirm_uploads", run=run)
    report = core.worker.handle(core.queue.receive())
    assert report.jobs == 2 and listings() == before + 1  # bravo had nothing to check: no request
    assert {u["status"] for u in core.store.uploads("alpha")} == {"PASSED"}
    assert core.store.get_cursor("alpha", CONFIRM) == int(core.clock.now)
    assert core.store.get_cursor("bravo", CONFIRM) is None  # nothing read, nothing written
    fan_out(core.store, core.queue, "confirm_uploads", run=run)  # the run again
    report = core.worker.handle(core.queue.receive())
    assert (report.jobs_skipped, report.jobs) == (1, 1) and listings() == before + 1


def test_a_job_for_an_integration_deleted_meanwhile_is_dropped(metrika_sandbox):
    core, source = job_core(metrika_sandbox.url, ["alpha"])
    fan_out(core.store, core.queue, "confirm_uploads", run="1")
    core.store.delete_integration("alpha")
    report = core.worker.handle(core.queue.receive())
    assert report.jobs_skipped == 1 and report.failed_jobs == 0 and len(core.queue) == 0


def test_a_job_message_on_its_last_receive_flags_nothing_and_runs(metrika_sandbox):
    core, source = job_core(metrika_sandbox.url, ["alpha"])
    core.store = Counting(core.store)
    core.worker = type(core.worker)(core.store, core.queue, core.metrika_for, core.sources, clock=core.clock)
    body = json.dumps(message("alpha", RECONCILE, "1"))
    report = core.worker.handle([Received(body, MAX_RECEIVE_COUNT)])
    assert report.jobs == 1 and report.dead_lettered == 0
    assert core.store.calls["mark_dead_lettered"] == 0


def test_a_job_starts_only_with_its_time_and_one_cut_short_is_queued_again(metrika_sandbox):
    core, source = job_core(metrika_sandbox.url, ["alpha", "bravo"])
    fan_out(core.store, core.queue, "reconcile_all", run="7")
    with deadline.invocation(JOB_SECONDS - 1 + RESERVE_SECONDS, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle(core.queue.receive())
    assert report.postponed == 2 and report.jobs == 0 and source.listed == {}
    assert sorted(m["integration_id"] for m, _ in core.queue.sent[-2:]) == ["alpha", "bravo"]
    assert all(m["kind"] == RECONCILE and m["crm_id"] == "7" for m, _ in core.queue.sent[-2:])
    source.fail["alpha"] = OutOfTime("amoCRM did not answer within the 1.2 s left", source="amocrm")
    report = core.worker.handle(core.queue.receive())
    assert (report.jobs, report.postponed, report.failed_jobs) == (1, 1, 0)
    assert core.queue.sent[-1][0] == message("alpha", RECONCILE, "7")


# --- integrations side by side ---------------------------------------------------------------------------

INTEGRATIONS, DEALS_EACH, TOKENS = 50, 2, 5
BROKEN = "side-13"


class Overlapping:
    """The amoCRM source, its first `parties` snapshots held at a barrier until that many are in
    flight at once (a worker running fewer side by side breaks the barrier: those groups fail); it
    records the deadline each snapshot ran under, and the BROKEN integration's raises."""

    def __init__(self, inner, parties: int):
        self._inner, self._lock = inner, threading.Lock()
        self.barrier = threading.Barrier(parties, timeout=10)
        self.parties, self.calls, self.deadlines = parties, 0, []

    def snapshot(self, integration, *args, **kwargs):
        with self._lock:
            self.calls += 1
            first = self.calls <= self.parties
            self.deadlines.append(deadline.current())
        if first:
            self.barrier.wait()
        if integration["label"] == BROKEN:
            raise KeyError("a CRM answer nobody foresaw")
        return self._inner.snapshot(integration, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def many(metrika_sandbox, amocrm):
    """50 integrations on one amoCRM sandbox account (its rate limit lifted: each would be its own
    account) and 5 Metrika tokens (ten integrations in a row on each, so the first eight groups share
    one), 2 deals each, all recorded: 100 messages on the queue."""
    amocrm.reset()
    saved_rate, amocrm.rate_limit = amocrm.rate_limit, 10**6
    saved_parallel, metrika_sandbox.max_parallel = metrika_sandbox.max_parallel, 1000  # the sandbox counts, we limit
    with metrika_sandbox._lock:
        metrika_sandbox.max_in_flight = 0
    # Uploads answered after 20 ms (Metrika's own take longer): requests of one token overlap unless held back.
    metrika_sandbox.set_faults(slow=1.0, slow_seconds=0.02, paths="/data/")
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    source = Overlapping(AmoCrmSource(lambda scope, interval, now: now, accounts=core.store, backoff=0.01),
                         WORKER_THREADS)
    core.sources["amocrm"] = source
    mapping = [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"}]
    ids = []
    for n in range(INTEGRATIONS):
        integration_id = f"side-{n:02d}"
        counter = 9600 + n
        core.counter_id = counter
        core.integration(integration_id, label=integration_id, metrika_token=f"y0_side_{n * TOKENS // INTEGRATIONS}",
                         currency="RUB", phone_region="RU",
                         connection={"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": "s" * 20})
        core.store.put_status_mapping(integration_id, mapping, 0)
        metrika_sandbox.counter(counter).order_statuses.update({"new": {"id": "new", "type": "IN_PROGRESS"}})
        refs = []
        for d in range(DEALS_EACH):
            person = amocrm.create_contact(f"Клиент {n}-{d}", phones=[f"+7 916 {n:03d}{d:04d}"], notify=False)
            lead = amocrm.create_lead(f"Сделка {n}-{d}", 7001, 1001, price=1000 + n, contacts=[person["id"]],
                                      notify=False)
            refs.append(EntityRef(ORDER, str(lead["id"]), int(core.clock.now), "add"))
        core.ingest.record(integration_id, refs, origin="amocrm")
        ids.append(integration_id)
    yield core, source, ids
    amocrm.rate_limit, metrika_sandbox.max_parallel = saved_rate, saved_parallel
    metrika_sandbox.set_faults()


def test_a_batch_of_100_messages_over_50_integrations_runs_them_side_by_side(many, metrika_sandbox):
    """Eight groups in flight at once (the barrier), each under the invocation's deadline; the broken
    integration's group crashes and only its deals wait (retried); the 98 others are delivered in this
    batch; and no token ever had more than 3 Metrika requests in flight (the sandbox, allowed 1,000,
    counts what we send)."""
    core, source, ids = many
    bodies = core.queue.receive(1000)
    assert len(bodies) == INTEGRATIONS * DEALS_EACH
    sent_before = len(metrika_sandbox.requests)
    with deadline.invocation(300, reserve=RESERVE_SECONDS) as invocation:
        report = core.worker.handle(bodies)
    assert source.calls >= INTEGRATIONS and source.barrier.broken is False
    assert {id(d) for d in source.deadlines} == {id(invocation)}  # the deadline reached every thread
    assert (report.uploaded, report.retried, report.failed_groups, report.parked) == (98, 2, 3, 0)
    for n, integration_id in enumerate(ids):
        orders = metrika_sandbox.counter(9600 + n).orders
        assert len(orders) == (0 if integration_id == BROKEN else DEALS_EACH), integration_id
    broken = [json.loads(b)["crm_id"] for b in bodies if json.loads(b)["integration_id"] == BROKEN]
    assert [core.store.get_entity(BROKEN, ORDER, crm_id)["attempts"] for crm_id in broken] == [1, 1]
    assert 1 <= metrika_sandbox.max_in_flight <= 3
    assert not [r for r in metrika_sandbox.requests[sent_before:] if r["status"] == 429]


def test_one_group_losing_our_store_fails_the_batch_after_the_running_ones(metrika_sandbox):
    core = Core(metrika_sandbox.url, threads=2)
    for number, name in enumerate(("alpha", "bravo"), 1):
        core.integration(name, label=name)
        core.source.rows[(ORDER, str(number))] = deal_rows(str(number), contact=f"c{number}")
        core.ingest.record(name, [EntityRef(ORDER, str(number), int(core.clock.now), "add")], origin="amocrm")
    both = threading.Barrier(2, timeout=10)

    def fail(integration):
        both.wait()  # both groups in flight
        if integration["label"] == "alpha":
            raise Unavailable("store", "drill")
    core.source.fail = fail
    with pytest.raises(Unavailable):
        core.worker.handle(core.queue.receive())
    assert not core.store.get_entity("bravo", ORDER, "2")["dirty"]  # the running one finished
    assert core.store.get_entity("alpha", ORDER, "1")["dirty"]


def test_side_by_side_a_group_is_started_only_with_its_time(metrika_sandbox):
    """Two threads, three integrations, each CRM read 30 s (fake clock), 90 s for calls: the first two
    start together; when a thread comes free 60 s have gone, so the third is queued again as it came."""
    core = Core(metrika_sandbox.url, threads=2)
    ids = [core.integration(name) for name in ("alpha", "bravo", "charlie")]
    for number, integration_id in enumerate(ids, 1):
        core.source.rows[(ORDER, str(number))] = deal_rows(str(number), contact=f"1{number}")
        core.ingest.record(integration_id, [EntityRef(ORDER, str(number), int(core.clock.now), "add")], origin="amocrm")
    both = threading.Barrier(2, timeout=10)

    def slow(integration):
        core.clock.advance(30)
        both.wait()  # neither returns before both have read
    core.source.fail = slow
    sent_before = len(core.queue.sent)
    with deadline.invocation(GROUP_SECONDS + 30 + RESERVE_SECONDS, reserve=RESERVE_SECONDS, clock=core.clock):
        report = core.worker.handle(core.queue.receive())  # 90 s at the start; 30 s < GROUP_SECONDS after 60
    assert (report.uploaded, report.postponed) == (2, 1)
    assert core.queue.sent[sent_before:] == [(message("charlie", ORDER, "3"), 0)]
    assert core.store.get_entity("charlie", ORDER, "3").get("attempts", 0) == 0


# --- the governor's gate ---------------------------------------------------------------------------------

def test_a_processs_own_requests_past_a_tokens_slots_wait_at_its_gate_not_on_the_lease_items():
    """Eight threads, one token: three hold the slots; the five others wait in the process, without
    polling DynamoDB (each thread asks for a lease once, when a place is free)."""
    store = Counting(MemoryStore())
    token = f"y0_gate_{time.monotonic_ns()}"
    inside, most, lock = [0], [0], threading.Lock()
    all_started, release = threading.Barrier(WORKER_THREADS, timeout=10), threading.Event()

    def request():
        governor = QuotaGovernor(store, token)
        all_started.wait()
        with governor.request():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            release.wait(10)
            with lock:
                inside[0] -= 1
    threads = [threading.Thread(target=request) for _ in range(WORKER_THREADS)]
    for thread in threads:
        thread.start()
    for _ in range(1000):  # until three are inside (each step a short wait on the event, not a sleep)
        with lock:
            if inside[0] == 3:
                break
        release.wait(0.01)
    assert store.calls["acquire_lease"] == 3
    release.set()
    for thread in threads:
        thread.join(10)
    assert most[0] == 3 and store.calls["acquire_lease"] == WORKER_THREADS  # no polling
    assert store.calls["release_lease"] == WORKER_THREADS


def test_the_gate_is_freed_when_the_lease_store_fails():
    store = MemoryStore()
    token = f"y0_gate_down_{time.monotonic_ns()}"

    class Down:
        def acquire_lease(self, *args):
            raise Unavailable("store", "drill")
    for _ in range(5):  # more than the gate's three places
        with pytest.raises(Unavailable):
            with QuotaGovernor(Down(), token).request():
                pass
    with QuotaGovernor(store, token).request():  # the places came back
        pass
    assert store.requests_on(QuotaGovernor(store, token)._key, QuotaGovernor(store, token)._day()) == 1


def test_a_full_gate_is_waited_for_within_the_invocations_time():
    token = f"y0_gate_full_{time.monotonic_ns()}"
    store = MemoryStore()
    holders = [QuotaGovernor(store, token).request() for _ in range(3)]
    for held in holders:
        held.__enter__()
    try:
        started = time.monotonic()
        with deadline.invocation(1.3 + RESERVE_SECONDS, reserve=RESERVE_SECONDS):
            with pytest.raises(OutOfTime, match="no Metrika request slot came free"):
                with QuotaGovernor(store, token).request():
                    pass
        assert 0.2 <= time.monotonic() - started < 1.5  # 0.3 s: 1.3 for calls minus 1 kept for the call
    finally:
        for held in holders:
            held.__exit__(None, None, None)



def test_the_worker_scales_past_three_invocations_with_a_client_pool_for_its_threads(monkeypatch):
    """Concurrency per token, not per deployment: the SQS event source lets more than 3 workers run
    (within SQS's 2-1000), and the DynamoDB client's pool holds a connection for every thread that may
    write at once (integrations × their parallel writes), so none is opened and dropped per call."""
    import app
    from chalicelib.parallel import WRITERS
    (source,) = [e for e in app.app.event_sources if e.name == "on_events_message"]
    assert source.maximum_concurrency == app.WORKER_CONCURRENCY and 3 < app.WORKER_CONCURRENCY <= 1000
    monkeypatch.setattr(app, "_STORE", None)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")  # a client is made; nothing is called
    client = app.get_store()._db._client
    assert client.meta.config.max_pool_connections == app.DYNAMODB_CONNECTIONS >= WORKER_THREADS * WRITERS


def test_each_metric_line_is_one_write_so_threads_cannot_split_it(monkeypatch):
    """The governor's EMF lines come from the worker's threads now: each must reach stdout in one write
    (`print` writes the line and its newline apart, and another thread's line could land between)."""
    import sys
    from chalicelib import metrics
    writes = []

    class Recording:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass
    monkeypatch.setattr(sys, "stdout", Recording())
    line = metrics.budget_used_line(stage="prod", used=1, budget=5000, quota_key="k", timestamp_ms=1)
    metrics.write_line(line)
    assert writes == [line + "\n"]
