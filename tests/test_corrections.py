"""Corrections in the CRM reach Metrika (issue 13, item 5): each customer's row is built from what the CRM
says now across the contact and its deals, recorded source by source, and sent with SAVE, so a value
removed in the CRM leaves Metrika with the next change. Real amoCRM and Metrika sandboxes over loopback,
the real amoCRM source and translators; the in-memory store and queue (tests/core.py)."""
from __future__ import annotations

import time

import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef
from chalicelib.crm.amocrm.source import AmoCrmSource
from chalicelib.crm.bitrix24.translate import deal_rows
from chalicelib.customers import OVERFLOW_SOURCE, plan_customers
from chalicelib.normalize import md5_hex
from sandbox.metrika import _merge
from tests.core import Clock, Core

MANAGER = "1700000000000000001"  # the manager's own browser, captured by a form into a deal
VISITOR = "1714651234567890123"
OTHER_VISIT = "1714651234567890999"
PHONE_A, PHONE_B = "+7 916 123-45-67", "+7 916 000-00-00"


def ym_uid(*client_ids: str) -> list[dict]:
    return [{"field_id": 752013, "field_name": "_ym_uid", "field_code": "_YM_UID", "field_type": "tracking_data",
             "values": [{"value": c} for c in client_ids]}]


@pytest.fixture
def crm(metrika_sandbox, amocrm):
    amocrm.reset()
    amocrm.rate_limit = 10_000  # amoCRM's request spacing is not under test here: no waiting between requests
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["amocrm"] = AmoCrmSource(lambda scope, interval, now: now, backoff=0.01)
    core.shop = core.integration(connection={"base_url": amocrm.url, "access_token": amocrm.token,
                                             "webhook_secret": "s" * 20})
    core.store.put_status_mapping(core.shop, [
        {"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"},
        {"crm_status": "7001:142", "metrika_status_id": "won", "type": "PAID"}], 0)
    metrika_sandbox.counter(core.counter_id).order_statuses.update(
        {"new": {"id": "new", "type": "IN_PROGRESS"}, "won": {"id": "won", "type": "PAID"},
         "CANCELLED": {"id": "CANCELLED", "type": "CANCELLED"}})
    return core


def changed(core, amocrm, *entities: tuple[str, int]) -> None:
    """What amoCRM's webhooks say (which entity changed, and when), then the worker until idle."""
    refs = []
    for kind, crm_id in entities:
        record = (amocrm.leads if kind == ORDER else amocrm.contacts).get(crm_id)
        refs.append(EntityRef(kind, str(crm_id), record["updated_at"] if record else int(time.time()),
                              "update" if record else "delete"))
    core.ingest.record(core.shop, refs, origin="amocrm")
    core.drain()


def customer(metrika_sandbox, core, uniq_id) -> dict:
    return metrika_sandbox.counter(core.counter_id).contacts[str(uniq_id)]


def contact_uploads(metrika_sandbox) -> list[dict]:
    return [r for r in metrika_sandbox.requests if "/data/contacts/" in r["path"]]


def a_contact_with_deals(amocrm, *deal_client_ids: str | None, contact_client_ids: tuple[str, ...] = ()):
    person = amocrm.create_contact("Иван Петров", phones=[PHONE_A], notify=False,
                                   custom_fields=ym_uid(*contact_client_ids) if contact_client_ids else None)
    deals = [amocrm.create_lead(f"Заказ {n}", 7001, 1001, price=1000, contacts=[person["id"]], client_id=cid,
                                notify=False)["id"] for n, cid in enumerate(deal_client_ids)]
    return person["id"], deals


# --- ClientIDs ------------------------------------------------------------------------------------------

def test_a_client_id_removed_from_a_deal_leaves_metrika_with_the_next_change(crm, amocrm, metrika_sandbox):
    person, [deal] = a_contact_with_deals(amocrm, MANAGER, contact_client_ids=(VISITOR,))
    changed(crm, amocrm, (ORDER, deal))
    assert sorted(customer(metrika_sandbox, crm, person)["client_ids"]) == sorted([MANAGER, VISITOR])
    amocrm.update_lead(deal, custom_fields_values=None, notify=False)  # the manager's ClientID corrected away
    changed(crm, amocrm, (ORDER, deal))
    stored = customer(metrika_sandbox, crm, person)
    assert stored["client_ids"] == [VISITOR]
    assert stored["phones"] == ["79161234567"] and stored["name"] == "Иван Петров"  # the rest stays
    assert [r["query"]["merge_mode"] for r in contact_uploads(metrika_sandbox)] == ["SAVE", "SAVE"]


