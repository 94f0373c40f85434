"""Large webhook bodies (issue 13, items 7 and 9): an amoCRM mass action (250 leads with their custom
fields in one POST) and a contact with 2,000 linked leads are accepted within the limits, acknowledged
with a constant amount of work (recorded whole in the inbox, one queue message per batch) and expanded
by the worker into every entity, with today's guarantees: all or nothing towards the CRM, leases
released on failure, future times capped, no event lost.

Logic runs on the in-memory store and queue; the last tests go over the wire to moto_server.
"""
from __future__ import annotations

import json
import random
import re
import time
from urllib.parse import parse_qsl, quote

import pytest

from chalicelib.crm import ORDER, EntityRef, WebhookError
from chalicelib.crm.amocrm.webhook import parse_amocrm_webhook
from chalicelib.crm.form import MAX_KEYS, _pairs, parse_bracket_form
from chalicelib.errors import Unavailable
from chalicelib.ingest import (INBOX_BATCH_REFS, QUEUE_LEASE_SECONDS, INBOX_BATCHES_PER_RUN, INBOX_GRACE_SECONDS, INLINE_ENTITIES, Ingest,
                               expand_inbox)
from chalicelib.queue import INBOX, MemoryQueue
from chalicelib.settings import MAX_WEBHOOK_BYTES, load_settings
from chalicelib.store.memory import MemoryStore
from chalicelib.worker import Worker
from sandbox.amocrm import AmoCrmSandbox, seed_demo
from tests.core import Clock
from tests.stacks import chalice_local

SECRET = "large-bodies-webhook-secret-0123"
IID = "shop"


# --- realistic bodies, built like amoCRM's webhooks (also used by bench/ack_large.py) ------------------

def lead_fields(i: int) -> list[dict]:
    """The custom fields a shop fills on a deal: a text field and a list field (with its enum id)."""
    return [{"field_id": 1002001, "field_name": "Город", "field_type": "text", "values": [{"value": "Москва"}]},
            {"field_id": 1002002, "field_name": "Источник", "field_type": "select",
             "values": [{"value": "Яндекс Директ" if i % 2 else "Сайт", "enum_id": 3001 + i % 2}]}]


def seed_leads(amocrm: AmoCrmSandbox, count: int, *, contacts: list[int] = ()) -> list[dict]:
    """`count` deals in the demo pipeline, each with custom fields and a tracking ClientID."""
    if not amocrm.pipelines:
        seed_demo(amocrm)
    return [amocrm.create_lead(f"Заказ #{10000 + i}", 7001, 1002, price=4980 + i, contacts=list(contacts),
                               client_id=f"1717171717{i:09d}", custom_fields=lead_fields(i), notify=False)
            for i in range(count)]


def mass_action_body(amocrm: AmoCrmSandbox, leads: list[dict]) -> bytes:
    """What amoCRM sends when a manager moves these leads to another stage at once: one `status` body."""
    return amocrm.webhook_body_items("leads", "status", [amocrm._lead_form(lead, {"old_status_id": 1001}) for lead in leads])


def linked_leads_contact_body(amocrm: AmoCrmSandbox, linked: int) -> bytes:
    """A contact update whose contact has `linked` deals: `linked_leads_id[<id>][ID]` for each."""
    if not amocrm.pipelines:
        seed_demo(amocrm)
    contact = amocrm.create_contact("Оптовый покупатель", phones=["+7 916 000-00-00"], notify=False)
    for i in range(linked):
        amocrm.create_lead(f"Поставка {i}", 7001, 1001, contacts=[contact["id"]], notify=False)
    return amocrm.webhook_body("contacts", "update", amocrm._contact_form(contact))


@pytest.fixture(scope="module")
def amo_sandbox():
    return AmoCrmSandbox(token="not-served")  # never started: only its form builders are used


@pytest.fixture(scope="module")
def mass_action(amo_sandbox):
    return mass_action_body(amo_sandbox, seed_leads(amo_sandbox, 250))


# --- wiring ------------------------------------------------------------------------------------------

class World:
    """Ingest and the worker's expansion on the in-memory store and queue, on a settable clock. `wrap`
    puts a fault-injecting layer (`Failing`) between them and the store; `memory` is the store itself."""

    def __init__(self, wrap=None, queue=None) -> None:
        self.clock = Clock(float(int(time.time())))
        self.memory = MemoryStore(clock=self.clock)
        self.store = wrap(self.memory) if wrap else self.memory
        self.queue = queue(self.clock) if queue else MemoryQueue(clock=self.clock)
        self.memory.put_integration(IID, {"crm": "amocrm", "connection": {"webhook_secret": SECRET}})
        self.ingest = Ingest(self.store, self.queue, max_body_bytes=MAX_WEBHOOK_BYTES, clock=self.clock)
        self.worker = Worker(self.store, self.queue, lambda integration: None, {}, clock=self.clock)

    def webhook(self, body: bytes) -> dict:
        return self.ingest.amocrm(IID, body, {"secret": SECRET})

    def entity_messages(self) -> list[tuple[str, str]]:
        return [(m["kind"], m["crm_id"]) for m, _ in self.queue.sent if m["kind"] != INBOX]

    def inbox_messages(self) -> list[tuple[str, str]]:
        return [(m["integration_id"], m["crm_id"]) for m, _ in self.queue.sent if m["kind"] == INBOX]

    def run_worker(self) -> None:
        """Hand the worker what is queued, inbox messages only (entity deliveries are not under test)."""
        bodies = [b for b in self.queue.receive(1000) if json.loads(b)["kind"] == INBOX]
        self.report = self.worker.handle(bodies)

    def leased(self) -> set[str]:
        return {e["crm_id"] for e in self.memory.list_entities(IID) if "queued_until" in e}


