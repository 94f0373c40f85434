"""The history import's logic on the in-memory store and queue: the amoCRM and Metrika sandboxes over
loopback HTTP, no DynamoDB or SQS. The full-size runs with stop and resume over moto are in
test_backfill.py (and bench/backfill.py)."""
from __future__ import annotations

import json
import time

import pytest

from chalicelib.crm.amocrm.source import AmoCrmSource
from tests.core import Clock, Core

DEALS, CONTACTS = 40, 20


@pytest.fixture
def setup(metrika_sandbox, amocrm):
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    people = [amocrm.create_contact(f"Клиент {n}", phones=[f"+7 916 {n:07d}"], notify=False)["id"] for n in range(CONTACTS)]
    for n in range(DEALS):
        amocrm.create_lead(f"Сделка {n}", 7001, (1001, 142)[n % 2], price=1000 + n,
                           contacts=[] if n % 10 == 9 else [people[n % CONTACTS]], notify=False)
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["amocrm"] = AmoCrmSource(core.store.reserve_slot, backoff=0.01)
    shop = core.integration(connection={"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": "s" * 20})
    core.store.put_status_mapping(shop, [
        {"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"},
        {"crm_status": "7001:142", "metrika_status_id": "won", "type": "PAID"}], 0)
    metrika_sandbox.counter(core.counter_id).order_statuses.update(
        {"new": {"id": "new", "type": "IN_PROGRESS"}, "won": {"id": "won", "type": "PAID"}})
    return core, shop, people


def test_an_import_sends_every_contact_and_deal_once(setup, amocrm, metrika_sandbox):
    core, shop, people = setup
    assert core.backfill.start(shop, {"since": int(time.time()) - 86400})["started"] is True
    core.drain()
    job = core.backfill.status(shop)["backfill"]
    assert job["state"] == "done", job
    counter = metrika_sandbox.counter(core.counter_id)
    assert set(counter.orders) == {str(i) for i in amocrm.leads}
    assert all(n == 1 for n in counter.times_uploaded.values())
    assert job["counts"]["orders_sent"] == DEALS and job["counts"]["contacts_sent"] == CONTACTS + DEALS // 10


def test_a_failed_orders_upload_is_retried_without_resending_what_went(setup, amocrm, metrika_sandbox):
    """The deals' step uploads its synthesised customers, then its orders fail: the retry re-reads the
    same deals and sends only the orders; the counts stay exact."""
    core, shop, people = setup
    metrika_sandbox.set_faults(error_503=1.0, paths="/data/orders/")
    core.backfill.start(shop, {"since": int(time.time()) - 86400})
    for _ in range(20):
        core.worker.handle(core.queue.receive())
        if (core.backfill.status(shop)["backfill"].get("error") or "").startswith("Metrika answered 503"):
            break
    else:
        pytest.fail("the orders upload never failed")
    metrika_sandbox.set_faults()
    core.drain()
    job = core.backfill.status(shop)["backfill"]
    counter = metrika_sandbox.counter(core.counter_id)
    assert job["state"] == "done" and set(counter.orders) == {str(i) for i in amocrm.leads}
    assert {k: n for k, n in counter.times_uploaded.items() if n != 1} == {}
    assert job["counts"]["read"] == CONTACTS + DEALS and job["counts"]["orders_sent"] == DEALS
    assert job["counts"]["contacts_sent"] == CONTACTS + DEALS // 10


def test_a_redelivered_step_message_starts_no_second_chain(setup, amocrm, metrika_sandbox):
    """SQS redelivers a batch that failed after the step had saved its progress and queued the next
    one: the old message must do nothing, or two chains would read the same pages."""
    core, shop, people = setup
    core.backfill.start(shop, {"since": int(time.time()) - 86400})
    first = core.queue.receive()
    core.worker.handle(first)  # step 0 done: the contacts, and step 1 is queued
    after_one = core.backfill.status(shop)["backfill"]
    assert after_one["steps"] == 1 and len(core.queue) == 1
    core.worker.handle(first)  # the same message again
    assert core.backfill.status(shop)["backfill"] == after_one and len(core.queue) == 1
    core.drain()
    job = core.backfill.status(shop)["backfill"]
    assert job["state"] == "done" and job["counts"]["orders_sent"] == DEALS
    assert all(n == 1 for n in metrika_sandbox.counter(core.counter_id).times_uploaded.values())


