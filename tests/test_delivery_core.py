"""The delivery core's guarantees, on the in-memory store and queue with a fake clock; Metrika is the
sandbox over loopback HTTP. Each defect the outside sweep reproduced has its regression test here."""
from __future__ import annotations

import json

import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef, EntityRows
from chalicelib.delivery import Accepted, Parked, Pending, Retry, Sink, merge_contacts
from chalicelib.errors import Permanent, Unavailable
from chalicelib.ingest import FUTURE_SKEW_SECONDS, QUEUE_LEASE_SECONDS
from tests.core import Core, deal_rows

CLIENT_ID = "1714651234567890123"


@pytest.fixture
def core(metrika_sandbox):
    return Core(metrika_sandbox.url)


def uploads_of(sandbox, kind):
    return [r for r in sandbox.requests if f"/data/{kind}/" in r["path"]]


# --- 1. one row per id in an upload: the ClientID survives ------------------------------------------------

def test_lead_and_its_contact_in_one_batch_keep_the_leads_client_id(core, metrika_sandbox):
    """`add_lead` and `add_contact` of a new deal land in one batch; both make a row for contact 11,
    only the lead's carries the ClientID. Before: the last row won and the ClientID never arrived."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", client_ids=[CLIENT_ID]),
                        (CONTACT, "11"): EntityRows(contacts=[{"uniq_id": "11", "name": "Иван Петров",
                                                               "emails": ["ivan@example.com"]}])}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add"), EntityRef(CONTACT, "11", 1789990000, "add")],
                       origin="amocrm")
    assert core.drain() == 1
    contact = metrika_sandbox.counter(core.counter_id).contacts["11"]
    assert contact["client_ids"] == [CLIENT_ID]
    assert contact["phones"] == ["79161234567"] and contact["emails"] == ["ivan@example.com"]
    assert len(uploads_of(metrika_sandbox, "contacts")) == 1  # one row for the id, one upload
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is False
    assert core.store.get_entity(shop, CONTACT, "11")["dirty"] is False


def test_merge_unites_identifiers_and_takes_the_newest_scalars():
    older = {"uniq_id": "11", "name": "Old", "update_date_time": "2026-09-20 10:00:00",
             "client_ids": ["1"], "phones": ["79161234567"]}
    newer = {"uniq_id": "11", "name": "New", "update_date_time": "2026-09-21 10:00:00",
             "client_ids": ["2", "1"], "emails": ["a@b.ru"]}
    assert merge_contacts([newer, older]) == {"uniq_id": "11", "name": "New", "update_date_time": "2026-09-21 10:00:00",
                                              "client_ids": ["1", "2"], "phones": ["79161234567"], "emails": ["a@b.ru"]}


# --- 2. recording is atomic from the CRM's point of view -----------------------------------------------

def test_a_queue_failure_releases_the_leases_so_the_retry_queues(core):
    shop = core.integration()
    core.queue.fail_next = 1
    refs = [EntityRef(ORDER, "5", 1789990000, "add"), EntityRef(ORDER, "6", 1789990000, "add")]
    with pytest.raises(Unavailable):
        core.ingest.record(shop, refs, origin="amocrm")
    assert core.ingest.record(shop, refs, origin="amocrm")["queued"] == 2  # the CRM's retry


def test_a_store_failure_mid_body_releases_what_it_took(core):
    shop = core.integration()
    real = core.store.mark_dirty
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    core.store.mark_dirty = second_fails
    with pytest.raises(RuntimeError):
        core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add"), EntityRef(ORDER, "6", 1789990000, "add")],
                           origin="amocrm")
    core.store.mark_dirty = real
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990001, "update")], origin="amocrm")["queued"] == 1


def test_a_crash_between_record_and_send_is_recovered_by_the_sweep(core, metrika_sandbox):
    """The process dies after the state write and before the message (nothing released). Before:
    the entity stayed flagged queued forever; webhooks, reconciliation and replay all queued 0."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.store.mark_dirty(shop, EntityRef(ORDER, "5", 1789990000, "add"), now=core.clock(),
                          lease_seconds=QUEUE_LEASE_SECONDS, future_skew=FUTURE_SKEW_SECONDS)  # …and no send
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990010, "update")], origin="amocrm")["queued"] == 0
    assert core.ingest.reconcile(shop, core.source)["swept"] == 0  # the lease may still be honest
    core.clock.advance(QUEUE_LEASE_SECONDS + 1)
    assert core.ingest.reconcile(shop, core.source)["swept"] == 1
    core.drain()
    assert "5" in metrika_sandbox.counter(core.counter_id).orders
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is False


