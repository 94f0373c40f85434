"""International phones, the account's currency and the order cost, through the real CRM sources and the
worker on the in-memory core, with the amoCRM, Bitrix24 and Metrika sandboxes over loopback HTTP.

Vendor pages: amoCRM "Параметры аккаунта" (`GET /api/v4/account`: `country`, `currency`),
https://www.amocrm.ru/developers/content/crm_platform/account-info; Metrika "Customer data format" (phones:
digits with the country code), https://yandex.com/dev/metrika/en/data-import/contacts-data, and "Order data
format" (`cost`, `currency`), https://yandex.com/dev/metrika/en/data-import/orders-data.
"""
from __future__ import annotations

import hashlib
import time

import pytest

from chalicelib.crm.amocrm.source import ACCOUNT_MAX_AGE, AmoCrmSource
from chalicelib.crm.bitrix24.source import Bitrix24Source
from chalicelib.crm.notes import dropped_summary
from chalicelib.operations import integration_status
from tests.core import Clock, Core

SECRET = "s" * 20
AMO_MAPPING = [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"},
               {"crm_status": "7001:142", "metrika_status_id": "won", "type": "PAID"}]


def push_statuses(metrika_sandbox, counter_id, mapping):
    metrika_sandbox.counter(counter_id).order_statuses.update(
        {e["metrika_status_id"]: {"id": e["metrika_status_id"], "type": e["type"]} for e in mapping})


def no_wait(scope, interval, now):
    """A rate limiter that never waits: these tests are about what is sent, not about spacing."""
    return now


def account_reads(amocrm) -> int:
    return sum(1 for r in amocrm.requests if r["path"] == "/api/v4/account")


@pytest.fixture
def amo(metrika_sandbox, amocrm):
    """A Belarusian amoCRM account that counts in US dollars (as a Kommo account may), wired to the core.
    The sandbox's 7 requests a second are lifted: two base URLs of one sandbox are one account to it but
    two to the rate limiter, and request counts here are about the account cache, not 429s."""
    amocrm.reset()
    saved, amocrm.rate_limit = amocrm.rate_limit, 10**6
    amocrm.set_account(country="BY", currency="USD")
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["amocrm"] = AmoCrmSource(no_wait, accounts=core.store, clock=core.clock, backoff=0.01)
    push_statuses(metrika_sandbox, core.counter_id, AMO_MAPPING)
    yield core
    amocrm.set_account(country="RU", currency="RUB")
    amocrm.set_faults()
    amocrm.rate_limit = saved


def amo_integration(core, amocrm, iid="shop", base_url=None, **config):
    core.integration(iid, connection={"base_url": base_url or amocrm.url, "access_token": amocrm.token,
                                      "webhook_secret": SECRET}, **config)
    core.store.put_status_mapping(iid, AMO_MAPPING, 0)
    return iid


def post_fired(core, amocrm, iid="shop"):
    for _, body in amocrm.outbox:
        core.ingest.amocrm(iid, body, {"secret": SECRET})
    amocrm.outbox.clear()
    core.drain()


def sale(amocrm, phones=("8 029 123-45-67",), price=250):
    contact = amocrm.create_contact("Алесь Бондар", phones=list(phones))
    return amocrm.create_lead("Заказ", 7001, 142, price=price, contacts=[contact["id"]]), contact


def test_a_usd_belarusian_account_sends_dollars_and_375_numbers(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm)
    lead, contact = sale(amocrm)
    post_fired(amo, amocrm, iid)
    counter = metrika_sandbox.counter(amo.counter_id)
    order = counter.orders[str(lead["id"])]
    assert order["currency"] == "USD" and order["revenue"] == 250  # never roubles
    assert counter.contacts[str(contact["id"])]["phones"] == ["375291234567"]


def test_the_integrations_own_currency_and_region_win_and_then_the_account_is_not_read(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm, currency="EUR", phone_region="RU")
    lead, contact = sale(amocrm, phones=["8 916 123-45-67", "8 029 123-45-67"])
    post_fired(amo, amocrm, iid)
    counter = metrika_sandbox.counter(amo.counter_id)
    assert counter.orders[str(lead["id"])]["currency"] == "EUR"
    assert counter.contacts[str(contact["id"])]["phones"] == ["79161234567"]  # the Belarusian one read as Russian: dropped
    assert account_reads(amocrm) == 0


