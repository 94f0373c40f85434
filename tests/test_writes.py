"""Issue 15, item 6: at most 3 DynamoDB writes per delivered update on the steady path, and the delivery
guarantees kept without the worker's claim.

The worker reads the entities of a first receive (`delivery_states`, no write) and closes each with the
`seq` it read (`mark_clean(version=…)`), which also ends the queue lease; an event recorded meanwhile
counts `seq`, so the close fails and the worker queues the entity again, unless someone else took a
lease (and queued). The logic tests run on the in-memory core (tests/core.py); the counts on moto's
DynamoDB with the CRM and Metrika sandboxes over loopback HTTP (bench/writes.py counts)."""
from __future__ import annotations

import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef, EntityRows
from chalicelib.ingest import FUTURE_SKEW_SECONDS, QUEUE_LEASE_SECONDS
from chalicelib.queue import Received
from chalicelib.store import CLAIM_GRACE_SECONDS
from tests.core import Core, count_calls, deal_rows

T = 1789990000


@pytest.fixture
def core(metrika_sandbox):
    return Core(metrika_sandbox.url, threads=1)


def calls_of(store, *names):
    """Count calls of the store's `names` (the object's own methods wrapped)."""
    return count_calls(store, names)

def sent_for(core, crm_id):
    return [m for m, _ in core.queue.sent if m["crm_id"] == crm_id]


# --- the read replaces the claim ----------------------------------------------------------------------