class Failing:
    """Passes every call through to `inner`, except that the `nth` call of `method` raises
    `Unavailable` (and every later one too while `sticky`)."""

    def __init__(self, inner, method: str, nth: int = 1, sticky: bool = False) -> None:
        self._inner, self._method, self._nth, self.sticky = inner, method, nth, sticky
        self.calls = 0

    def __getattr__(self, name):
        attribute = getattr(self._inner, name)
        if name != self._method:
            return attribute

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self._nth or (self.sticky and self.calls > self._nth):
                raise Unavailable("store", "drill")
            return attribute(*args, **kwargs)
        return call


class HalfWriting:
    """`put_inbox` writes the first batch and then fails, as BatchWriteItem leaving items unprocessed."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def put_inbox(self, integration_id, batches, *, now):
        first = next(iter(batches))
        self._inner.put_inbox(integration_id, {first: batches[first]}, now=now)
        raise Unavailable("store", "batch_write_item: items left unprocessed")


class HalfwayQueue(MemoryQueue):
    """Takes `accept` messages in all, then fails in the middle of a send, as SQS can between two
    batches of ten."""

    def __init__(self, clock, accept: int) -> None:
        super().__init__(clock=clock)
        self.accept = accept

    def send(self, messages, delay_seconds=0):
        room = self.accept - len(self.sent)
        if len(messages) > room:
            super().send(messages[:max(room, 0)], delay_seconds)
            raise Unavailable("queue", "drill: refused halfway")
        super().send(messages, delay_seconds)


# --- limits and parsing --------------------------------------------------------------------------------

def test_a_realistic_mass_action_is_within_the_limits_and_names_every_lead(amo_sandbox, mass_action):
    assert 300_000 < len(mass_action) <= MAX_WEBHOOK_BYTES  # ~0.44 MB: leads with custom fields and ClientIDs
    assert 5_500 < mass_action.count(b"&") + 1 <= MAX_KEYS
    assert b"custom_fields%5D%5B1%5D%5Bvalues%5D%5B0%5D%5Benum%5D" in mass_action
    hook = parse_amocrm_webhook(mass_action)
    assert len(hook.refs) == 250 and {r.kind for r in hook.refs} == {ORDER} and hook.ignored == 0
    assert len({r.crm_id for r in hook.refs}) == 250
    assert all(r.event_time == amo_sandbox.leads[int(r.crm_id)]["updated_at"] for r in hook.refs)


def test_the_limits_are_pinned_alike_in_settings_and_the_stage_config():
    from pathlib import Path
    config = json.loads((Path(__file__).resolve().parents[1] / ".chalice" / "config.json").read_text())
    assert int(config["environment_variables"]["MAX_WEBHOOK_BYTES"]) == MAX_WEBHOOK_BYTES == 2 * 1024 * 1024
    for stage, settings in config["stages"].items():  # no stage pins another (the old 256 KB) over it
        assert int({**config["environment_variables"], **settings.get("environment_variables", {})}
                   ["MAX_WEBHOOK_BYTES"]) == MAX_WEBHOOK_BYTES, stage
        for function, overrides in settings.get("lambda_functions", {}).items():
            assert "MAX_WEBHOOK_BYTES" not in overrides.get("environment_variables", {}), (stage, function)
    assert load_settings({}).max_webhook_bytes == MAX_WEBHOOK_BYTES
    assert load_settings({"MAX_WEBHOOK_BYTES": "1000"}).max_webhook_bytes == 1000


def test_the_form_decoder_agrees_with_parse_qsl(mass_action):
    """`_pairs` replaced `urllib.parse.parse_qsl` for speed; it must decode exactly as it did."""
    assert _pairs(mass_action.decode(), MAX_KEYS) == parse_qsl(mass_action.decode(), keep_blank_values=True, strict_parsing=True)
    pieces = ["%", "%5B", "%5d", "%D0", "%B0", "%D0%B0", "%C3", "%A9", "%FF", "%2", "%zz", "%%", "+", "a", "[", "]",
              "é", "я", "%E2%82", "%AC", "%00", "%7F", "%80", "%3D", "%26", "=", "%2B", "%25"]
    rnd = random.Random(13)
    for _ in range(3000):
        fields = ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 8))) for _ in range(rnd.randint(1, 4))]
        text = "&".join(f + "=" + "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 6))) for f in fields)
        assert _pairs(text, MAX_KEYS) == parse_qsl(text, keep_blank_values=True, strict_parsing=True), text


@pytest.mark.parametrize("raw, words", [
    (b"&".join([b"account[id]=1"] * (MAX_KEYS + 1)), f"{MAX_KEYS + 1} form fields; the limit is {MAX_KEYS}"),
    (("a" + "[b]" * 11 + "=1").encode(), "nested deeper than 10 levels"),
    (("leads[" + "x" * 300 + "]=1").encode(), "longer than 256 characters"),
    (("leads" + quote("[") * 3 + "=1").encode(), "unbalanced"),
    (b"account[id]=1&leads", "has no '='"),
])
def test_bodies_over_a_parsing_limit_are_refused_naming_it(raw, words):
    with pytest.raises(WebhookError, match=re.escape(words)):
        parse_bracket_form(raw)


def test_the_field_limit_is_checked_before_any_field_is_decoded():
    flood = ("&".join(["%zz[" * 60 + "=1"] * (MAX_KEYS + 1))).encode()  # each field would be refused on its own
    with pytest.raises(WebhookError, match="the limit is"):
        parse_bracket_form(flood)


# --- acknowledging: constant work, then the worker's expansion -----------------------------------------

def test_a_mass_action_is_recorded_whole_then_expanded_into_every_lead(mass_action):
    world = World(wrap=lambda memory: Failing(memory, "mark_dirty", sticky=True))  # no entity write before the answer
    answer = world.webhook(mass_action)
    assert answer == {"accepted": 250, "queued": 0, "ignored": 0, "deferred": 250}
    assert world.memory.list_entities(IID) == [] and world.entity_messages() == []
    [(iid, batch_id)] = world.inbox_messages()  # 250 refs: one batch, one message
    assert iid == IID and len(world.memory.get_inbox(IID, batch_id)) == 250
    from chalicelib.operations import integration_status
    assert integration_status(world.memory, IID, requests_today=None)["inbox_batches"] == 1  # waiting shows
    world.store.sticky, world.store.calls = False, 1  # the worker's writes go through
    world.run_worker()
    assert world.report.expanded == 250
    hook = parse_amocrm_webhook(mass_action)
    assert sorted(world.entity_messages()) == sorted((ORDER, r.crm_id) for r in hook.refs)
    states = {e["crm_id"]: e for e in world.memory.list_entities(IID)}
    assert len(states) == 250 and all(s["dirty"] and "queued_until" in s and s["last_action"] == "status"
                                      for s in states.values())
    assert all(states[r.crm_id]["event_time"] == r.event_time for r in hook.refs)
    assert world.memory.get_inbox(IID, batch_id) is None
    assert integration_status(world.memory, IID, requests_today=None)["inbox_batches"] == 0


@pytest.mark.parametrize("entities, deferred", [(1, False), (INLINE_ENTITIES, False), (INLINE_ENTITIES + 1, True)])
def test_small_bodies_are_recorded_at_once_larger_ones_whole(amo_sandbox, entities, deferred):
    world = World()
    answer = world.webhook(mass_action_body(amo_sandbox, seed_leads(amo_sandbox, entities)))
    assert ("deferred" in answer) is deferred
    assert answer["queued"] == (0 if deferred else entities)
    assert len(world.entity_messages()) == (0 if deferred else entities)
    assert len(world.inbox_messages()) == (1 if deferred else 0)


def test_duplicates_in_one_body_count_once_towards_the_inline_limit():
    world = World()
    refs = [EntityRef(ORDER, "5", 1_700_000_000 + i, "update") for i in range(30)]  # one lead, 30 events
    assert world.ingest.record(IID, refs, origin="amocrm") == {"accepted": 30, "queued": 1, "ignored": 0}
    assert world.memory.get_entity(IID, ORDER, "5")["event_time"] == 1_700_000_029


def test_reconciliation_is_not_deferred():
    """Reconciliation and the sweep run in a scheduled job with time to spare: they keep recording entity
    by entity (webhooks and requeues from admin routes are recorded whole above INLINE_ENTITIES)."""
    world = World()
    refs = [EntityRef(ORDER, str(i), 1_700_000_000, "reconcile") for i in range(1, 51)]
    assert world.ingest.record(IID, refs, origin="reconcile")["queued"] == 50
    assert world.inbox_messages() == []


def test_a_contact_with_2000_linked_leads_is_acknowledged_with_constant_work_and_loses_no_lead(amo_sandbox):
    """Before: one write per linked lead before the answer (89 s). Every linked lead is still taken —
    linking a contact changes each lead's customer — but recorded whole and expanded by the worker."""
    body = linked_leads_contact_body(amo_sandbox, 2000)
    hook = parse_amocrm_webhook(body)
    assert len(hook.refs) == 2001 and sum(r.kind == ORDER for r in hook.refs) == 2000
    world = World(wrap=lambda memory: Failing(memory, "mark_dirty", sticky=True))
    assert world.webhook(body) == {"accepted": 2001, "queued": 0, "ignored": 0, "deferred": 2001}
    batches = world.inbox_messages()
    assert len(batches) == -(-2001 // INBOX_BATCH_REFS) == 5  # one BatchWriteItem, one SendMessageBatch
    assert sum(len(world.memory.get_inbox(IID, b)) for _, b in batches) == 2001
    world.store.sticky, world.store.calls = False, 1
    world.run_worker()  # INBOX_BATCHES_PER_RUN batches now, the others queued again for the next invocation
    assert world.report.expanded == INBOX_BATCHES_PER_RUN * INBOX_BATCH_REFS < 2001
    assert len(world.inbox_messages()) == 5 + (5 - INBOX_BATCHES_PER_RUN)
    expanded, runs = world.report.expanded, 1
    while world.memory.stale_inbox(IID, before=world.clock.now + 1):
        world.run_worker()
        expanded, runs = expanded + world.report.expanded, runs + 1
    assert expanded == 2001 and runs == -(-5 // INBOX_BATCHES_PER_RUN)
    assert sorted(world.entity_messages()) == sorted((r.kind, r.crm_id) for r in hook.refs)
    assert all(world.memory.get_inbox(IID, b) is None for _, b in batches)


# --- all or nothing, leases, no lost event ---------------------------------------------------------------

def test_one_failing_write_of_250_releases_every_lease_and_queues_nothing(mass_action):
    world = World(wrap=lambda memory: Failing(memory, "mark_dirty", nth=137))
    world.webhook(mass_action)
    [(_, batch_id)] = world.inbox_messages()
    message = world.queue.receive(10)
    with pytest.raises(Unavailable):  # the worker's batch fails: SQS delivers the message again
        world.worker.handle(message)
    assert world.store.calls == 137
    assert world.leased() == set() and world.entity_messages() == []  # the 136 leases taken were given back
    assert len(world.memory.get_inbox(IID, batch_id)) == 250  # the batch stays for the redelivery
    world.worker.handle(message)  # SQS redelivers
    assert len(set(world.entity_messages())) == 250 and len(world.leased()) == 250
    assert world.memory.get_inbox(IID, batch_id) is None


def test_a_failing_write_of_a_small_body_releases_its_leases_and_answers_unavailable():
    world = World(wrap=lambda memory: Failing(memory, "mark_dirty", nth=5))
    refs = [EntityRef(ORDER, str(i), 1_700_000_000, "status") for i in range(1, INLINE_ENTITIES + 1)]
    with pytest.raises(Unavailable):  # the app answers 503 for it; amoCRM retries
        world.ingest.record(IID, refs, origin="amocrm")
    assert world.leased() == set() and world.queue.sent == []
    assert world.ingest.record(IID, refs, origin="amocrm")["queued"] == INLINE_ENTITIES  # the retry queues all


def test_a_queue_failing_halfway_through_an_expansion_releases_every_lease(mass_action):
    world = World(queue=lambda clock: HalfwayQueue(clock, accept=1 + 100))  # the inbox message, then 100 of 250
    world.webhook(mass_action)
    [(_, batch_id)] = world.inbox_messages()
    message = world.queue.receive(10)
    with pytest.raises(Unavailable):
        world.worker.handle(message)
    assert len(world.entity_messages()) == 100
    assert world.leased() == set()  # messages may have gone for some: a duplicate at worst, never a loss
    assert len(world.memory.get_inbox(IID, batch_id)) == 250
    world.queue.accept = 10**6
    world.worker.handle(message)
    assert len(set(world.entity_messages())) == 250 and len(world.leased()) == 250


@pytest.mark.parametrize("fault", ["queue", "inbox write", "inbox write halfway"])
def test_a_failed_acknowledgement_leaves_nothing_behind(amo_sandbox, fault):
    body = linked_leads_contact_body(amo_sandbox, 1200)  # three batches
    world = World(wrap={"queue": None, "inbox write": lambda memory: Failing(memory, "put_inbox"),
                        "inbox write halfway": HalfWriting}[fault])
    if fault == "queue":
        world.queue.fail_next = 1
    with pytest.raises(Unavailable):  # 503: amoCRM retries the whole body
        world.webhook(body)
    assert world.memory.stale_inbox(IID, before=world.clock.now + 10**6) == []  # no batch left behind
    assert world.memory.list_entities(IID) == [] and world.entity_messages() == []


def test_a_batch_left_behind_is_swept_back_and_expanded(amo_sandbox):
    """The queue fails at the answer, and so does the clean-up: amoCRM gets a 503 and retries, but even
    if it never did, the batch in the inbox reaches the worker through the reconciliation sweep."""
    from tests.core import StaticSource
    body = linked_leads_contact_body(amo_sandbox, 30)
    world = World(wrap=lambda memory: Failing(memory, "delete_inbox"))
    world.queue.fail_next = 1
    with pytest.raises(Unavailable):
        world.webhook(body)
    [batch_id] = world.memory.stale_inbox(IID, before=world.clock.now + 1)
    source = StaticSource()
    world.ingest.reconcile(IID, source)  # too early: the message may still be on its way
    assert world.inbox_messages() == []
    world.clock.advance(INBOX_GRACE_SECONDS + 1)
    world.ingest.reconcile(IID, source)
    assert world.inbox_messages() == [(IID, batch_id)]
    world.run_worker()
    assert len(world.entity_messages()) == 31 and world.memory.get_inbox(IID, batch_id) is None


def test_expanded_events_keep_the_time_rules():
    """A year-2100 time is capped at expansion like at the answer, and an event older than what is
    recorded does not overwrite it."""
    world = World()
    world.ingest.record(IID, [EntityRef(ORDER, "1", 1_700_000_500, "status")], origin="amocrm")
    world.memory.claim(IID, ORDER, "1")
    refs = [EntityRef(ORDER, "1", 1_700_000_000, "update"), EntityRef(ORDER, "2", 4_102_444_800, "update")]
    refs += [EntityRef(ORDER, str(i), 1_700_000_000, "update") for i in range(3, 3 + INLINE_ENTITIES)]
    world.ingest.record(IID, refs, origin="amocrm")
    world.run_worker()
    assert world.memory.get_entity(IID, ORDER, "1")["event_time"] == 1_700_000_500  # the newer one stays
    assert world.memory.get_entity(IID, ORDER, "2")["event_time"] == 0  # capped: no clock advanced to 2100
    assert (ORDER, "2") in world.entity_messages()
    assert world.entity_messages().count((ORDER, "1")) == 1  # the first event's message only


def test_a_batch_delivered_twice_is_expanded_once(mass_action):
    world = World()
    world.webhook(mass_action)
    message = world.queue.receive(10)
    world.worker.handle(message + message)  # twice in one SQS batch
    world.worker.handle(message)  # and once more later
    assert len(world.entity_messages()) == 250


def test_one_batch_expanded_by_two_workers_at_once_queues_each_lead_once(mass_action):
    """SQS may hand the same message to two workers at once (at-least-once delivery): both read the
    batch, both record every lead; the queue lease lets one of them queue each lead, never both."""
    import threading
    world = World()
    world.webhook(mass_action)
    [(_, batch_id)] = world.inbox_messages()
    both_read = threading.Barrier(2)
    original = world.memory.get_inbox

    def get_inbox(integration_id, batch):
        refs = original(integration_id, batch)
        both_read.wait(timeout=10)  # neither deletes the batch before the other has read it
        return refs
    world.memory.get_inbox = get_inbox
    workers = [threading.Thread(target=expand_inbox, args=(world.store, world.queue, [(IID, batch_id)]),
                                kwargs={"clock": world.clock}) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert len(world.entity_messages()) == len(set(world.entity_messages())) == 250
    assert original(IID, batch_id) is None


def test_one_broken_batch_fails_no_other_and_stays_for_the_sweep(amo_sandbox):
    world = World()
    world.webhook(linked_leads_contact_body(amo_sandbox, 1200))
    batches = world.inbox_messages()
    broken = batches[1][1]
    original = world.memory.get_inbox

    def get_inbox(integration_id, batch_id):
        if batch_id == broken:
            raise KeyError("a bug")
        return original(integration_id, batch_id)
    world.memory.get_inbox = get_inbox
    expanded = failed = 0
    for _ in range(3):  # the third batch may wait for the next invocation (INBOX_BATCHES_PER_RUN)
        world.run_worker()
        expanded, failed = expanded + world.report.expanded, failed + world.report.failed_groups
    assert failed == 1 and expanded == 1201 - INBOX_BATCH_REFS
    assert world.memory.stale_inbox(IID, before=world.clock.now + 1) == [broken]


def test_the_store_unavailable_during_an_expansion_fails_the_sqs_batch():
    world = World(wrap=lambda memory: Failing(memory, "get_inbox"))
    world.memory.put_inbox(IID, {"b1": [EntityRef(ORDER, "1", 1, "add")]}, now=world.clock.now)
    with pytest.raises(Unavailable):
        expand_inbox(world.store, world.queue, [(IID, "b1")], clock=world.clock)
    assert world.memory.get_inbox(IID, "b1") is not None


# --- over the wire (moto_server) ----------------------------------------------------------------------------

class Counting:
    """A boto3 client, counting the calls per operation."""

    def __init__(self, client) -> None:
        self._client, self.calls = client, {}

    def __getattr__(self, name):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return method(*args, **kwargs)
        return call


@pytest.fixture
def amo_app(app_client, integration_id):
    from tests.conftest import admin_headers, amocrm_config
    config = amocrm_config(timezone="Europe/Moscow")  # account 32427762, as the sandbox's bodies say
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(config)).status_code == 200
    return integration_id


def post(app_client, integration_id, body):
    from tests.conftest import AMO_SECRET
    return app_client.http.post(f"/webhooks/amocrm/{integration_id}?secret={AMO_SECRET}",
                                headers={"Content-Type": "application/x-www-form-urlencoded"}, body=body)


def test_a_mass_action_costs_two_writes_on_the_local_stack(app_client, amo_app, queue, mass_action, monkeypatch):
    import app
    store, events = app.get_store(), app.get_queue()
    db, sqs = Counting(store._db._client), Counting(events._sqs)
    monkeypatch.setattr(store._db, "_client", db)
    monkeypatch.setattr(events, "_sqs", sqs)
    started = time.perf_counter()
    response = post(app_client, amo_app, mass_action)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.json_body
    assert response.json_body == {"accepted": 250, "queued": 0, "ignored": 0, "deferred": 250}
    assert db.calls.get("update_item", 0) == 0 and db.calls["batch_write_item"] == 1
    assert sqs.calls["send_message_batch"] == 1
    assert elapsed < 2.0  # amoCRM's deadline; ~0.1 s here (bench/ack_large.py measures it)
    [message] = queue.bodies()
    assert message["kind"] == INBOX
    refs = store.get_inbox(amo_app, message["crm_id"])
    assert sorted(r.crm_id for r in refs) == sorted(r.crm_id for r in parse_amocrm_webhook(mass_action).refs)


@pytest.mark.parametrize("entities", [INLINE_ENTITIES + 1, 250, 2001])
def test_the_answers_writes_do_not_grow_with_the_entities(app_client, amo_app, queue, amo_sandbox, entities, monkeypatch):
    """11 leads, 250 leads, a contact with 2,000 linked leads: one BatchWriteItem and one SendMessageBatch
    each, on moto_server; before, one UpdateItem per entity (89 s for the contact)."""
    import app
    body = (linked_leads_contact_body(amo_sandbox, 2000) if entities == 2001
            else mass_action_body(amo_sandbox, seed_leads(amo_sandbox, entities)))
    store, events = app.get_store(), app.get_queue()
    db, sqs = Counting(store._db._client), Counting(events._sqs)
    monkeypatch.setattr(store._db, "_client", db)
    monkeypatch.setattr(events, "_sqs", sqs)
    response = post(app_client, amo_app, body)
    assert response.status_code == 200 and response.json_body["deferred"] == entities, response.json_body
    writes = {name: n for name, n in {**db.calls, **sqs.calls}.items() if name not in ("get_item", "query", "get_queue_url")}
    assert writes == {"batch_write_item": 1, "send_message_batch": 1}
    assert len(queue.bodies()) == -(-entities // INBOX_BATCH_REFS)


def test_over_limit_bodies_are_refused_naming_the_limit(app_client, amo_app, queue):
    from chalicelib.settings import get_settings
    limit = get_settings().max_webhook_bytes
    response = post(app_client, amo_app, b"account[id]=1&x=" + b"y" * limit)
    assert response.status_code == 413 and f"the limit is {limit}" in response.json_body["message"]
    response = post(app_client, amo_app, b"&".join([b"account[subdomain]=shop"] + [b"f=v"] * MAX_KEYS))
    assert response.status_code == 400 and f"the limit is {MAX_KEYS}" in response.json_body["message"]
    assert queue.bodies() == []


def test_an_inbox_write_failing_at_the_answer_is_a_503(app_client, amo_app, queue, mass_action, monkeypatch):
    import app

    def unavailable(*args, **kwargs):
        raise Unavailable("store", "ProvisionedThroughputExceededException")
    monkeypatch.setattr(app.get_store(), "put_inbox", unavailable)
    response = post(app_client, amo_app, mass_action)
    assert response.status_code == 503 and response.json_body["error"] == "unavailable"
    assert queue.bodies() == []


def test_every_lead_of_a_mass_action_reaches_metrika(metrika_sandbox, mass_action):
    """The whole way: recorded whole, expanded, delivered — one order per lead in Metrika."""
    from tests.core import Core, deal_rows
    core = Core(metrika_sandbox.url, clock=Clock(float(int(time.time()))))
    shop = core.integration()
    hook = parse_amocrm_webhook(mass_action)
    core.source.rows = {(ORDER, r.crm_id): deal_rows(r.crm_id, contact="11") for r in hook.refs}
    assert core.ingest.record(shop, hook.refs, origin="amocrm")["deferred"] == 250
    core.drain()
    assert set(metrika_sandbox.counter(core.counter_id).orders) == {r.crm_id for r in hook.refs}
    assert not any(e["dirty"] for e in core.store.list_entities(shop))


# --- faults on the inbox path (issue 13 audit) ---------------------------------------------------------------

class Crash(BaseException):
    """The process dies here (Lambda's time runs out, the sandbox is frozen): nothing after it runs."""


class Dying:
    """The `nth` call of `method` kills the process: it raises `Crash`, and from then on the store takes no
    call the dead process would have made (no lease released, no batch deleted)."""

    def __init__(self, inner, method: str, nth: int) -> None:
        self._inner, self._method, self._nth = inner, method, nth
        self.calls, self.dead = 0, False

    def __getattr__(self, name):
        attribute = getattr(self._inner, name)

        def call(*args, **kwargs):
            if self.dead:
                raise Crash(name)
            if name == self._method:
                self.calls += 1
                if self.calls == self._nth:
                    self.dead = True
                    raise Crash(name)
            return attribute(*args, **kwargs)
        return call if callable(attribute) else attribute


VISIBILITY_SECONDS = 1800  # the events queue's: 6 × the worker's 300 s (tools/infra.py)


def test_a_worker_dying_halfway_through_an_expansion_loses_no_lead_and_queues_none_twice(mass_action):
    """The worker dies on the 137th of 250 writes: 136 leases taken, no message sent, nothing released.
    SQS hands the inbox message out again after its visibility timeout: the 114 others are queued then,
    and the 136 whose leases the dead worker left are swept by reconciliation once those run out. Every
    lead ends with exactly one message."""
    from tests.core import StaticSource
    world = World(wrap=lambda memory: Dying(memory, "mark_dirty", nth=137))
    assert world.webhook(mass_action)["deferred"] == 250
    [(_, batch_id)] = world.inbox_messages()
    message = world.queue.receive(10)
    with pytest.raises(Crash):
        world.worker.handle(message)
    assert world.entity_messages() == [] and len(world.leased()) == 136  # left behind by the dead worker
    assert len(world.memory.get_inbox(IID, batch_id)) == 250  # the batch stays
    world.store.dead = False  # a fresh worker
    world.clock.advance(VISIBILITY_SECONDS)
    world.worker.handle(message)  # the redelivery
    assert len(world.entity_messages()) == 114 and world.memory.get_inbox(IID, batch_id) is None
    world.ingest.reconcile(IID, StaticSource())  # the dead worker's leases still run: nothing swept yet
    assert len(world.entity_messages()) == 114
    world.clock.advance(QUEUE_LEASE_SECONDS - VISIBILITY_SECONDS + 1)
    world.ingest.reconcile(IID, StaticSource())
    world.clock.advance(600)
    world.ingest.reconcile(IID, StaticSource())  # the next run: the swept ones are leased again, nothing more
    hook = parse_amocrm_webhook(mass_action)
    assert sorted(world.entity_messages()) == sorted((ORDER, r.crm_id) for r in hook.refs)  # each exactly once


def test_dying_after_the_inbox_write_and_before_the_message_loses_no_lead(mass_action):
    """The answer's process dies between the inbox write and the queue send: amoCRM gets no 200 and
    retries (a second batch of the same leads); even if it never did, the sweep queues the first batch
    after INBOX_GRACE_SECONDS. Expanding both queues each lead once: the second finds its lease."""
    from tests.core import StaticSource

    class DyingQueue(MemoryQueue):
        store = None

        def send(self, messages, delay_seconds=0):
            if self.store.calls == 0:  # the first send: the process dies, its clean-up never runs
                self.store.calls, self.store.dead = 1, True
                raise Crash("send_message_batch")
            super().send(messages, delay_seconds)
    world = World(wrap=lambda memory: Dying(memory, "no such call", nth=1), queue=DyingQueue)
    world.queue.store = world.store
    with pytest.raises(Crash):
        world.webhook(mass_action)
    [orphan] = world.memory.stale_inbox(IID, before=world.clock.now + 1)  # written, never announced, not cleaned up
    world.store.dead = False
    world.webhook(mass_action)  # amoCRM's retry
    world.run_worker()
    assert len(world.entity_messages()) == 250
    world.clock.advance(INBOX_GRACE_SECONDS + 1)
    world.ingest.reconcile(IID, StaticSource())
    assert world.inbox_messages()[-1] == (IID, orphan)
    world.run_worker()
    assert world.memory.stale_inbox(IID, before=world.clock.now + 1) == []
    assert len(world.entity_messages()) == len(set(world.entity_messages())) == 250  # the leases held


def test_the_same_lead_twice_in_a_mass_action_is_one_ref_with_its_newest_time(amo_sandbox):
    leads = seed_leads(amo_sandbox, 250)
    again = {**leads[7], "updated_at": leads[7]["updated_at"] + 60}
    items = [amo_sandbox._lead_form(lead, {"old_status_id": 1001}) for lead in leads]
    body = amo_sandbox.webhook_body_items("leads", "status", items + [amo_sandbox._lead_form(again, {"old_status_id": 1001})])
    world = World()
    assert world.webhook(body) == {"accepted": 251, "queued": 0, "ignored": 0, "deferred": 250}
    [(_, batch_id)] = world.inbox_messages()
    refs = world.memory.get_inbox(IID, batch_id)
    assert len(refs) == 250 and [r.event_time for r in refs if r.crm_id == str(leads[7]["id"])] == [again["updated_at"]]
    world.run_worker()
    assert len(world.entity_messages()) == len(set(world.entity_messages())) == 250
    assert world.memory.get_entity(IID, ORDER, str(leads[7]["id"]))["event_time"] == again["updated_at"]


def test_a_mass_action_during_a_history_import_is_delivered_after_the_import(mass_action):
    """The import holds the leads (its lease); the mass action's expansion records the newer events but
    queues nothing (the hold's lease covers them); the import's release then fails for each — the
    import queues them itself (`backfill.py`: overtaken), so the newest state lands last."""
    world = World()
    hook = parse_amocrm_webhook(mass_action)
    holds = [world.memory.take_for_backfill(IID, ORDER, r.crm_id, r.event_time - 100, "imported", absent=True,
                                            now=world.clock.now, lease_seconds=900) for r in hook.refs]
    assert all(holds)
    world.webhook(mass_action)
    world.run_worker()
    assert world.entity_messages() == []  # the import's hold covers them
    assert all(world.memory.get_entity(IID, ORDER, r.crm_id)["event_time"] == r.event_time for r in hook.refs)
    assert not any(world.memory.release_backfilled(hold, content_hash="imported", uploading_id="u", last_order=None,
                                                   facts=None) for hold in holds)
    assert all(world.memory.get_entity(IID, ORDER, r.crm_id)["dirty"] for r in hook.refs)


def test_an_inbox_item_stays_far_under_dynamodbs_400_kb_whatever_the_ids(app_client, queue):
    """2,000 refs with 19-digit ids, 12-digit times and the longest action: split into batches of
    INBOX_BATCH_REFS, one item each, every item far under DynamoDB's 400 KB item limit ("Service, account,
    and table quotas in Amazon DynamoDB", https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/ServiceQuotas.html)."""
    import app
    from chalicelib.crm import CONTACT
    from chalicelib.crm.amocrm.webhook import CONTACT_ACTIONS
    store = app.get_store()
    longest = "contact_" + max(CONTACT_ACTIONS, key=len)
    refs = [EntityRef(CONTACT if i % 2 else ORDER, str(9_223_372_036_854_775_807 - i), 999_999_999_999, longest)
            for i in range(2000)]
    world_ingest = Ingest(store, app.get_queue(), max_body_bytes=MAX_WEBHOOK_BYTES)
    assert world_ingest.record("inbox-size", refs, origin="amocrm")["deferred"] == 2000
    batches = [m["crm_id"] for m in queue.bodies()]
    assert len(batches) == 2000 // INBOX_BATCH_REFS == 4
    from chalicelib.store.dynamodb import _pk
    client = store._db._client
    for batch_id in batches:
        item = client.get_item(TableName=store._state, Key={"pk": {"S": _pk("inbox-size")},
                                                             "sk": {"S": f"INBOX#{batch_id}"}})["Item"]
        size = sum(len(name) + len(str(next(iter(value.values())))) for name, value in item.items())
        assert size < 400 * 1024 / 8, size  # ~30 KB: under an eighth of the limit
    fields = lambda r: (r.kind, r.crm_id, r.event_time, r.action)  # noqa: E731
    assert sorted(fields(r) for b in batches for r in store.get_inbox("inbox-size", b)) == sorted(map(fields, refs))


# --- over HTTP: `chalice local` on loopback, as the local stack runs it, moto_server behind -----------------

@pytest.fixture
def local_http(monkeypatch, service_env):
    """The app under `chalice local`'s own HTTP server in this process (tests/stacks.py)."""
    with chalice_local(monkeypatch) as url:
        yield url


def padded(body: bytes, size: int) -> bytes:
    """`body` with one more amoCRM account field, making it exactly `size` bytes."""
    pad = b"&account%5Bpad%5D="
    return body + pad + b"p" * (size - len(body) - len(pad))


def chunked(body: bytes, size: int = 64 * 1024):
    """The body as a generator: `requests` sends it chunked, with no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start:start + size]


def deep(levels: int) -> bytes:
    return ("account[id]=32427762&leads" + "[x]" * levels + "=1").encode()


def wire_cases(mass_action: bytes) -> dict:
    """name → (body, request headers, expected status, words in the answer)."""
    import gzip
    import zlib
    limit = MAX_WEBHOOK_BYTES
    return {
        "mass action of 250 leads": (mass_action, {}, 200, '"deferred":250'),
        "exactly the limit": (padded(mass_action, limit), {}, 200, '"deferred":250'),
        "the limit + 1 byte": (padded(mass_action, limit + 1), {}, 413, f"is {limit + 1} bytes; the limit is {limit}"),
        "10 MB": (padded(mass_action, 10 * 1000 * 1000), {}, 413, f"the limit is {limit}"),
        "chunked mass action, no Content-Length": (chunked(mass_action), {}, 200, '"deferred":250'),
        "chunked, the limit + 1 byte": (chunked(padded(mass_action, limit + 1)), {}, 413, f"the limit is {limit}"),
        "chunked, over API Gateway's 10 MB": (chunked(padded(mass_action, 11 * 1024 * 1024)), {}, 413, "the limit is"),
        "gzip": (gzip.compress(mass_action), {"Content-Encoding": "gzip"}, 415, "Content-Encoding gzip is not accepted"),
        "deflate": (zlib.compress(mass_action), {"Content-Encoding": "deflate"}, 415, "Content-Encoding deflate"),
        "gzip bomb": (gzip.compress(b"a=" + b"0" * 50_000_000), {"Content-Encoding": "gzip"}, 415, "uncompressed"),
        "25,001 fields": (b"&".join([b"account%5Bid%5D=32427762"] + [b"f=v"] * MAX_KEYS), {}, 400,
                          f"body has {MAX_KEYS + 1} form fields; the limit is {MAX_KEYS}"),
        "nested 11 levels": (deep(11), {}, 400, "nested deeper than 10 levels"),
        "a 257-character key": (("account[id]=32427762&leads[" + "k" * 250 + "]=1").encode(), {}, 400,
                                "longer than 256 characters"),
        "percent-encoded garbage": (b"%FF%FE%zz%%%5B%5D=%C3%28&" * 2000 + b"account%5Bid%5D=%FF%00", {}, 400,
                                    "account[id] must be a numeric id"),
        "not UTF-8": (b"account%5Bid%5D=32427762&leads=\xff\xfe", {}, 400, "body is not UTF-8"),
    }


CASES = list(wire_cases(b"").keys())


@pytest.mark.parametrize("case", CASES)
def test_amocrm_bodies_over_http_are_accepted_within_the_limits_and_refused_past_them(case, local_http, amo_app,
                                                                                       queue, mass_action):
    """Every answer well inside amoCRM's 2 s, whatever the body; nothing recorded or queued for a refused one."""
    import requests
    from tests.conftest import AMO_SECRET
    body, headers, status, words = wire_cases(mass_action)[case]
    started = time.perf_counter()
    answer = requests.post(f"{local_http}/webhooks/amocrm/{amo_app}", params={"secret": AMO_SECRET}, data=body,
                           headers={"Content-Type": "application/x-www-form-urlencoded", "Connection": "close", **headers},
                           timeout=30)
    elapsed = time.perf_counter() - started
    assert (answer.status_code, words in answer.text) == (status, True), answer.text[:300]
    assert elapsed < 2.0, elapsed
    import app
    if status == 200:
        [message] = queue.bodies()
        assert message["kind"] == INBOX and len(app.get_store().get_inbox(amo_app, message["crm_id"])) == 250
    else:
        assert queue.bodies() == [] and app.get_store().stale_inbox(amo_app, before=time.time() + 10) == []


@pytest.fixture
def b24_app(app_client, integration_id):
    from tests.conftest import admin_headers, bitrix24_config
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(bitrix24_config())).status_code == 200
    return integration_id


def bitrix24_event(deal_id: str, *, pad: int = 0) -> bytes:
    """A Bitrix24 `ONCRMDEALUPDATE` as a portal sends it ("Event handlers",
    https://apidocs.bitrix24.com/api-reference/events/index.html), optionally padded to `pad` bytes."""
    from urllib.parse import urlencode

    from tests.conftest import B24_APP_TOKEN, bitrix24_config
    body = urlencode({"event": "ONCRMDEALUPDATE", "event_handler_id": "7", "data[FIELDS][ID]": deal_id,
                      "ts": str(int(time.time())), "auth[domain]": "portal.bitrix24.ru",
                      "auth[client_endpoint]": "https://portal.bitrix24.ru/rest/",
                      "auth[server_endpoint]": "https://oauth.bitrix.info/rest/",
                      "auth[member_id]": bitrix24_config()["connection"]["member_id"],
                      "auth[application_token]": B24_APP_TOKEN}).encode()
    return padded(body, pad) if pad else body


@pytest.mark.parametrize("case", ["event", "exactly the limit", "the limit + 1 byte", "chunked", "gzip", "25,001 fields"])
def test_bitrix24_bodies_over_http_are_bounded_alike(case, local_http, b24_app, queue):
    """Bitrix24 sends one event per entity ("Event handlers"): a few hundred bytes. The same limits apply,
    and its body is parsed before authentication (the token is in it), so they bound that parse too."""
    import gzip

    import requests
    limit = MAX_WEBHOOK_BYTES
    body, headers, status, words = {
        "event": (bitrix24_event("4711"), {}, 200, '"queued":1'),
        "exactly the limit": (bitrix24_event("4711", pad=limit), {}, 200, '"queued":1'),
        "the limit + 1 byte": (bitrix24_event("4711", pad=limit + 1), {}, 413, f"the limit is {limit}"),
        "chunked": (chunked(bitrix24_event("4711"), 50), {}, 200, '"queued":1'),
        "gzip": (gzip.compress(bitrix24_event("4711")), {"Content-Encoding": "gzip"}, 415, "uncompressed"),
        "25,001 fields": (bitrix24_event("4711") + b"&f=v" * MAX_KEYS, {}, 400, f"the limit is {MAX_KEYS}"),
    }[case]
    started = time.perf_counter()
    answer = requests.post(f"{local_http}/webhooks/bitrix24/{b24_app}", data=body, timeout=30,
                           headers={"Content-Type": "application/x-www-form-urlencoded", "Connection": "close", **headers})
    assert time.perf_counter() - started < 2.0
    assert (answer.status_code, words in answer.text) == (status, True), answer.text[:300]
    assert [m["crm_id"] for m in queue.bodies()] == (["4711"] if status == 200 else [])