def test_after_the_lease_runs_out_the_next_webhook_queues(core):
    shop = core.integration()
    core.store.mark_dirty(shop, EntityRef(ORDER, "5", 1789990000, "add"), now=core.clock(),
                          lease_seconds=QUEUE_LEASE_SECONDS, future_skew=FUTURE_SKEW_SECONDS)
    core.clock.advance(QUEUE_LEASE_SECONDS + 1)
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "update")], origin="amocrm")["queued"] == 1


# --- 3. a future event time cannot freeze a deal ---------------------------------------------------------

def test_a_future_event_time_is_capped_and_later_changes_still_arrive(core, metrika_sandbox, caplog):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="IN_PROGRESS")}
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", 4102444800, "update")], origin="amocrm")["queued"] == 1
    assert core.store.get_entity(shop, ORDER, "5")["event_time"] == 0  # recorded, but the clock did not move
    assert "event_time_capped" in caplog.text
    core.drain()
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="PAID")}
    # The CRM's own clock runs hours behind ours: its next real change must still count.
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", int(core.clock()) - 4 * 3600, "status")],
                              origin="amocrm")["queued"] == 1
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["order_status"] == "PAID"


def test_a_future_time_stored_by_older_code_gives_way_to_a_real_event(core):
    shop = core.integration()
    core.store.mark_dirty(shop, EntityRef(ORDER, "5", 4102444800, "update"), now=4102444800,
                          lease_seconds=0, future_skew=0)  # as the old code stored it
    core.store.claim(shop, ORDER, "5")
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", int(core.clock()), "status")], origin="amocrm")["queued"] == 1
    assert core.store.get_entity(shop, ORDER, "5")["event_time"] == int(core.clock())
    # …and a second bogus time neither advances the clock nor is dropped.
    core.store.claim(shop, ORDER, "5")
    assert core.ingest.record(shop, [EntityRef(ORDER, "5", 4102444800, "update")], origin="amocrm")["queued"] == 1
    assert core.store.get_entity(shop, ORDER, "5")["event_time"] == int(core.clock())


# --- 5. one integration's failure fails nobody else ------------------------------------------------------

def test_an_unexpected_error_in_one_integration_retries_only_that_group(core, metrika_sandbox):
    shop, other = core.integration("shop"), core.integration("other", counter_id=7071)
    core.source.rows = {(ORDER, "5"): deal_rows("5"), (ORDER, "6"): deal_rows("6")}

    def html_instead_of_json(integration):
        if integration["counter_id"] == 7071:
            raise json.JSONDecodeError("Expecting value", "<html>maintenance</html>", 0)

    core.source.fail = html_instead_of_json
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    core.ingest.record(other, [EntityRef(ORDER, "6", 1789990000, "add")], origin="amocrm")
    report = core.worker.handle(core.queue.receive())
    assert report.failed_groups == 1 and report.uploaded == 1
    assert "5" in metrika_sandbox.counter(7070).orders
    failed = core.store.get_entity(other, ORDER, "6")
    assert failed["dirty"] is True and failed["attempts"] == 1 and "JSONDecodeError" in failed["last_error"]["message"]
    assert len(core.queue) == 1  # only the failed group's entity waits, with backoff
    core.source.fail = None
    core.drain()
    assert "6" in metrika_sandbox.counter(7071).orders


def test_a_group_that_keeps_failing_is_parked_with_the_error(metrika_sandbox):
    core = Core(metrika_sandbox.url, retry_limit=2)
    shop = core.integration()
    core.source.fail = lambda integration: 1 / 0
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    core.drain()
    parked = core.store.get_entity(shop, ORDER, "5")
    assert parked["dirty"] is False and parked["last_error"]["message"].startswith("gave up after 2 retries")
    assert "ZeroDivisionError" in parked["last_error"]["message"]