def test_an_import_running_across_the_upgrade_resumes_with_its_old_progress(setup, amocrm, metrika_sandbox):
    """A step that failed before this version saved `partial` without `accepted` (it had `contacts`)."""
    core, shop, people = setup
    core.backfill.start(shop, {"since": int(time.time()) - 86400})
    job = core.store.get_backfill(shop)
    job["partial"] = {"counts": {"read": 0}, "settled": [], "contacts": {}}
    core.store.put_backfill(shop, job)
    core.drain()
    job = core.backfill.status(shop)["backfill"]
    assert job["state"] == "done" and job["counts"]["orders_sent"] == DEALS


def test_an_import_whose_step_was_dead_lettered_is_shown_stalled_and_resumed_by_starting_it_again(setup, amocrm,
                                                                                                  metrika_sandbox):
    """The step's message is lost (dead-lettered): the job says "running" with nothing queued. Starting
    again before STALLED_SECONDS changes nothing; after it, the import resumes under a new run id and a
    redrive of the old message is void (nothing sent twice)."""
    from chalicelib.backfill import STALLED_SECONDS
    core, shop, people = setup
    core.backfill.start(shop, {"since": int(time.time()) - 86400})
    (lost,) = core.queue.receive()  # the step's message, gone to the dead-letter queue
    assert "stalled" not in core.backfill.status(shop)["backfill"]
    core.clock.advance(STALLED_SECONDS - 5)
    assert core.backfill.start(shop, {})["started"] is False and len(core.queue) == 0
    core.clock.advance(10)
    job = core.backfill.status(shop)["backfill"]
    assert job["state"] == "running" and "dead-letter" in job["stalled"]
    assert core.backfill.start(shop, {})["started"] is True
    core.queue.send([json.loads(lost)])  # the operator redrives the old message too
    core.drain()
    job = core.backfill.status(shop)["backfill"]
    assert job["state"] == "done" and "stalled" not in job
    assert all(n == 1 for n in metrika_sandbox.counter(core.counter_id).times_uploaded.values())
    assert job["counts"]["orders_sent"] == DEALS


def test_a_stop_during_a_step_keeps_none_of_its_progress_and_the_resumed_run_sends_nothing_twice(setup, amocrm,
                                                                                                metrika_sandbox):
    """Ctrl-C on `python -m tools.backfill` stops the job while a step runs: that step finishes its
    uploads but saves no progress (its job is stopped) and queues no next step; starting again re-reads
    its entities from the saved cursor and skips each one that went."""
    core, shop, people = setup
    source = core.sources["amocrm"]
    read_page = source.backfill_page

    def read_then_stop(*args, **kwargs):
        page = read_page(*args, **kwargs)
        core.backfill.stop(shop)  # the stop request arrives while the step runs
        return page

    source.backfill_page = read_then_stop
    since = int(time.time()) - 86400
    core.backfill.start(shop, {"since": since})
    core.worker.handle(core.queue.receive())
    stopped = core.backfill.status(shop)["backfill"]
    assert stopped["state"] == "stopped" and stopped["phase"] == "contacts", stopped
    assert stopped["steps"] == 0 and stopped["cursor"] is None and stopped["counts"]["read"] == 0, stopped
    assert len(core.queue) == 0  # no next step: the chain ends here
    counter = metrika_sandbox.counter(core.counter_id)
    assert set(counter.times_uploaded) == {f"contacts:{c}" for c in people}  # the step's uploads went
    source.backfill_page = read_page
    assert core.backfill.start(shop, {"since": since})["started"] is True
    core.drain()
    job = core.backfill.status(shop)["backfill"]
    assert job["state"] == "done" and set(counter.orders) == {str(i) for i in amocrm.leads}
    assert {k: n for k, n in counter.times_uploaded.items() if n != 1} == {}
    assert job["counts"]["skipped"] == CONTACTS and job["counts"]["contacts_sent"] == DEALS // 10, job