def test_hashed_phones_are_hashed_after_normalising(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm, hash_pii=True)
    _, contact = sale(amocrm)
    post_fired(amo, amocrm, iid)
    sent = metrika_sandbox.counter(amo.counter_id).contacts[str(contact["id"])]
    assert "phones" not in sent and sent["phones_md5"] == [hashlib.md5(b"375291234567").hexdigest()]


def test_the_account_is_read_once_kept_in_the_store_and_read_again_for_a_new_base_url(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm)
    for price in (100, 200, 300):
        sale(amocrm, price=price)
        post_fired(amo, amocrm, iid)
    assert account_reads(amocrm) == 1
    assert len(metrika_sandbox.counter(amo.counter_id).orders) == 3
    # A new process (a cold Lambda) finds it in the store.
    amo.sources["amocrm"] = AmoCrmSource(no_wait, accounts=amo.store, clock=amo.clock, backoff=0.01)
    sale(amocrm)
    post_fired(amo, amocrm, iid)
    assert account_reads(amocrm) == 1
    # The admin points the integration at another account (here: the same sandbox under another name).
    amocrm.set_account(country="RU", currency="RUB")
    amo_integration(amo, amocrm, base_url=amocrm.url.replace("127.0.0.1", "localhost"))
    lead, _ = sale(amocrm)
    post_fired(amo, amocrm, iid)
    assert account_reads(amocrm) == 2
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "RUB"


def test_a_currency_changed_in_amocrm_shows_after_a_day(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm)
    sale(amocrm)
    post_fired(amo, amocrm, iid)
    amocrm.set_account(currency="EUR")
    amo.clock.advance(ACCOUNT_MAX_AGE + 1)
    lead, _ = sale(amocrm)
    post_fired(amo, amocrm, iid)
    assert account_reads(amocrm) == 2
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "EUR"


def test_an_unreadable_account_holds_the_order_back_rather_than_guess_roubles(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm)
    amocrm.set_faults(error_5xx=1.0, paths="/api/v4/account")
    lead, _ = sale(amocrm)
    for _, body in amocrm.outbox:
        amo.ingest.amocrm(iid, body, {"secret": SECRET})
    amocrm.outbox.clear()
    report = amo.worker.handle(amo.queue.receive(100))
    assert report.retried == 2 and report.uploaded == 0  # the lead and the contact wait
    assert str(lead["id"]) not in metrika_sandbox.counter(amo.counter_id).orders
    assert "amoCRM answered 503" in amo.store.get_entity(iid, "order", str(lead["id"]))["last_error"]["message"]
    amocrm.set_faults()
    amo.drain()
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "USD"


def test_a_day_old_copy_is_used_when_the_account_cannot_be_read_again(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm)
    sale(amocrm)
    post_fired(amo, amocrm, iid)
    amo.clock.advance(ACCOUNT_MAX_AGE + 1)
    amocrm.set_faults(error_5xx=1.0, paths="/api/v4/account")
    lead, _ = sale(amocrm)
    post_fired(amo, amocrm, iid)
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "USD"


@pytest.mark.parametrize("country, currency, region_phone, expected_phone, expected_currency", [
    ("", "", "8 916 123-45-67", "79161234567", None),        # the account says nothing: Russia, no currency
    ("Беларусь", "доллар", "8 916 123-45-67", "79161234567", None),  # nonsense is not used
    ("ua", "UAH", "067 123 45 67", "380671234567", "UAH"),    # a lower-case country code is still a country
])
def test_what_the_account_says_is_used_only_when_it_is_a_country_and_a_currency(
        amo, amocrm, metrika_sandbox, country, currency, region_phone, expected_phone, expected_currency):
    amocrm.set_account(country=country, currency=currency)
    iid = amo_integration(amo, amocrm)
    lead, contact = sale(amocrm, phones=[region_phone])
    post_fired(amo, amocrm, iid)
    counter = metrika_sandbox.counter(amo.counter_id)
    assert counter.contacts[str(contact["id"])]["phones"] == [expected_phone]
    assert counter.orders[str(lead["id"])].get("currency") == expected_currency