def test_two_deals_keep_both_client_ids_and_removing_one_keeps_the_other(crm, amocrm, metrika_sandbox):
    person, [first, second] = a_contact_with_deals(amocrm, VISITOR, OTHER_VISIT)
    changed(crm, amocrm, (ORDER, first))
    changed(crm, amocrm, (ORDER, second))  # another batch: its row must still carry the first deal's ClientID
    assert sorted(customer(metrika_sandbox, crm, person)["client_ids"]) == sorted([VISITOR, OTHER_VISIT])
    amocrm.update_lead(first, custom_fields_values=None, notify=False)
    changed(crm, amocrm, (ORDER, first))
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [OTHER_VISIT]
    record = crm.store.customers(crm.shop, [str(person)])[str(person)]
    assert set(record["sources"]) == {f"contact:{person}", f"order:{second}"}  # the cleared deal holds nothing


def test_the_last_client_id_removed_leaves_metrika_too(crm, amocrm, metrika_sandbox):
    """UPDATE would keep a list the row leaves out, and what `[]` does is not documented: SAVE with the
    complete record is what empties it (the sandbox keeps a list on `[]`)."""
    person, [deal] = a_contact_with_deals(amocrm, MANAGER)
    changed(crm, amocrm, (ORDER, deal))
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [MANAGER]
    amocrm.update_lead(deal, custom_fields_values=None, notify=False)
    changed(crm, amocrm, (ORDER, deal))
    stored = customer(metrika_sandbox, crm, person)
    assert "client_ids" not in stored and stored["phones"] == ["79161234567"]
    assert metrika_sandbox.counter(crm.counter_id).orders[str(deal)]["client_uniq_id"] == str(person)


def test_the_same_client_id_on_deal_and_contact_stays_while_either_has_it(crm, amocrm, metrika_sandbox):
    person, [deal] = a_contact_with_deals(amocrm, VISITOR, contact_client_ids=(VISITOR,))
    changed(crm, amocrm, (ORDER, deal))
    amocrm.update_contact(person, custom_fields_values=[
        f for f in amocrm.contacts[person]["custom_fields_values"] if f["field_code"] != "_YM_UID"], notify=False)
    changed(crm, amocrm, (CONTACT, person))
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]  # the deal still says so
    amocrm.update_lead(deal, custom_fields_values=None, notify=False)
    changed(crm, amocrm, (ORDER, deal))
    assert "client_ids" not in customer(metrika_sandbox, crm, person)


# --- phones and e-mails ---------------------------------------------------------------------------------

def test_a_phone_corrected_on_the_contact_replaces_the_old_one(crm, amocrm, metrika_sandbox):
    """The deal's delivery read the contact with the old phone; the contact's own delivery later reads
    the new one. The old phone must not survive in the deal's share of the customer."""
    person, [deal] = a_contact_with_deals(amocrm, VISITOR)
    changed(crm, amocrm, (ORDER, deal))
    phones = [f for f in amocrm.contacts[person]["custom_fields_values"] if f["field_code"] == "PHONE"]
    phones[0]["values"] = [{"value": PHONE_B}]
    amocrm.update_contact(person, notify=False)
    changed(crm, amocrm, (CONTACT, person))
    assert customer(metrika_sandbox, crm, person)["phones"] == ["79160000000"]
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]
    amocrm.update_lead(deal, price=2000, notify=False)  # the deal again: the contact as read now
    changed(crm, amocrm, (ORDER, deal))
    assert customer(metrika_sandbox, crm, person)["phones"] == ["79160000000"]


