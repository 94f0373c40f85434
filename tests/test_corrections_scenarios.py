"""Corrections reach Metrika (issue 13, item 5), scenario by scenario, over both CRMs' sandboxes and the
Metrika sandbox on loopback HTTP: a ClientID removed from a deal, a phone or e-mail removed from a contact,
a deal moved to another contact, a deleted contact, two integrations on one counter, two deals of one
customer changed together (one batch, two concurrent batches), and a customer with 2,000 deals.

The Metrika sandbox applies merge modes as "Data upload modes" shows them
(https://yandex.com/dev/metrika/en/data-import/modes): under APPEND a removed value would stay, under UPDATE
a list left out would stay, so each "left Metrika" assertion fails if the bridge sent either. Rows with the
same id in one upload are applied in random order there, as the page says Metrika does."""
from __future__ import annotations

import threading
import time

import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef
from chalicelib.crm.amocrm.source import AmoCrmSource
from chalicelib.crm.bitrix24.source import Bitrix24Source
from chalicelib.crm.bitrix24.translate import default_mapping
from chalicelib.customers import OVERFLOW_SOURCE, SOURCE_LIMIT
from sandbox.bitrix24 import seed_demo
from tests.core import Clock, Core

MANAGER = "1700000000000000001"  # the manager's own browser, captured by a form into a deal
VISITOR = "1714651234567890123"
OTHER_VISIT = "1714651234567890999"
CID = "UF_CRM_YM_CLIENT_ID"


def no_wait(scope, interval, now):
    return now


def ym_uid(*client_ids: str) -> list[dict]:
    return [{"field_id": 752013, "field_name": "_ym_uid", "field_code": "_YM_UID", "field_type": "tracking_data",
             "values": [{"value": c} for c in client_ids]}]


def amo_phones(*phones: str) -> list[dict]:
    return [{"field_id": 735649, "field_name": "Телефон", "field_code": "PHONE", "field_type": "multitext",
             "values": [{"value": p, "enum_id": 718321, "enum_code": "MOB"} for p in phones]}]


def amo_emails(*emails: str) -> list[dict]:
    return [{"field_id": 735651, "field_name": "Email", "field_code": "EMAIL", "field_type": "multitext",
             "values": [{"value": e, "enum_id": 718333, "enum_code": "WORK"} for e in emails]}]


# --- the two CRMs, wired the same way ---------------------------------------------------------------------