def test_dropped_phones_are_counted_on_the_status_page_masked_and_cleared_when_corrected(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm)
    lead, contact = sale(amocrm, phones=["8 029 123-45-67", "+7 916 123-45-6"])  # the second is a digit short
    post_fired(amo, amocrm, iid)
    status = integration_status(amo.store, iid, requests_today=None)
    assert status["phones_dropped"] == {"count": 1, "contacts": 1,
                                        "example": {"contact": str(contact["id"]), "phone": "+7 916 ***-*5-6"}}
    assert metrika_sandbox.counter(amo.counter_id).contacts[str(contact["id"])]["phones"] == ["375291234567"]
    assert status["failed_count"] == 0  # the contact and its deal went
    fixed = [{**contact["custom_fields_values"][0], "values": [{"value": "8 029 123-45-67"}, {"value": "+7 916 123-45-67"}]}]
    amo.clock.advance(5)
    amocrm.update_contact(contact["id"], custom_fields_values=fixed)
    post_fired(amo, amocrm, iid)
    status = integration_status(amo.store, iid, requests_today=None)
    # The contact's own delivery is the newest: the deal still carries the old note, the count is 0.
    assert status["phones_dropped"] == {"count": 0, "contacts": 0, "example": None}
    assert metrika_sandbox.counter(amo.counter_id).contacts[str(contact["id"])]["phones"] == [
        "375291234567", "79161234567"]
    assert str(lead["id"]) in metrika_sandbox.counter(amo.counter_id).orders


def test_the_amocrm_cost_field_reaches_the_order(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm, cost_field="Себестоимость")
    contact = amocrm.create_contact("Алесь", phones=["8 029 123-45-67"])
    good = amocrm.create_lead("A", 7001, 142, price=250, contacts=[contact["id"]], custom_fields=[
        {"field_id": 880011, "field_name": "Себестоимость", "field_code": None, "values": [{"value": "120,50"}]}])
    bad = amocrm.create_lead("B", 7001, 142, price=300, contacts=[contact["id"]], custom_fields=[
        {"field_id": 880011, "field_name": "Себестоимость", "field_code": None, "values": [{"value": "-5"}]}])
    post_fired(amo, amocrm, iid)
    orders = metrika_sandbox.counter(amo.counter_id).orders
    assert orders[str(good["id"])]["cost"] == 120.5
    assert "cost" not in orders[str(bad["id"])] and orders[str(bad["id"])]["revenue"] == 300
    assert integration_status(amo.store, iid, requests_today=None)["costs_dropped"] == {
        "count": 1, "example": {"order": str(bad["id"]), "value": "-5", "reason": "negative"}}


# --- Bitrix24 -----------------------------------------------------------------------------------------

B24_MAPPING = [{"crm_status": "WON", "metrika_status_id": "WON", "type": "PAID"}]


@pytest.fixture
def b24(metrika_sandbox, bitrix):
    from sandbox.bitrix24 import seed_demo
    bitrix.reset()
    seed_demo(bitrix)
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["bitrix24"] = Bitrix24Source(no_wait, backoff=0.01)
    core.integration("portal", crm="bitrix24", cost_field="UF_CRM_COST", phone_region="UA",
                     connection={"webhook_url": bitrix.webhook_url, "application_token": "t" * 32})
    core.store.put_status_mapping("portal", B24_MAPPING, 0)
    push_statuses(metrika_sandbox, core.counter_id, B24_MAPPING)
    return core


def deliver_b24(core, bitrix):
    for event, entity_id in bitrix.outbox:
        core.ingest.bitrix24("portal", bitrix.event_body(event, entity_id, "t" * 32))
    bitrix.outbox.clear()
    core.drain()


def test_bitrix24_cost_field_currency_and_region(b24, bitrix, metrika_sandbox):
    contact = bitrix.create_contact("Олена", phones=["067 123 45 67"], notify=False)
    priced = bitrix.create_deal("A", stage_id="WON", opportunity="990.00", currency="USD", contact_id=contact["ID"],
                                fields={"UF_CRM_COST": "400.25|USD"})
    odd = bitrix.create_deal("B", stage_id="WON", opportunity="990.00", currency="USD", contact_id=contact["ID"],
                             fields={"UF_CRM_COST": "1e400"})
    deliver_b24(b24, bitrix)
    counter = metrika_sandbox.counter(b24.counter_id)
    assert counter.orders[priced["ID"]]["cost"] == 400.25 and counter.orders[priced["ID"]]["currency"] == "USD"
    assert "cost" not in counter.orders[odd["ID"]] and counter.orders[odd["ID"]]["revenue"] == 990
    assert counter.contacts[contact["ID"]]["phones"] == ["380671234567"]
    status = integration_status(b24.store, "portal", requests_today=None)
    assert status["costs_dropped"] == {"count": 1, "example": {"order": odd["ID"], "value": "1e400",
                                                                "reason": "not a number"}}


# --- the status page's sums --------------------------------------------------------------------------