def test_a_slow_delivery_that_read_the_contact_earlier_does_not_bring_the_old_phone_back(crm, amocrm, metrika_sandbox):
    """Two workers: the deal's read the contact (old phone), then the contact's read it after the fix
    and recorded first. The deal's delivery must keep the newer read."""
    person, [deal] = a_contact_with_deals(amocrm, VISITOR)
    source = crm.sources["amocrm"]
    integration = crm.store.get_integration(crm.shop)
    mapping = crm.store.get_status_mapping(crm.shop)["entries"]
    stale = source.snapshot(integration, mapping, [EntityRef(ORDER, str(deal), 1, "update")])
    phones = [f for f in amocrm.contacts[person]["custom_fields_values"] if f["field_code"] == "PHONE"]
    phones[0]["values"] = [{"value": PHONE_B}]
    amocrm.update_contact(person, notify=False)
    changed(crm, amocrm, (CONTACT, person))
    from chalicelib.delivery import Pending, Sink
    delivery = Sink(crm.store, crm.metrika_for(integration)).deliver(
        crm.shop, integration, [Pending((ORDER, str(deal)), stale[(ORDER, str(deal))])])
    assert type(delivery.outcomes[(ORDER, str(deal))]).__name__ == "Accepted"
    stored = customer(metrika_sandbox, crm, person)
    assert stored["phones"] == ["79160000000"] and stored["client_ids"] == [VISITOR]


def test_hashed_identifiers_are_corrected_the_same_way(crm, amocrm, metrika_sandbox):
    crm.integration(crm.shop, hash_pii=True, connection=crm.store.get_integration(crm.shop)["connection"])
    person, [deal] = a_contact_with_deals(amocrm, MANAGER)
    changed(crm, amocrm, (ORDER, deal))
    assert customer(metrika_sandbox, crm, person)["phones_md5"] == [md5_hex("79161234567")]
    phones = [f for f in amocrm.contacts[person]["custom_fields_values"] if f["field_code"] == "PHONE"]
    phones[0]["values"] = [{"value": PHONE_B}]
    amocrm.update_contact(person, notify=False)
    amocrm.update_lead(deal, custom_fields_values=ym_uid(VISITOR), notify=False)
    changed(crm, amocrm, (CONTACT, person), (ORDER, deal))
    stored = customer(metrika_sandbox, crm, person)
    assert stored["phones_md5"] == [md5_hex("79160000000")] and stored["client_ids"] == [VISITOR]
    assert "phones" not in stored
    record = crm.store.customers(crm.shop, [str(person)])[str(person)]
    assert "79160000000" not in str(record)  # the store keeps the hashes only


# --- deals that leave a customer ------------------------------------------------------------------------

@pytest.mark.parametrize("deleted_status", ["CANCELLED", None])
def test_a_deleted_deal_takes_its_client_id_with_it(crm, amocrm, metrika_sandbox, deleted_status):
    """Whether or not the integration reports deleted deals as cancelled, the deleted deal's ClientID
    is no longer its customer's."""
    crm.integration(crm.shop, deleted_deal_status=deleted_status,
                    connection=crm.store.get_integration(crm.shop)["connection"])
    person, [gone, kept] = a_contact_with_deals(amocrm, MANAGER, VISITOR)
    changed(crm, amocrm, (ORDER, gone), (ORDER, kept))
    assert sorted(customer(metrika_sandbox, crm, person)["client_ids"]) == sorted([MANAGER, VISITOR])
    amocrm.delete_lead(gone, notify=False)
    changed(crm, amocrm, (ORDER, gone))
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]
    status = metrika_sandbox.counter(crm.counter_id).orders[str(gone)]["order_status"]
    assert status == ("CANCELLED" if deleted_status else "new")
    assert crm.store.get_entity(crm.shop, ORDER, str(gone))["dirty"] is False


def test_a_deal_moved_to_another_contact_leaves_the_first(crm, amocrm, metrika_sandbox):
    person, [deal] = a_contact_with_deals(amocrm, MANAGER, contact_client_ids=(VISITOR,))
    changed(crm, amocrm, (ORDER, deal))
    other = amocrm.create_contact("Пётр", phones=["+7 903 111-22-33"], notify=False)["id"]
    amocrm.update_lead(deal, contacts=[other], notify=False)
    changed(crm, amocrm, (ORDER, deal))
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]
    assert customer(metrika_sandbox, crm, other)["client_ids"] == [MANAGER]
    assert crm.store.get_entity(crm.shop, ORDER, str(deal))["row_hashes"].keys() == {f"contact:{other}", f"order:{deal}"}