def amo_core(metrika_sandbox, amocrm, integration_id="shop", core=None, **overrides):
    core = core or Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["amocrm"] = AmoCrmSource(no_wait, backoff=0.01)
    shop = core.integration(integration_id, connection={"base_url": amocrm.url, "access_token": amocrm.token,
                                                        "webhook_secret": "s" * 20}, **overrides)
    core.store.put_status_mapping(shop, [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"}], 0)
    metrika_sandbox.counter(core.counter_id).order_statuses.update(
        {"new": {"id": "new", "type": "IN_PROGRESS"}, "CANCELLED": {"id": "CANCELLED", "type": "CANCELLED"}})
    return core, shop


def b24_core(metrika_sandbox, bitrix, integration_id="b24shop", core=None, **overrides):
    core = core or Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["bitrix24"] = Bitrix24Source(no_wait, backoff=0.01)
    shop = core.integration(integration_id, crm="bitrix24", connection={
        "webhook_url": bitrix.webhook_url, "application_token": "q" * 32, "member_id": bitrix.member_id,
        "domain": bitrix.domain}, **overrides)
    mapping = default_mapping(bitrix.statuses)
    core.store.put_status_mapping(shop, mapping, 0)
    metrika_sandbox.counter(core.counter_id).order_statuses.update(
        {m["metrika_status_id"]: {"id": m["metrika_status_id"], "type": m["type"]} for m in mapping})
    return core, shop


@pytest.fixture
def amo(metrika_sandbox, amocrm):
    amocrm.reset()
    amocrm.rate_limit = 10_000
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    core, shop = amo_core(metrika_sandbox, amocrm)
    core.shop = shop
    return core


@pytest.fixture
def b24(metrika_sandbox, bitrix):
    bitrix.reset()
    seed_demo(bitrix)
    core, shop = b24_core(metrika_sandbox, bitrix)
    core.shop = shop
    return core


def amo_changed(core, amocrm, *entities, shop=None):
    refs = []
    for kind, crm_id in entities:
        record = (amocrm.leads if kind == ORDER else amocrm.contacts).get(crm_id)
        refs.append(EntityRef(kind, str(crm_id), record["updated_at"] if record else int(time.time()),
                              "update" if record else "delete"))
    core.ingest.record(shop or core.shop, refs, origin="amocrm")
    core.drain()


def b24_changed(core, bitrix, *entities, shop=None):
    refs = [EntityRef(kind, str(crm_id), int(time.time()),
                      "update" if str(crm_id) in (bitrix.deals if kind == ORDER else bitrix.contacts) else "delete")
            for kind, crm_id in entities]
    core.ingest.record(shop or core.shop, refs, origin="bitrix24")
    core.drain()


def customer(metrika_sandbox, core, uniq_id) -> dict:
    return metrika_sandbox.counter(core.counter_id).contacts[str(uniq_id)]


# --- Bitrix24: the same corrections as amoCRM's (tests/test_corrections.py) -------------------------------

def test_b24_a_managers_client_id_removed_from_the_deal_leaves_metrika(b24, bitrix, metrika_sandbox):
    person = bitrix.create_contact("Иван", phones=["+7 916 123-45-67"], fields={CID: VISITOR}, notify=False)["ID"]
    deal = bitrix.create_deal("Заказ", contact_id=person, opportunity="100.00", fields={CID: MANAGER}, notify=False)["ID"]
    b24_changed(b24, bitrix, (ORDER, deal))
    assert sorted(customer(metrika_sandbox, b24, person)["client_ids"]) == sorted([MANAGER, VISITOR])
    bitrix.update_deal(deal, notify=False, **{CID: ""})  # the manager's ClientID corrected away
    b24_changed(b24, bitrix, (ORDER, deal))
    stored = customer(metrika_sandbox, b24, person)
    assert stored["client_ids"] == [VISITOR] and stored["phones"] == ["79161234567"] and stored["name"] == "Иван"
    modes = {r["query"]["merge_mode"] for r in metrika_sandbox.requests if "/data/contacts/" in r["path"]}
    assert modes == {"SAVE"}


def test_b24_a_phone_and_an_email_removed_from_the_contact_leave_metrika(b24, bitrix, metrika_sandbox):
    person = bitrix.create_contact("Иван", phones=["+7 916 123-45-67", "+7 916 000-00-00"],
                                   emails=["ivan@example.com", "old@example.com"], notify=False)
    deal = bitrix.create_deal("Заказ", contact_id=person["ID"], opportunity="100.00", fields={CID: VISITOR},
                              notify=False)["ID"]
    b24_changed(b24, bitrix, (ORDER, deal))
    assert sorted(customer(metrika_sandbox, b24, person["ID"])["phones"]) == ["79160000000", "79161234567"]
    bitrix.update_contact(person["ID"], notify=False, PHONE=person["PHONE"][:1], EMAIL=person["EMAIL"][:1])
    b24_changed(b24, bitrix, (CONTACT, person["ID"]))
    stored = customer(metrika_sandbox, b24, person["ID"])
    assert stored["phones"] == ["79161234567"] and stored["emails"] == ["ivan@example.com"]
    assert stored["client_ids"] == [VISITOR]  # the deal's share stays
    bitrix.update_deal(deal, notify=False, OPPORTUNITY="200.00")  # the deal again, reading the contact as it is now
    b24_changed(b24, bitrix, (ORDER, deal))
    assert customer(metrika_sandbox, b24, person["ID"])["phones"] == ["79161234567"]
    bitrix.update_contact(person["ID"], notify=False, PHONE=[], HAS_PHONE="N")  # the last phone removed
    b24_changed(b24, bitrix, (CONTACT, person["ID"]))
    assert "phones" not in customer(metrika_sandbox, b24, person["ID"])


def test_b24_a_deal_moved_to_another_contact_leaves_the_first(b24, bitrix, metrika_sandbox):
    first = bitrix.create_contact("Анна", phones=["+7 916 111-11-11"], fields={CID: VISITOR}, notify=False)["ID"]
    second = bitrix.create_contact("Пётр", phones=["+7 903 111-22-33"], notify=False)["ID"]
    deal = bitrix.create_deal("Заказ", contact_id=first, opportunity="100.00", fields={CID: MANAGER}, notify=False)["ID"]
    b24_changed(b24, bitrix, (ORDER, deal))
    bitrix.update_deal(deal, notify=False, CONTACT_ID=second)
    b24_changed(b24, bitrix, (ORDER, deal))
    assert customer(metrika_sandbox, b24, first)["client_ids"] == [VISITOR]  # A no longer carries the deal's
    assert customer(metrika_sandbox, b24, second)["client_ids"] == [MANAGER]
    assert metrika_sandbox.counter(b24.counter_id).orders[deal]["client_uniq_id"] == second


def test_b24_a_deleted_contact_keeps_its_last_state_and_its_deal_moves_away(b24, bitrix, metrika_sandbox):
    """Metrika has no delete: a deleted contact's customer keeps what it was last sent (its past orders
    were matched through it). Its deal, once it changes, no longer names it (Bitrix24 empties CONTACT_ID):
    the deal's ClientID leaves the old customer for the deal's own."""
    person = bitrix.create_contact("Иван", phones=["+7 916 123-45-67"], notify=False)["ID"]
    deal = bitrix.create_deal("Заказ", contact_id=person, opportunity="100.00", fields={CID: MANAGER}, notify=False)["ID"]
    b24_changed(b24, bitrix, (ORDER, deal))
    bitrix.delete_contact(person, notify=False)
    b24_changed(b24, bitrix, (CONTACT, person))  # as a reconciliation or a webhook would name it
    assert customer(metrika_sandbox, b24, person)["client_ids"] == [MANAGER]  # nothing could be sent for it yet
    bitrix.update_deal(deal, notify=False, OPPORTUNITY="300.00")
    b24_changed(b24, bitrix, (ORDER, deal))
    order = metrika_sandbox.counter(b24.counter_id).orders[deal]
    assert order["client_uniq_id"] != person and customer(metrika_sandbox, b24, order["client_uniq_id"])["client_ids"] == [MANAGER]
    old = customer(metrika_sandbox, b24, person)
    assert old["phones"] == ["79161234567"]  # the deleted contact's last state stays in Metrika
    assert f"order:{deal}" not in b24.store.customers(b24.shop, [person]).get(person, {}).get("sources", {})
    assert b24.store.get_entity(b24.shop, ORDER, deal)["dirty"] is False


# --- amoCRM: removals (the replacement cases are in tests/test_corrections.py) ----------------------------

def test_amo_a_phone_and_an_email_removed_from_the_contact_leave_metrika(amo, amocrm, metrika_sandbox):
    person = amocrm.create_contact("Иван", notify=False, custom_fields=[
        *amo_phones("+7 916 123-45-67", "+7 916 000-00-00"), *amo_emails("ivan@example.com", "old@example.com")])["id"]
    deal = amocrm.create_lead("Заказ", 7001, 1001, price=100, contacts=[person], client_id=VISITOR, notify=False)["id"]
    amo_changed(amo, amocrm, (ORDER, deal))
    assert sorted(customer(metrika_sandbox, amo, person)["emails"]) == ["ivan@example.com", "old@example.com"]
    amocrm.update_contact(person, notify=False, custom_fields_values=[*amo_phones("+7 916 123-45-67"),
                                                                      *amo_emails("ivan@example.com")])
    amo_changed(amo, amocrm, (CONTACT, person))
    stored = customer(metrika_sandbox, amo, person)
    assert stored["phones"] == ["79161234567"] and stored["emails"] == ["ivan@example.com"]
    assert stored["client_ids"] == [VISITOR]
    amocrm.update_contact(person, notify=False, custom_fields_values=None)  # every phone and e-mail removed
    amo_changed(amo, amocrm, (CONTACT, person))
    stored = customer(metrika_sandbox, amo, person)
    assert "phones" not in stored and "emails" not in stored and stored["client_ids"] == [VISITOR]


def test_amo_a_deleted_contact_keeps_its_last_state_and_its_deal_moves_away(amo, amocrm, metrika_sandbox):
    person = amocrm.create_contact("Иван", phones=["+7 916 123-45-67"], notify=False)["id"]
    deal = amocrm.create_lead("Заказ", 7001, 1001, price=100, contacts=[person], client_id=MANAGER, notify=False)["id"]
    amo_changed(amo, amocrm, (ORDER, deal))
    amocrm.delete_contact(person, notify=False)
    amo_changed(amo, amocrm, (CONTACT, person))
    assert customer(metrika_sandbox, amo, person)["client_ids"] == [MANAGER]
    amocrm.update_lead(deal, price=300, notify=False)
    amo_changed(amo, amocrm, (ORDER, deal))
    assert metrika_sandbox.counter(amo.counter_id).orders[str(deal)]["client_uniq_id"] == f"lead-{deal}"
    assert customer(metrika_sandbox, amo, f"lead-{deal}")["client_ids"] == [MANAGER]
    assert customer(metrika_sandbox, amo, person)["phones"] == ["79161234567"]
    assert f"order:{deal}" not in amo.store.customers(amo.shop, [str(person)])[str(person)]["sources"]
    assert amo.store.get_entity(amo.shop, ORDER, str(deal))["dirty"] is False


# --- two integrations on one counter ----------------------------------------------------------------------

def test_two_integrations_on_one_counter_correct_their_own_customers_only(metrika_sandbox, amocrm, bitrix):
    """amoCRM contact N and Bitrix24 contact N on one counter: the first integration keeps raw ids, the
    second has `id_prefix`, so they are two customers; each one's SAVE replaces only its own."""
    amocrm.reset()
    amocrm.rate_limit = 10_000
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    bitrix.reset()
    seed_demo(bitrix)
    core, amo_shop = amo_core(metrika_sandbox, amocrm, "amo")
    core, b24_shop = b24_core(metrika_sandbox, bitrix, "b24", core=core, id_prefix="b24:")
    amo_person = amocrm.create_contact("Иван", phones=["+7 916 123-45-67"], notify=False)["id"]
    bitrix._next_id = amo_person - 1  # the same CRM id in both CRMs
    b24_person = bitrix.create_contact("Анна", phones=["+7 903 000-00-00"], notify=False)["ID"]
    assert b24_person == str(amo_person)
    amo_deal = amocrm.create_lead("Заказ", 7001, 1001, price=100, contacts=[amo_person], client_id=MANAGER,
                                  notify=False)["id"]
    b24_deal = bitrix.create_deal("Заказ", contact_id=b24_person, opportunity="100.00", fields={CID: VISITOR},
                                  notify=False)["ID"]
    amo_changed(core, amocrm, (ORDER, amo_deal), shop=amo_shop)
    b24_changed(core, bitrix, (ORDER, b24_deal), shop=b24_shop)
    counter = metrika_sandbox.counter(core.counter_id)
    assert counter.contacts[str(amo_person)]["client_ids"] == [MANAGER]
    assert counter.contacts[f"b24:{b24_person}"]["client_ids"] == [VISITOR]
    amocrm.update_lead(amo_deal, custom_fields_values=None, notify=False)
    amo_changed(core, amocrm, (ORDER, amo_deal), shop=amo_shop)
    assert "client_ids" not in counter.contacts[str(amo_person)]
    assert counter.contacts[f"b24:{b24_person}"]["client_ids"] == [VISITOR]  # the other CRM's customer untouched
    assert counter.contacts[f"b24:{b24_person}"]["phones"] == ["79030000000"]
    bitrix.update_deal(b24_deal, notify=False, **{CID: OTHER_VISIT})
    b24_changed(core, bitrix, (ORDER, b24_deal), shop=b24_shop)
    assert counter.contacts[f"b24:{b24_person}"]["client_ids"] == [OTHER_VISIT]
    assert counter.contacts[str(amo_person)]["phones"] == ["79161234567"]
    assert "client_ids" not in counter.contacts[str(amo_person)]
    assert set(core.store.customers(amo_shop, [str(amo_person)])[str(amo_person)]["sources"]) == {f"contact:{amo_person}"}
    assert set(core.store.customers(b24_shop, [f"b24:{b24_person}"])[f"b24:{b24_person}"]["sources"]) == {
        f"contact:{b24_person}", f"order:{b24_deal}"}


# --- two deals of one customer changed together -----------------------------------------------------------

def test_two_deals_changed_in_one_batch_send_one_complete_row(amo, amocrm, metrika_sandbox):
    person = amocrm.create_contact("Иван", phones=["+7 916 123-45-67"], notify=False)["id"]
    first = amocrm.create_lead("A", 7001, 1001, price=100, contacts=[person], client_id=MANAGER, notify=False)["id"]
    second = amocrm.create_lead("B", 7001, 1001, price=100, contacts=[person], client_id=VISITOR, notify=False)["id"]
    amo_changed(amo, amocrm, (ORDER, first), (ORDER, second))
    assert sorted(customer(metrika_sandbox, amo, person)["client_ids"]) == sorted([MANAGER, VISITOR])
    amocrm.update_lead(first, custom_fields_values=None, notify=False)
    amocrm.update_lead(second, custom_fields_values=ym_uid(OTHER_VISIT), notify=False)
    counter = metrika_sandbox.counter(amo.counter_id)
    before, sent_before = len(metrika_sandbox.requests), counter.times_uploaded[f"contacts:{person}"]
    amo_changed(amo, amocrm, (ORDER, first), (ORDER, second))
    uploads = [r for r in metrika_sandbox.requests[before:] if "/data/contacts/" in r["path"]]
    assert len(uploads) == 1 and counter.times_uploaded[f"contacts:{person}"] == sent_before + 1  # one row
    assert customer(metrika_sandbox, amo, person)["client_ids"] == [OTHER_VISIT]
    assert metrika_sandbox.counter(amo.counter_id).duplicate_ids == []


@pytest.mark.parametrize("round_", range(4))
def test_two_deals_changed_in_two_concurrent_batches_end_with_the_complete_set(amo, amocrm, metrika_sandbox, round_):
    """Two workers, one deal each, at once on one customer: whichever records last, the row Metrika ends
    with is the complete set, not the set as one deal saw it, and the record matches it."""
    person = amocrm.create_contact("Иван", phones=["+7 916 123-45-67"], notify=False)["id"]
    first = amocrm.create_lead("A", 7001, 1001, price=100, contacts=[person], client_id=MANAGER, notify=False)["id"]
    second = amocrm.create_lead("B", 7001, 1001, price=100, contacts=[person], notify=False)["id"]
    amo_changed(amo, amocrm, (ORDER, first), (ORDER, second))
    amocrm.update_lead(first, custom_fields_values=None if round_ % 2 else ym_uid(OTHER_VISIT), notify=False)
    amocrm.update_lead(second, custom_fields_values=ym_uid(VISITOR), notify=False)
    for deal in (first, second):
        amo.ingest.record(amo.shop, [EntityRef(ORDER, str(deal), amocrm.leads[deal]["updated_at"], "update")],
                          origin="amocrm")
    batches = [amo.queue.receive(1), amo.queue.receive(1)]
    assert all(batches)
    barrier = threading.Barrier(2)

    def run(bodies):
        barrier.wait()
        amo.worker.handle(bodies)
    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    amo.drain()
    want = [VISITOR] if round_ % 2 else [OTHER_VISIT, VISITOR]
    stored = customer(metrika_sandbox, amo, person)
    assert sorted(stored["client_ids"]) == sorted(want)
    record = amo.store.customers(amo.shop, [str(person)])[str(person)]
    assert sorted(c for p in record["sources"].values() for c in p.get("client_ids", [])) == sorted(want)
    assert all(amo.store.get_entity(amo.shop, ORDER, str(d))["dirty"] is False for d in (first, second))


# --- the record after a crash, and its size ---------------------------------------------------------------

def test_a_crash_after_the_upload_leaves_the_old_record_and_the_next_delivery_sends_the_complete_set(
        amo, amocrm, metrika_sandbox):
    """The upload went, the record write did not (the process died): the record still says what Metrika
    held before, and the deal stays owed. Another source of the customer is delivered first and, from
    that record, sends the removed ClientID back; the crashed deal's retry removes it again for good."""
    person = amocrm.create_contact("Иван", phones=["+7 916 123-45-67"], notify=False)["id"]
    deal = amocrm.create_lead("A", 7001, 1001, price=100, contacts=[person], client_id=MANAGER, notify=False)["id"]
    amo_changed(amo, amocrm, (ORDER, deal))
    before = amo.store.customers(amo.shop, [str(person)])[str(person)]
    amocrm.update_lead(deal, custom_fields_values=None, notify=False)
    real, crashed = amo.store.record_customer, []

    def crash(*args, **kwargs):
        crashed.append(1)
        raise RuntimeError("the process died after the upload")
    amo.store.record_customer = crash
    amo.ingest.record(amo.shop, [EntityRef(ORDER, str(deal), amocrm.leads[deal]["updated_at"], "update")], origin="amocrm")
    amo.worker.handle(amo.queue.receive(10))  # the worker logs the group's failure; the message stays
    amo.store.record_customer = real
    assert crashed and "client_ids" not in customer(metrika_sandbox, amo, person)  # uploaded
    assert amo.store.customers(amo.shop, [str(person)])[str(person)] == before  # not recorded
    assert amo.store.get_entity(amo.shop, ORDER, str(deal))["dirty"] is True  # still owed
    amocrm.update_contact(person, notify=False, name="Иван Петров")  # the contact changes meanwhile
    amo.ingest.record(amo.shop, [EntityRef(CONTACT, str(person), amocrm.contacts[person]["updated_at"], "update")],
                      origin="amocrm")
    received = amo.queue.receive(10)
    assert len(received) == 1  # the contact alone: the crashed deal's message is not visible yet
    amo.worker.handle(received)
    # The record still had the deal's old ClientID: the contact's row brings it back, for now ...
    assert customer(metrika_sandbox, amo, person)["client_ids"] == [MANAGER]
    amo.drain()  # ... until the crashed deal is received again, reads the CRM and the record, and sends
    stored = customer(metrika_sandbox, amo, person)
    assert stored["name"] == "Иван Петров" and "client_ids" not in stored
    record = amo.store.customers(amo.shop, [str(person)])[str(person)]
    assert f"order:{deal}" not in record["sources"]


def dynamodb_item_bytes(record: dict) -> int:
    """The size DynamoDB counts for a `CUSTOMER#` item ("Item sizes and formats",
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html):
    attribute names plus values; a string its UTF-8 bytes, a list or map 3 bytes plus 1 per element
    plus its elements, a number about its digits."""
    def size(value) -> int:
        if isinstance(value, str):
            return len(value.encode())
        if isinstance(value, bool) or value is None:
            return 1
        if isinstance(value, (int, float)):
            return len(str(value)) // 2 + 2
        if isinstance(value, dict):
            return 3 + sum(1 + len(k.encode()) + size(v) for k, v in value.items())
        return 3 + sum(1 + size(v) for v in value)
    item = {"pk": "INTEGRATION#shop", "sk": "CUSTOMER#000000000", "version": record["version"], "sent": record["sent"] or "",
            **{f"src:{sid}": part for sid, part in record["sources"].items()}}
    return sum(len(k.encode()) + size(v) for k, v in item.items())


def test_a_contact_with_300_deals_keeps_a_bounded_record(amo, amocrm, metrika_sandbox):
    """300 deals of one contact (3 × SOURCE_LIMIT), each with its own ClientID, delivered in batches: the record keeps
    one source per deal up to SOURCE_LIMIT, the rest in the overflow, far below DynamoDB's 400 KB;
    and a ClientID removed from a deal that has its own source still leaves Metrika."""
    person = amocrm.create_contact("Розничный покупатель", phones=["+7 916 123-45-67"], notify=False)["id"]
    deals = [amocrm.create_lead(f"Заказ {n}", 7001, 1001, price=100, contacts=[person],
                                client_id=str(1714651234567000000 + n), notify=False)["id"] for n in range(300)]
    started = time.perf_counter()
    for at in range(0, len(deals), 250):
        amo.ingest.record(amo.shop, [EntityRef(ORDER, str(d), amocrm.leads[d]["updated_at"], "add")
                                     for d in deals[at:at + 250]], origin="amocrm")
    amo.drain(max_rounds=400)
    elapsed = time.perf_counter() - started
    record = amo.store.customers(amo.shop, [str(person)])[str(person)]
    own = [s for s in record["sources"] if s.startswith("order:")]
    assert len(own) == SOURCE_LIMIT and OVERFLOW_SOURCE in record["sources"]
    size = dynamodb_item_bytes(record)
    print(f"300 deals on one contact: record {size} bytes, {len(record['sources'])} sources, {elapsed:.1f} s")
    assert size < 100_000
    assert len(customer(metrika_sandbox, amo, person)["client_ids"]) == 300
    kept = int(own[0].partition(":")[2])
    amocrm.update_lead(kept, custom_fields_values=None, notify=False)
    amo_changed(amo, amocrm, (ORDER, kept))
    stored = customer(metrika_sandbox, amo, person)
    assert len(stored["client_ids"]) == 299 and str(1714651234567000000 + deals.index(kept)) not in stored["client_ids"]


def test_a_customer_record_stays_within_dynamodbs_item_limit_whatever_its_deals_carry(request, service_env):
    """The worst a customer can gather, written as deliveries write it, to DynamoDB (moto_server): 100
    deals with 1,000 ClientIDs each in their field, then 6,000 more deals (past OVERFLOW_VALUES). Each list of a deal's part keeps
    SOURCE_VALUES values and the overflow its newest OVERFLOW_VALUES, so every write is accepted; unbounded,
    the item passed DynamoDB's 400 KB ("Service, account, and table quotas in Amazon DynamoDB",
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/ServiceQuotas.html) and every later
    write of the customer failed, holding its deals' orders for good."""
    from chalicelib.customers import OVERFLOW_VALUES, SOURCE_VALUES, plan_customers
    from tests.test_store_contract import _dynamo_store
    store = _dynamo_store(request, Clock())
    iid = f"big-{time.time_ns()}"
    contact = {"contact:c": {"name": "Розничный покупатель", "phones": ["79161234567"]}}
    plans = plan_customers({}, {(CONTACT, "c"): {"c": contact}}, {})
    assert store.record_customer(iid, "c", put=plans["c"].put, drop=[], sent=plans["c"].row_hash, version=0)
    hostile = {(ORDER, str(n)): {"c": {f"order:{n}": {"client_ids": [f"17{n:04d}{v:013d}" for v in range(1000)]}}}
               for n in range(SOURCE_LIMIT)}
    batches = [hostile] + [{(ORDER, str(n)): {"c": {f"order:{n}": {"client_ids": [f"18{n:017d}"]}}}
                            for n in range(at, at + 3000)} for at in range(1000, 7000, 3000)]
    for contributions in batches:
        plan = plan_customers(store.customers(iid, ["c"]), contributions, {})["c"]
        assert store.record_customer(iid, "c", put=plan.put, drop=sorted(plan.drop), sent=plan.row_hash,
                                     version=plan.version)
    record = store.customers(iid, ["c"])["c"]
    assert all(len(p.get("client_ids", [])) <= SOURCE_VALUES for s, p in record["sources"].items() if s.startswith("order:"))
    assert len(record["sources"][OVERFLOW_SOURCE]["client_ids"]) == OVERFLOW_VALUES
    assert record["sources"][OVERFLOW_SOURCE]["client_ids"][-1] == f"18{6999:017d}"  # the newest kept
    size = dynamodb_item_bytes(record)
    print(f"the largest customer record: {size} bytes")
    assert size < 300_000


def test_a_deals_lists_and_the_overflow_are_capped_the_newest_kept():
    """The pure rule behind the test above (the fast tier): a deal's part keeps SOURCE_VALUES of each list,
    the overflow its newest `overflow_values`, whatever it held before."""
    from chalicelib.customers import SOURCE_VALUES, plan_customers
    many = [f"17{v:017d}" for v in range(SOURCE_VALUES + 30)]
    plan = plan_customers({}, {(ORDER, "1"): {"c": {"order:1": {"client_ids": many}}}}, {})["c"]
    assert plan.put["order:1"]["client_ids"] == many[:SOURCE_VALUES]
    stored = {"c": {"sources": {"order:1": {"client_ids": ["1"]}, OVERFLOW_SOURCE: {"client_ids": ["2", "3", "4"]}},
                    "version": 1, "sent": "h"}}
    contributions = {(ORDER, str(n)): {"c": {f"order:{n}": {"client_ids": [str(n)]}}} for n in (5, 6)}
    plan = plan_customers(stored, contributions, {}, limit=1, overflow_values=3)["c"]
    assert plan.put == {OVERFLOW_SOURCE: {"client_ids": ["4", "5", "6"]}}
    assert sorted(plan.row["client_ids"]) == ["1", "4", "5", "6"]  # "2" and "3" fell out, and leave Metrika


def test_the_metrika_sandbox_applies_rows_sharing_an_id_in_random_order_and_notes_them(metrika_sandbox):
    """"If there are several lines with the same ID in the uploaded data, they are applied randomly"
    ("Data upload modes"): a sender relying on the last row of an id standing fails against the sandbox."""
    import requests
    url = f"{metrika_sandbox.url}/cdp/api/v1/counter/9191/data/contacts/json"
    rows = [{"uniq_id": "dup", "client_ids": [VISITOR]}, {"uniq_id": "dup", "client_ids": [MANAGER]}]
    seen = set()
    for _ in range(40):
        answer = requests.post(url, params={"merge_mode": "SAVE"}, json={"contacts": rows},
                               headers={"Authorization": "OAuth y0_any"}, timeout=5)
        assert answer.status_code == 200, answer.text
        seen.add(tuple(metrika_sandbox.counter(9191).contacts["dup"]["client_ids"]))
    assert seen == {(VISITOR,), (MANAGER,)}
    assert metrika_sandbox.counter(9191).duplicate_ids == ["contacts:dup"] * 40