def test_phones_are_counted_once_per_customer_from_its_newest_delivery():
    entities = [
        {"kind": "order", "crm_id": "1", "sent_at": 100, "facts": {"order": True, "phones_dropped": {"c1": 2},
                                                                   "phone_examples": {"c1": "8 029 ***-**-67"}}},
        {"kind": "order", "crm_id": "2", "sent_at": 300, "facts": {"order": True, "phones_dropped": {"c1": 1},
                                                                   "phone_examples": {"c1": "+7 916 ***-*5-6"}}},
        {"kind": "contact", "crm_id": "c2", "sent_at": 200, "facts": {"phones_dropped": {"c2": 1},
                                                                      "phone_examples": {"c2": "***"}}},
        {"kind": "order", "crm_id": "3", "sent_at": 400, "facts": {"order": True, "phones_dropped": {"c2": 0}}},
        {"kind": "order", "crm_id": "4", "sent_at": 50, "facts": {"cost_dropped": {"value": "-1", "reason": "negative"}}},
        {"kind": "order", "crm_id": "5", "sent_at": 60, "facts": {"cost_dropped": {"value": "x", "reason": "not a number"}}},
        {"kind": "order", "crm_id": "6"},  # never delivered
        {"kind": "contact", "crm_id": "c3", "facts": None},
    ]
    assert dropped_summary(entities) == {
        "phones_dropped": {"count": 1, "contacts": 1, "example": {"contact": "c1", "phone": "+7 916 ***-*5-6"}},
        "costs_dropped": {"count": 2, "example": {"order": "5", "value": "x", "reason": "not a number"}}}
    assert dropped_summary([]) == {"phones_dropped": {"count": 0, "contacts": 0, "example": None},
                                   "costs_dropped": {"count": 0, "example": None}}


# --- configuration: `phone_region` and `cost_field` ----------------------------------------------------

def save(body_overrides):
    from chalicelib.integrations import save_integration
    from chalicelib.store.memory import MemoryStore
    body = {"crm": "amocrm", "counter_id": 4242, "metrika_token": "y0_x", "timezone": "UTC",
            "connection": {"base_url": "https://shop.amocrm.ru", "access_token": "t", "webhook_secret": SECRET},
            **body_overrides}
    store = MemoryStore()
    shown = save_integration(store, "shop", body, lambda config: "UTC")
    return shown, store.get_integration("shop")


def test_phone_region_and_cost_field_are_stored_as_validated():
    shown, stored = save({"phone_region": "BY", "cost_field": "Себестоимость"})
    assert stored["phone_region"] == shown["phone_region"] == "BY"
    assert stored["cost_field"] == "Себестоимость"
    _, stored = save({})
    assert "phone_region" not in stored and "cost_field" not in stored  # the account's country, no cost


@pytest.mark.parametrize("field, value, message", [
    ("phone_region", "by", "ISO 3166-1 alpha-2"), ("phone_region", "UK", "GB"), ("phone_region", "ZZ", "ISO 3166-1"),
    ("phone_region", "BLR", "between 1 and 2"), ("phone_region", 375, "Not a valid string"),
    ("phone_region", "", "between 1 and 2"), ("phone_region", None, "Field may not be null"),
    ("cost_field", "x" * 256, "between 1 and 255"), ("cost_field", "UF_CRM_\nCOST", "control characters"),
    ("cost_field", ["UF_CRM_COST"], "Not a valid string"), ("cost_field", True, "Not a valid string"),
], ids=lambda value: repr(value)[:20])
def test_a_bad_phone_region_or_cost_field_is_a_400_naming_it(field, value, message):
    from chalicelib.errors import ApiError
    with pytest.raises(ApiError) as info:
        save({field: value})
    assert info.value.status == 400 and list(info.value.details) == [field]
    assert any(message in text for text in info.value.details[field])


def test_a_history_import_reads_phones_in_the_accounts_country_and_notes_the_rest(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm)
    kept = amocrm.create_contact("Алесь", phones=["8 029 123-45-67"], notify=False)
    bad = amocrm.create_contact("Ганна", phones=["8 029 12"], notify=False)
    lead = amocrm.create_lead("Заказ", 7001, 142, price=99, contacts=[kept["id"]], notify=False)
    assert amo.backfill.start(iid, {"since": int(time.time()) - 86400})["started"] is True
    amo.drain()
    counter = metrika_sandbox.counter(amo.counter_id)
    assert counter.contacts[str(kept["id"])]["phones"] == ["375291234567"]
    assert "phones" not in counter.contacts[str(bad["id"])]  # the contact still goes, without it
    assert counter.orders[str(lead["id"])]["currency"] == "USD"
    assert integration_status(amo.store, iid, requests_today=None)["phones_dropped"] == {
        "count": 1, "contacts": 1, "example": {"contact": str(bad["id"]), "phone": "* *** 12"}}