def test_a_deal_without_contact_keeps_its_own_customer(crm, amocrm, metrika_sandbox):
    deal = amocrm.create_lead("Заявка", 7001, 1001, price=500, client_id=MANAGER, notify=False)["id"]
    changed(crm, amocrm, (ORDER, deal))
    assert customer(metrika_sandbox, crm, f"lead-{deal}")["client_ids"] == [MANAGER]
    amocrm.update_lead(deal, custom_fields_values=ym_uid(VISITOR), notify=False)
    changed(crm, amocrm, (ORDER, deal))
    assert customer(metrika_sandbox, crm, f"lead-{deal}")["client_ids"] == [VISITOR]


# --- what is recorded, and when -------------------------------------------------------------------------

def test_a_failed_upload_records_nothing_and_the_retry_sends_the_correction(crm, amocrm, metrika_sandbox):
    person, [deal] = a_contact_with_deals(amocrm, MANAGER, contact_client_ids=(VISITOR,))
    changed(crm, amocrm, (ORDER, deal))
    before = crm.store.customers(crm.shop, [str(person)])[str(person)]
    amocrm.update_lead(deal, custom_fields_values=None, notify=False)
    metrika_sandbox.set_faults(error_503=1.0, paths="/data/contacts/")
    crm.ingest.record(crm.shop, [EntityRef(ORDER, str(deal), amocrm.leads[deal]["updated_at"], "update")],
                      origin="amocrm")
    crm.worker.handle(crm.queue.receive())
    assert crm.store.customers(crm.shop, [str(person)])[str(person)] == before  # refused: nothing recorded
    assert sorted(customer(metrika_sandbox, crm, person)["client_ids"]) == sorted([MANAGER, VISITOR])
    metrika_sandbox.set_faults()
    crm.drain()
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]
    assert crm.store.customers(crm.shop, [str(person)])[str(person)]["version"] == before["version"] + 1


def test_a_crash_between_upload_and_record_is_repaired_by_the_retry(crm, amocrm, metrika_sandbox):
    person, [first, second] = a_contact_with_deals(amocrm, MANAGER, VISITOR)
    changed(crm, amocrm, (ORDER, first), (ORDER, second))
    amocrm.update_lead(first, custom_fields_values=None, notify=False)
    real = crm.store.record_customer
    crashes = []

    def crash_once(*args, **kwargs):
        if not crashes:
            crashes.append(1)
            raise RuntimeError("process died after the upload")
        return real(*args, **kwargs)

    crm.store.record_customer = crash_once
    changed(crm, amocrm, (ORDER, first))
    assert crashes and customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]
    record = crm.store.customers(crm.shop, [str(person)])[str(person)]
    assert f"order:{first}" not in record["sources"] and record["sources"][f"order:{second}"] == {"client_ids": [VISITOR]}
    assert crm.store.get_entity(crm.shop, ORDER, str(first))["dirty"] is False


def test_two_deliveries_of_one_customer_at_once_lose_neither_change(crm, amocrm, metrika_sandbox, caplog):
    """The first deal's delivery reads the customer, uploads, and before it records, the second deal's
    delivery runs whole (read, upload, record). The first's upload lacked the second's ClientID (and
    may land last in Metrika): its record is refused, it is retried, and the customer ends complete."""
    person, [first, second] = a_contact_with_deals(amocrm, None, None)
    changed(crm, amocrm, (ORDER, first), (ORDER, second))
    amocrm.update_lead(first, custom_fields_values=ym_uid(MANAGER), notify=False)
    amocrm.update_lead(second, custom_fields_values=ym_uid(VISITOR), notify=False)
    real = crm.store.record_customer
    interleaved = []

    def second_runs_first(*args, **kwargs):
        if not interleaved:
            interleaved.append(1)
            crm.ingest.record(crm.shop, [EntityRef(ORDER, str(second), amocrm.leads[second]["updated_at"], "update")],
                              origin="amocrm")
            crm.worker.handle(crm.queue.receive())
        return real(*args, **kwargs)

    crm.store.record_customer = second_runs_first
    crm.ingest.record(crm.shop, [EntityRef(ORDER, str(first), amocrm.leads[first]["updated_at"], "update")],
                      origin="amocrm")
    crm.worker.handle(crm.queue.receive())
    assert "customer_changed_meanwhile" in caplog.text
    assert crm.store.get_entity(crm.shop, ORDER, str(first))["dirty"] is True  # retried, not lost
    crm.drain()
    assert sorted(customer(metrika_sandbox, crm, person)["client_ids"]) == sorted([MANAGER, VISITOR])
    record = crm.store.customers(crm.shop, [str(person)])[str(person)]
    assert {f"order:{first}", f"order:{second}"} <= set(record["sources"])