def test_a_malformed_message_is_dropped_not_fatal(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    report = core.worker.handle(["not json", json.dumps({"kind": "order"})] + core.queue.receive())
    assert report.uploaded == 1


def test_store_unavailable_fails_the_batch_for_sqs_to_redeliver(core):
    shop = core.integration()
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")

    def unavailable(*args, **kwargs):
        raise Unavailable("store", "drill")

    core.store.delivery_states = unavailable  # the read before a delivery
    with pytest.raises(Unavailable):
        core.worker.handle(core.queue.receive())


def test_product_naming_failure_never_holds_an_order(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", products={"77": 1})}

    def refuse(integration, products):
        raise Permanent("ACCESS_DENIED", source="bitrix24")

    core.source.product_names = refuse
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["products"] == {"77": 1}


# --- 6. retries send only what Metrika has not accepted ------------------------------------------------

def test_accepted_contacts_are_not_sent_again_while_orders_fail(core, metrika_sandbox):
    """Before: an entity counted as done only when all its rows were accepted, so each retry sent the
    contacts again and needed two lucky requests."""
    shop = core.integration()
    core.source.rows = {(ORDER, str(i)): deal_rows(str(i), contact=str(100 + i)) for i in range(20)}
    metrika_sandbox.set_faults(error_503=1.0, paths="/data/orders/")
    core.ingest.record(shop, [EntityRef(ORDER, str(i), 1789990000, "add") for i in range(20)], origin="amocrm")
    core.worker.handle(core.queue.receive())  # 20 entities: the body is expanded first (ingest.INLINE_ENTITIES)
    core.worker.handle(core.queue.receive())
    state = core.store.get_entity(shop, ORDER, "3")
    assert state["dirty"] is True and state["attempts"] == 1 and "contact:103" in state["row_hashes"]
    metrika_sandbox.set_faults(paths="/data/orders/")  # Metrika is back
    core.drain()
    counter = metrika_sandbox.counter(core.counter_id)
    assert len(counter.orders) == 20
    assert len(uploads_of(metrika_sandbox, "contacts")) == 1  # the retry sent only the orders
    assert all(counter.times_uploaded[f"contacts:{100 + i}"] == 1 for i in range(20))


def test_a_refused_row_parks_only_its_entity_and_the_rest_goes(core, metrika_sandbox):
    shop = core.integration()
    metrika = core.metrika_for(core.store.get_integration(shop))
    sink = Sink(core.store, metrika)
    pending = [Pending((ORDER, "5"), deal_rows("5")), Pending((ORDER, "6"), deal_rows("6", status="never-mapped", contact="12"))]
    metrika_sandbox.counter(core.counter_id).order_statuses.clear()
    delivery = sink.deliver(shop, core.store.get_integration(shop), pending)
    outcomes = delivery.outcomes
    assert isinstance(outcomes[(ORDER, "5")], Accepted)
    assert isinstance(outcomes[(ORDER, "6")], Parked)
    assert outcomes[(ORDER, "6")].error["errors"][0]["location"].startswith("orders[")
    assert set(metrika_sandbox.counter(core.counter_id).orders) == {"5"}


def test_unchanged_content_is_not_uploaded_and_a_changed_customer_sends_only_the_contact(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    core.drain()
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990060, "update")], origin="amocrm")
    core.drain()
    assert len(metrika_sandbox.requests) == 2 and len(core.source.calls) == 2
    core.source.rows = {(ORDER, "5"): deal_rows("5", client_ids=[CLIENT_ID])}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990120, "update")], origin="amocrm")
    core.drain()
    assert [r["path"].rsplit("/", 2)[-2] for r in metrika_sandbox.requests] == ["contacts", "orders", "contacts"]


def test_a_daily_quota_wait_is_not_a_failed_attempt(core, metrika_sandbox):
    shop = core.integration()
    metrika = core.metrika_for(core.store.get_integration(shop))
    for _ in range(metrika.governor.daily_budget):
        core.store.count_request(metrika.governor._key, metrika.governor._day(), metrika.governor.daily_budget)
    outcome = Sink(core.store, metrika).deliver(shop, core.store.get_integration(shop),
                                               [Pending((ORDER, "5"), deal_rows("5"))]).outcomes[(ORDER, "5")]
    assert isinstance(outcome, Retry) and outcome.count_attempt is False and outcome.after > 0
    assert metrika_sandbox.requests == []


def test_deleted_deal_is_resent_cancelled_and_a_never_sent_one_is_left(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add"), EntityRef(ORDER, "9", 1789990000, "add")],
                       origin="amocrm")
    core.source.rows[(ORDER, "9")] = EntityRows(gone=True)
    core.drain()
    core.source.rows = {(ORDER, "5"): EntityRows(gone=True)}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990100, "delete")], origin="amocrm")
    core.drain()
    orders = metrika_sandbox.counter(core.counter_id).orders
    assert orders["5"]["order_status"] == "CANCELLED" and "9" not in orders