# --- the account read: garbled answers, and a configuration saved since --------------------------------

GARBLED = [[], {}, "ok", {"currency": "USD", "country": "BY"}, {"id": None, "currency": "USD"}]


@pytest.mark.parametrize("answer", GARBLED, ids=lambda a: repr(a)[:24])
def test_a_garbled_account_answer_holds_the_order_back_rather_than_guess(amo, amocrm, metrika_sandbox, answer):
    """A 200 that is not the account model ("Параметры аккаунта": an object with the account's `id`) says
    nothing about the currency: the order waits, as on a 503, instead of going without one (Metrika would
    count it in the counter's currency) — and nothing is kept, so the next read is not skipped for a day."""
    iid = amo_integration(amo, amocrm)
    amocrm.set_faults(account_answer=answer)
    lead, _ = sale(amocrm)
    for _, body in amocrm.outbox:
        amo.ingest.amocrm(iid, body, {"secret": SECRET})
    amocrm.outbox.clear()
    report = amo.worker.handle(amo.queue.receive(100))
    assert report.retried == 2 and report.uploaded == 0
    assert str(lead["id"]) not in metrika_sandbox.counter(amo.counter_id).orders
    assert "not the account" in amo.store.get_entity(iid, "order", str(lead["id"]))["last_error"]["message"]
    amocrm.set_faults()
    amo.drain()
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "USD"


def test_a_garbled_answer_a_day_later_keeps_the_last_good_copy(amo, amocrm, metrika_sandbox):
    iid = amo_integration(amo, amocrm)
    sale(amocrm)
    post_fired(amo, amocrm, iid)
    amo.clock.advance(ACCOUNT_MAX_AGE + 1)
    amocrm.set_faults(account_answer={})
    lead, _ = sale(amocrm)
    post_fired(amo, amocrm, iid)
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "USD"
    amocrm.set_faults()
    amocrm.set_account(currency="EUR")
    lead, _ = sale(amocrm)
    post_fired(amo, amocrm, iid)  # the garbled answer was not kept as a fresh read: asked again
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "EUR"
    assert account_reads(amocrm) == 3


def put_config(core, amocrm, iid, **fields):
    """The admin's `PUT /integrations/{id}` (its validation and storage, `save_integration`)."""
    from chalicelib.integrations import save_integration
    body = {"crm": "amocrm", "counter_id": core.counter_id, "metrika_token": "y0_" + "m" * 20,
            "timezone": "Europe/Moscow",
            "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": SECRET}, **fields}
    save_integration(core.store, iid, body, lambda config: "Europe/Moscow", allow_loopback=True)


def test_a_config_put_reads_the_account_again(amo, amocrm, metrika_sandbox):
    """The account kept from before a PUT is not trusted for the rest of its day: the next delivery reads
    it again (a currency changed in amoCRM shows at once when the admin saves the integration; a
    `currency` removed by the PUT is the account's current one)."""
    put_config(amo, amocrm, "shop", currency="EUR")
    amo.store.put_status_mapping("shop", AMO_MAPPING, 0)
    amocrm.set_account(currency="USD")
    sale(amocrm)
    post_fired(amo, amocrm, "shop")
    assert account_reads(amocrm) == 1  # for the country only: the currency is the integration's
    amocrm.set_account(currency="GBP")
    put_config(amo, amocrm, "shop")  # `currency` removed: the account's, as it is now
    lead, _ = sale(amocrm)
    post_fired(amo, amocrm, "shop")
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "GBP"
    assert account_reads(amocrm) == 2
    # Saved again while amoCRM cannot answer: the copy read before the PUT still serves.
    put_config(amo, amocrm, "shop")
    amocrm.set_faults(error_5xx=1.0, paths="/api/v4/account")
    lead, _ = sale(amocrm)
    post_fired(amo, amocrm, "shop")
    assert metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]["currency"] == "GBP"


# --- values that are not amounts, over the wire, both CRMs --------------------------------------------