def test_unchanged_rows_are_skipped_whoever_sent_the_customer(crm, amocrm, metrika_sandbox):
    """A customer's row goes up when it differs from what Metrika last took for that customer — from
    any delivery — and not otherwise: an unchanged deal or contact sends nothing, and a deal whose
    own content did not change still brings Metrika the customer if another source changed it
    without the customer going up (here: the record says Metrika holds something else)."""
    person, [first, second] = a_contact_with_deals(amocrm, MANAGER, VISITOR)
    changed(crm, amocrm, (ORDER, first), (ORDER, second))
    sent = len(contact_uploads(metrika_sandbox))
    amocrm.update_lead(first, custom_fields_values=None, notify=False)
    changed(crm, amocrm, (ORDER, first))
    assert len(contact_uploads(metrika_sandbox)) == sent + 1
    amocrm.update_lead(second, price=5000, notify=False)  # its order changes, its customer does not
    changed(crm, amocrm, (ORDER, second), (CONTACT, person))
    assert len(contact_uploads(metrika_sandbox)) == sent + 1
    record = crm.store.customers(crm.shop, [str(person)])[str(person)]
    assert crm.store.record_customer(crm.shop, str(person), put={}, drop=[], sent="something else",
                                     version=record["version"])
    amocrm.update_lead(second, price=6000, notify=False)
    changed(crm, amocrm, (ORDER, second))
    assert len(contact_uploads(metrika_sandbox)) == sent + 2
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]


def test_a_replayed_deal_sends_its_customer_again_even_unchanged(crm, amocrm, metrika_sandbox):
    """A replay (or an upload Metrika failed after taking it) forgets what was sent of the entity: its
    customer goes again too, though the store says Metrika holds it."""
    person, [deal] = a_contact_with_deals(amocrm, VISITOR)
    changed(crm, amocrm, (ORDER, deal))
    changed(crm, amocrm, (ORDER, deal))
    assert len(contact_uploads(metrika_sandbox)) == 1  # unchanged: nothing again
    crm.store.forget_content(crm.shop, ORDER, str(deal))
    changed(crm, amocrm, (ORDER, deal))
    assert len(contact_uploads(metrika_sandbox)) == 2
    assert metrika_sandbox.counter(crm.counter_id).times_uploaded[f"orders:{deal}"] == 2
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]


def test_a_history_import_records_the_sources_the_live_path_then_corrects(crm, amocrm, metrika_sandbox):
    person, [first, second] = a_contact_with_deals(amocrm, MANAGER, VISITOR)
    assert crm.backfill.start(crm.shop, {"since": int(time.time()) - 86400})["started"] is True
    crm.drain()
    assert crm.backfill.status(crm.shop)["backfill"]["state"] == "done"
    assert sorted(customer(metrika_sandbox, crm, person)["client_ids"]) == sorted([MANAGER, VISITOR])
    assert metrika_sandbox.counter(crm.counter_id).times_uploaded[f"contacts:{person}"] == 2  # contact; both deals
    amocrm.update_lead(first, custom_fields_values=None, notify=False)
    changed(crm, amocrm, (ORDER, first))
    assert customer(metrika_sandbox, crm, person)["client_ids"] == [VISITOR]


# --- pure parts -----------------------------------------------------------------------------------------