# --- found by review: equal times, reverts, fully delivered entities, poison entities ------------------------

def test_a_change_recorded_mid_delivery_with_the_same_time_is_delivered(core, metrika_sandbox):
    """Two changes in one second (or a capped future time, which keeps the recorded time): the second
    event arrives while the first delivery runs, with the very time the claim saw."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", status="PAID")}

    def change_meanwhile(integration):
        if len(core.source.calls) == 1:
            core.source.rows = {(ORDER, "5"): deal_rows("5", status="CANCELLED")}
            core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "status")], origin="amocrm")

    core.source.fail = change_meanwhile
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    core.drain()
    assert len(core.source.calls) == 2
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["order_status"] == "CANCELLED"
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is False


def test_a_revert_after_a_partial_send_is_sent_again(core, metrika_sandbox):
    """Phone A delivered; changed to B, contacts accepted, orders failed; reverted to A before the
    retry: Metrika holds B for the contact, so A must go up again."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    core.drain()
    changed = deal_rows("5", revenue=20000)
    changed.contacts[0]["phones"] = ["+7 916 000-00-00"]
    core.source.rows = {(ORDER, "5"): changed}
    metrika_sandbox.set_faults(error_503=1.0, paths="/data/orders/")
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990100, "update")], origin="amocrm")
    core.worker.handle(core.queue.receive())
    assert metrika_sandbox.counter(core.counter_id).contacts["11"]["phones"] == ["79160000000"]  # SAVE: B only
    metrika_sandbox.set_faults(paths="/data/orders/")
    core.source.rows = {(ORDER, "5"): deal_rows("5")}  # reverted in the CRM
    core.drain()
    contact_uploads = [r for r in metrika_sandbox.requests if "/data/contacts/" in r["path"]]
    assert len(contact_uploads) == 3  # A, B, and A again
    assert metrika_sandbox.counter(core.counter_id).contacts["11"]["phones"] == ["79161234567"]
    assert metrika_sandbox.counter(core.counter_id).orders["5"]["revenue"] == 15990


def test_a_contact_whose_rows_went_up_is_delivered_though_orders_then_fail(core, metrika_sandbox):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", contact="11"),
                        (CONTACT, "12"): EntityRows(contacts=[{"uniq_id": "12", "name": "Пётр"}])}
    metrika_sandbox.set_faults(error_503=1.0, paths="/data/orders/")
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add"), EntityRef(CONTACT, "12", 1789990000, "add")],
                       origin="amocrm")
    report = core.worker.handle(core.queue.receive())
    assert report.retried == 1 and report.uploaded == 1
    contact = core.store.get_entity(shop, CONTACT, "12")
    assert contact["dirty"] is False and contact.get("attempts", 0) == 0
    assert core.store.get_entity(shop, ORDER, "5")["attempts"] == 1


def test_one_poison_entity_holds_up_only_itself(metrika_sandbox):
    core = Core(metrika_sandbox.url, retry_limit=1)
    shop = core.integration()
    good = {(ORDER, str(i)): deal_rows(str(i), contact=str(100 + i)) for i in range(3)}
    core.source.rows = dict(good)

    def choke_on_7(integration):
        if [(ORDER, "7")] != core.source.calls[-1] and (ORDER, "7") in core.source.calls[-1]:
            raise KeyError("custom_fields_values")  # the translation chokes on one lead of the batch
        if core.source.calls[-1] == [(ORDER, "7")]:
            raise KeyError("custom_fields_values")

    core.source.fail = choke_on_7
    core.ingest.record(shop, [EntityRef(ORDER, k[1], 1789990000, "add") for k in good]
                       + [EntityRef(ORDER, "7", 1789990000, "add")], origin="amocrm")
    core.drain()
    assert set(metrika_sandbox.counter(core.counter_id).orders) == {"0", "1", "2"}
    poison = core.store.get_entity(shop, ORDER, "7")
    assert poison["dirty"] is False and "KeyError" in poison["last_error"]["message"]


def test_replay_refuses_an_id_that_is_not_a_crm_id(core):
    from chalicelib.errors import ApiError
    from chalicelib.operations import replay
    shop = core.integration()
    for bad in ("9" * 2000, "abc", True, None, "1.5"):
        with pytest.raises(ApiError) as refused:
            replay(core.store, core.ingest.requeue, shop, {"kind": "order", "crm_id": bad})
        assert refused.value.status == 400 and "crm_id" in refused.value.message