NOT_AMOUNTS = [  # (as the CRM's API carries it, the reason on the status page)
    ("1e400", "not a number"), ("NaN", "not a number"), ("-5", "negative"), ("9" * 2000, "longer than 40"),
    (float("inf"), "not a finite number"), (int("9" * 2000), "above 10^15"), (True, "yes/no"),
    (["100", "200"], "several values"),
]


def _ids(value):
    return repr(value)[:16]


@pytest.mark.parametrize("value, reason", NOT_AMOUNTS, ids=_ids)
def test_an_amocrm_cost_that_is_not_an_amount_is_left_out_the_order_goes(amo, amocrm, metrika_sandbox, value, reason):
    iid = amo_integration(amo, amocrm, cost_field="Себестоимость")
    values = [{"value": v} for v in (value if isinstance(value, list) else [value])]
    contact = amocrm.create_contact("Алесь", phones=["8 029 123-45-67"])
    lead = amocrm.create_lead("A", 7001, 142, price=250, contacts=[contact["id"]], custom_fields=[
        {"field_id": 880011, "field_name": "Себестоимость", "field_code": None, "values": values}])
    post_fired(amo, amocrm, iid)
    order = metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]
    assert "cost" not in order and order["revenue"] == 250 and order["currency"] == "USD"
    dropped = integration_status(amo.store, iid, requests_today=None)["costs_dropped"]
    assert dropped["count"] == 1 and dropped["example"]["order"] == str(lead["id"])
    assert reason in dropped["example"]["reason"] and len(dropped["example"]["value"]) <= 40


@pytest.mark.parametrize("value, reason", NOT_AMOUNTS, ids=_ids)
def test_a_bitrix24_cost_that_is_not_an_amount_is_left_out_the_order_goes(b24, bitrix, metrika_sandbox, value, reason):
    contact = bitrix.create_contact("Олена", phones=["067 123 45 67"], notify=False)
    deal = bitrix.create_deal("A", stage_id="WON", opportunity="990.00", currency="USD", contact_id=contact["ID"],
                              fields={"UF_CRM_COST": value})
    deliver_b24(b24, bitrix)
    order = metrika_sandbox.counter(b24.counter_id).orders[deal["ID"]]
    assert "cost" not in order and order["revenue"] == 990 and order["currency"] == "USD"
    dropped = integration_status(b24.store, "portal", requests_today=None)["costs_dropped"]
    assert dropped["count"] == 1 and dropped["example"]["order"] == deal["ID"]
    assert reason in dropped["example"]["reason"] and len(dropped["example"]["value"]) <= 40


def test_a_cost_cleared_in_the_crm_leaves_the_status_page(amo, amocrm, metrika_sandbox):
    """The order goes without `cost` before and after; the status page stops counting the value once it
    is gone from the CRM (the notes are replaced by each delivery, not merged into the old ones)."""
    iid = amo_integration(amo, amocrm, cost_field="Себестоимость")
    contact = amocrm.create_contact("Алесь", phones=["8 029 123-45-67"])
    lead = amocrm.create_lead("A", 7001, 142, price=250, contacts=[contact["id"]], custom_fields=[
        {"field_id": 880011, "field_name": "Себестоимость", "field_code": None, "values": [{"value": "-5"}]}])
    post_fired(amo, amocrm, iid)
    assert integration_status(amo.store, iid, requests_today=None)["costs_dropped"]["count"] == 1
    amo.clock.advance(5)
    amocrm.update_lead(lead["id"], custom_fields_values=[])
    post_fired(amo, amocrm, iid)
    assert integration_status(amo.store, iid, requests_today=None)["costs_dropped"] == {"count": 0, "example": None}
    assert "cost" not in metrika_sandbox.counter(amo.counter_id).orders[str(lead["id"])]


def test_a_bitrix24_deal_keeps_its_own_currency_and_one_without_takes_the_integrations(b24, bitrix, metrika_sandbox):
    """`currency` on a Bitrix24 integration is not ignored: a deal that names no `CURRENCY_ID` carries it;
    a deal's own `CURRENCY_ID` still wins (each deal knows its currency)."""
    config = b24.store.get_integration("portal")
    b24.store.put_integration("portal", {**config, "currency": "EUR"})
    own = bitrix.create_deal("A", stage_id="WON", opportunity="10.00", currency="USD")
    bare = bitrix.create_deal("B", stage_id="WON", opportunity="20.00", currency="")
    deliver_b24(b24, bitrix)
    orders = metrika_sandbox.counter(b24.counter_id).orders
    assert orders[own["ID"]]["currency"] == "USD"
    assert orders[bare["ID"]]["currency"] == "EUR"