def test_a_first_receive_reads_without_a_claim_and_its_close_ends_the_lease(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    calls = calls_of(core.store, "claim", "delivery_states")
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    assert core.drain() == 1
    assert calls == {"claim": 0, "delivery_states": 1}
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is False and "queued_until" not in state and "claimed_at" not in state
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["order_status"] == "PAID"
    # the lease went with the close: the next event queues a message at once
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", T + 1, "update")], origin="amocrm")["queued"] == 1


def test_a_same_second_change_mid_delivery_is_queued_again_once_by_the_worker(core, metrika_sandbox):
    """The event meanwhile finds the delivery's lease live and queues nothing; the close fails on `seq`,
    so the worker queues the entity (once) and the second delivery sends the change."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="PAID")}

    def change_meanwhile(integration):
        if len(core.source.calls) == 1:
            core.source.rows = {(ORDER, "5"): deal_rows("5", status="CANCELLED")}
            result = core.ingest.record(shop, [EntityRef(ORDER, "5", T, "status")], origin="amocrm")
            assert result["queued"] == 0  # the lease of the message being worked on covers it

    core.source.fail = change_meanwhile
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    report = core.worker.handle(core.queue.receive())
    assert report.superseded == 1 and len(sent_for(core, "5")) == 2  # the webhook's, then the worker's
    core.drain()
    assert len(core.source.calls) == 2 and len(sent_for(core, "5")) == 2
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["order_status"] == "CANCELLED"
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is False


def test_an_expired_lease_taken_over_mid_delivery_sends_no_second_message(core, metrika_sandbox):
    """The message waited past its lease: a webhook meanwhile takes the lease over and queues. The
    delivery cannot close (a newer event) and, the lease being another's now, queues nothing more."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="PAID")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    bodies = core.queue.receive()
    core.clock.advance(QUEUE_LEASE_SECONDS + 1)

    def change_meanwhile(integration):
        if len(core.source.calls) == 1:
            core.source.rows = {(ORDER, "5"): deal_rows("5", status="CANCELLED")}
            assert core.ingest.record(shop, [EntityRef(ORDER, "5", T + 5, "status")], origin="amocrm")["queued"] == 1

    core.source.fail = change_meanwhile
    assert core.worker.handle(bodies).superseded == 1
    assert len(sent_for(core, "5")) == 2  # the first webhook's and the takeover's: none from the worker
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["order_status"] == "CANCELLED"
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is False


def test_a_resend_mid_delivery_is_delivered(core, metrika_sandbox):
    """Confirmation found an earlier upload FAILED while the entity was being delivered: `mark_resend`
    counts `seq` and keeps the live lease, the requeue queues nothing, and the worker queues it again."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    core.drain()
    core.source.rows = {(ORDER, "5"): deal_rows("5", revenue=20000)}

    def resend_meanwhile(integration):
        if len(core.source.calls) == 2:
            core.store.mark_resend(shop, ORDER, "5")
            assert core.ingest.requeue(shop, [EntityRef(ORDER, "5", T + 1, "resend")])["queued"] == 0

    core.source.fail = resend_meanwhile
    core.ingest.record(shop, [EntityRef(ORDER, "5", T + 1, "update")], origin="amocrm")
    core.drain()
    assert len(core.source.calls) == 3  # the update, then the resend the worker queued
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is False and state["row_hashes"] and "queued_until" not in state


def test_a_crash_before_the_requeue_leaves_the_entity_to_sqs_and_then_the_sweep(core):
    """The close failed, the lease was renewed, and the send failed (the process dies or the queue is
    down): the batch fails, so SQS hands the message out again; and should that message be gone, the
    sweep finds the entity once the renewed lease has run out, not before."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="PAID")}

    def change_meanwhile(integration):
        if len(core.source.calls) == 1:
            core.ingest.record(shop, [EntityRef(ORDER, "5", T, "status")], origin="amocrm")
            core.queue.fail_next = 1  # the worker's requeue

    core.source.fail = change_meanwhile
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    from chalicelib.errors import Unavailable
    with pytest.raises(Unavailable):
        core.worker.handle(core.queue.receive())
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is True and state["queued_until"] == core.clock.now + QUEUE_LEASE_SECONDS
    assert core.store.stuck_entities(shop, now=core.clock.now + QUEUE_LEASE_SECONDS - 1) == []
    assert [e["crm_id"] for e in core.store.stuck_entities(shop, now=core.clock.now + QUEUE_LEASE_SECONDS + 1)] == ["5"]


def test_the_sweep_leaves_a_message_a_worker_died_on_to_sqs(core):
    """No claim marks the receive: the lease itself outlasts the message's hidden time (the claim
    grace: visibility + one worker run), so the sweep queues no duplicate while SQS still holds it."""
    assert QUEUE_LEASE_SECONDS >= CLAIM_GRACE_SECONDS
    shop = core.integration()
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    core.queue.receive()  # the worker dies on it: SQS hides it for the visibility timeout, then again
    assert core.store.stuck_entities(shop, now=core.clock.now + CLAIM_GRACE_SECONDS - 1) == []
    assert [e["crm_id"] for e in core.store.stuck_entities(shop, now=core.clock.now + QUEUE_LEASE_SECONDS + 1)] == ["5"]


def test_a_redelivered_message_is_claimed_and_delivered(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    body = core.queue.receive()[0]
    body = body.body if isinstance(body, Received) else body
    calls = calls_of(core.store, "claim")
    core.clock.advance(1800)  # SQS hands it out again after the visibility timeout
    report = core.worker.handle([Received(body, receive_count=2)])
    assert report.uploaded == 1 and calls == {"claim": 1}
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is False and state["claimed_at"] == int(core.clock.now)


def test_an_entity_recorded_by_older_code_is_claimed_and_closed_by_its_lease(core, metrika_sandbox):
    """A dirty item without `seq` was recorded by the code before this one (queued before a deploy, or
    by a webhook Lambda still on it, whose same-second events count no `seq`): it is claimed, and a
    change meanwhile (which takes the lease the claim dropped, and queues) keeps it dirty."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="PAID")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    core.store._entities[shop][(ORDER, "5")].pop("seq")  # as the older mark_dirty left it
    calls = calls_of(core.store, "claim")

    def change_meanwhile(integration):
        if len(core.source.calls) == 1:
            core.source.rows = {(ORDER, "5"): deal_rows("5", status="CANCELLED")}
            item = core.store._entities[shop][(ORDER, "5")]
            assert core.ingest.record(shop, [EntityRef(ORDER, "5", T, "status")], origin="amocrm")["queued"] == 1
            item.pop("seq")  # the older code's write counted none

    core.source.fail = change_meanwhile
    report = core.worker.handle(core.queue.receive())
    assert calls == {"claim": 1} and report.superseded == 1
    assert len(sent_for(core, "5")) == 2  # the first webhook's and the second's: none from the worker
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["order_status"] == "CANCELLED"
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is False


def test_a_parked_entity_recorded_meanwhile_is_queued_again(core):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): EntityRows(error={"kind": "permanent", "message": "bad deal"})}

    def change_meanwhile(integration):
        if len(core.source.calls) == 1:
            core.source.rows = {(ORDER, "5"): deal_rows("5")}
            core.ingest.record(shop, [EntityRef(ORDER, "5", T, "update")], origin="amocrm")

    core.source.fail = change_meanwhile
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    core.drain()
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is False and "last_error" not in state and state["content_hash"]


def test_a_close_needs_both_the_event_time_and_the_seq_it_read(core):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    state = core.store.get_entity(shop, ORDER, "5")
    assert core.store.mark_clean(shop, ORDER, "5", event_time=T + FUTURE_SKEW_SECONDS, content_hash="h",
                                 row_hashes={}, uploading_id=None, version=state["seq"]) is False
    assert core.store.mark_clean(shop, ORDER, "5", event_time=T, content_hash="h", row_hashes={},
                                 uploading_id=None, version=state["seq"] + 1) is False
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is True


# --- contacts noted only when their row went up -------------------------------------------------------

def test_a_deal_update_notes_its_contact_only_when_the_customer_row_went_up(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}  # with CRM contact 11
    noted = []
    real = core.store.note_contacts_sent
    core.store.note_contacts_sent = lambda iid, hashes: (noted.append(dict(hashes)), real(iid, hashes))[1]
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    core.drain()
    assert [list(n) for n in noted] == [["11"]]  # its row went up: contact 11 is noted as sent
    first = len(noted)
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="CANCELLED")}  # the deal changes, its contact not
    core.ingest.record(shop, [EntityRef(ORDER, "5", T + 1, "status")], origin="amocrm")
    core.drain()
    assert len(noted) == first  # no write that repeats what the contact's state holds
    assert len([r for r in metrika_sandbox.requests if "/data/contacts/" in r["path"]]) == 1
    changed = deal_rows("5", status="CANCELLED")
    changed.contacts[0]["phones"] = ["+7 916 000-00-00"]
    core.source.rows = {(ORDER, "5"): changed}
    core.ingest.record(shop, [EntityRef(ORDER, "5", T + 2, "update")], origin="amocrm")
    core.drain()
    assert len([r for r in metrika_sandbox.requests if "/data/contacts/" in r["path"]]) == 2
    assert len(noted) == first + 1 and core.store.get_entity(shop, CONTACT, "11")["content_hash"] == noted[-1]["11"]


# --- the entity's own writes per update, counted on the store's interface (fast) -------------------------

ENTITY_WRITES = ("mark_dirty", "claim", "mark_clean", "mark_failed", "note_attempt", "note_contacts_sent",
                 "record_customer", "renew_queue_lease", "release_queue_lease", "mark_resend")


@pytest.mark.parametrize("webhooks", [1, 2])
def test_an_update_writes_once_per_webhook_and_once_to_close(core, webhooks):
    """amoCRM sends `update_lead` and, for a stage change, `status_lead` too (two webhooks, one second):
    each is recorded (an event meanwhile must fail the delivery's close, even in the same second); then
    one close. Nothing else is written for the entity on the steady path: no claim, no contact note, no
    customer record (the contact did not change)."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    core.drain()
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="CANCELLED", revenue=20000)}
    calls = calls_of(core.store, *ENTITY_WRITES)
    for action in ("update", "status")[:webhooks]:
        core.ingest.record(shop, [EntityRef(ORDER, "5", T + 60, action)], origin="amocrm")
    core.drain()
    assert {k: n for k, n in calls.items() if n} == {"mark_dirty": webhooks, "mark_clean": 1}
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is False


# --- the count, on DynamoDB (moto) with the sandboxes ---------------------------------------------------

@pytest.fixture(scope="module")
def rig(service_env, metrika_sandbox):
    from bench.writes import Rig
    return Rig(metrika_sandbox.url)


STEADY = 3.0  # the budget: DynamoDB writes per delivered update on the steady path


def test_writes_per_update_in_a_batch_of_ten_amocrm_deals(rig, amocrm, metrika_sandbox):
    from bench.writes import measure_amocrm
    amocrm.reset()
    measured = measure_amocrm(rig, amocrm, metrika_sandbox, deals=10)
    by_method = measured.delivery.by_method()
    assert measured.webhooks == 10 and measured.uploads == 1
    assert by_method["mark_dirty"] == 10 and by_method["mark_clean"] == 10  # one each per deal
    assert by_method["claim"] == 0 and by_method["note_contacts_sent"] == 0 and by_method["record_customer"] == 0
    assert measured.delivery.own() == 20
    # the CRM read's two requests (leads, contacts), one rate-limiter write each: the second finds the
    # scope busy and goes the busy way first (a refused conditional write is billed too)
    assert by_method["reserve_slot"] == 2
    assert measured.steady_per_update() <= STEADY, measured
    assert measured.run_writes() <= 4  # the confirm run: its Metrika read's lease and count, and its cursor


def test_a_retry_noted_after_another_delivery_closed_the_entity_leaves_it_no_lease(core, metrika_sandbox):
    """SQS delivers at least once: two workers can hold the same message. One delivers and closes the
    deal; the other's CRM read fails meanwhile, and its retry must not put a queue lease on the clean
    deal: the retry message finds it clean and is dropped, and a lease left behind would make the next
    webhook's change "covered" by no message for 35 minutes (issue 13)."""
    from chalicelib.errors import Transient
    from chalicelib.worker import Worker
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", T, "add")], origin="amocrm")
    bodies = core.queue.receive()
    other = Worker(core.store, core.queue, core.metrika_for, core.sources, clock=core.clock, threads=1)

    def the_other_worker_delivers_first(integration):
        if len(core.source.calls) == 1:  # this worker's read: the other one delivers the duplicate now
            other.handle(list(bodies))
            raise Transient("amoCRM answered 503", source="amocrm", status=503)

    core.source.fail = the_other_worker_delivers_first
    assert core.worker.handle(bodies).retried == 1
    core.source.fail = None
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is False and "queued_until" not in state
    core.drain()  # the retry message finds the deal clean
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="CANCELLED")}
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", T + 60, "status")], origin="amocrm")["queued"] == 1
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["order_status"] == "CANCELLED"