def test_past_the_source_limit_identifiers_are_kept_but_no_longer_removable():
    contributions = {(ORDER, str(n)): {"c": {f"order:{n}": {"client_ids": [str(100 + n)]}}} for n in range(3)}
    plans = plan_customers({}, contributions, {}, limit=2)
    assert set(plans["c"].put) == {"order:0", "order:1", OVERFLOW_SOURCE}
    assert plans["c"].put[OVERFLOW_SOURCE] == {"client_ids": ["102"]}
    assert sorted(plans["c"].row["client_ids"]) == ["100", "101", "102"]
    stored = {"c": {"sources": plans["c"].put, "version": 1, "sent": plans["c"].row_hash}}
    cleared = plan_customers(stored, {(ORDER, "2"): {"c": {"order:2": None}}, (ORDER, "0"): {"c": {"order:0": None}}}, {})
    assert cleared["c"].drop == {"order:0"}  # order:2 was folded: its value stays
    assert sorted(cleared["c"].row["client_ids"]) == ["101", "102"]


def test_a_customer_left_by_its_only_deal_is_not_emptied():
    """A deleted deal was the only source of its customer (one made from the deal): SAVE of what is
    left would empty the record, so nothing is sent and the record forgets the deal."""
    stored = {"lead-5": {"sources": {"order:5": {"name": "Заявка", "client_ids": ["1"]}}, "version": 1, "sent": "h"}}
    plan = plan_customers(stored, {}, {(ORDER, "5"): ["lead-5"]})["lead-5"]
    assert plan.row is None and plan.drop == {"order:5"} and plan.to_record
    only_ids = {"11": {"sources": {"order:5": {"client_ids": ["1"]}, "order:6": {"client_ids": ["2"]}},
                       "version": 3, "sent": "h"}}
    plan = plan_customers(only_ids, {}, {(ORDER, "5"): ["11"]})["11"]
    assert plan.row is None  # the contact's own row is not recorded: its name would be wiped
    assert plan_customers(only_ids, {}, {(ORDER, "7"): ["11"]}) == {}  # never recorded there: nothing to do


def test_translators_keep_the_contacts_own_row_apart_from_the_deals_client_ids():
    from datetime import datetime, timezone
    deal = {"ID": "4821", "TITLE": "Order", "STAGE_ID": "WON", "CLOSED": "Y", "OPPORTUNITY": "10", "LEAD_ID": None,
            "DATE_CREATE": "2024-04-28T18:03:11+03:00", "UF_CRM_CID": MANAGER}
    contact = {"ID": "311", "NAME": "Anna", "UF_CRM_CID": [VISITOR], "PHONE": [{"VALUE": PHONE_A}]}
    entity = deal_rows(deal, contact=contact, lead=None, product_rows=[], client_id_field="UF_CRM_CID",
                       mapping=[{"crm_status": "WON", "metrika_status_id": "won", "type": "PAID"}],
                       now=datetime(2026, 11, 1, tzinfo=timezone.utc))
    assert sorted(entity.contacts[0]["client_ids"]) == sorted([MANAGER, VISITOR])
    own, deal_ids = entity.contact_parts["311"]
    assert own["client_ids"] == [VISITOR] and own["phones"] == ["+79161234567"] and deal_ids == [MANAGER]  # E.164: the row schema makes digits


def test_the_sandbox_applies_merge_modes_as_the_docs_show():
    stored = {"uniq_id": "c", "name": "A", "create_date_time": "2026-01-01 10:00:00", "phones": ["1", "2"],
              "client_ids": ["7"], "attribute_values": {"tags": ["x", "y"], "tier": ["gold"]}}
    row = {"uniq_id": "c", "create_date_time": "2026-02-02 10:00:00", "phones": ["1", "3"], "client_ids": [],
           "attribute_values": {"tags": ["x", "z"]}}
    assert _merge(stored, row, "SAVE") == {"uniq_id": "c", "create_date_time": "2026-01-01 10:00:00",
                                           "phones": ["1", "3"], "attribute_values": {"tags": ["x", "z"]}}
    assert _merge(stored, row, "UPDATE") == {**stored, "phones": ["1", "3"],
                                             "attribute_values": {"tags": ["x", "z"], "tier": ["gold"]}}
    assert _merge(stored, row, "APPEND") == {**stored, "phones": ["1", "2", "3"],
                                             "attribute_values": {"tags": ["x", "y", "z"], "tier": ["gold"]}}
