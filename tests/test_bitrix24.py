"""Bitrix24 end to end over real HTTP: events (as the Bitrix24 sandbox fires them) → app → SQS → worker →
Bitrix24 REST sandbox (batch) → Metrika sandbox; plus the pure translation and reconciliation."""
import json
from datetime import datetime, timedelta, timezone

import pytest

from chalicelib.crm.bitrix24.api import Bitrix24Client
from chalicelib.crm.bitrix24.translate import deal_rows, default_mapping, product_id
from chalicelib.metrika.schemas import OrderRow, to_cdp_rows
from sandbox.bitrix24 import seed_demo
from tests.conftest import admin_headers

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
APP_TOKEN = "q8w3e7r2t6y1u5i9o4p0a3s8d2f7g1h6"
COUNTER = 7070


@pytest.fixture
def portal(bitrix):
    bitrix.reset()
    return seed_demo(bitrix)


@pytest.fixture
def integration(app_client, integration_id, bitrix, portal, queue):
    return configure(app_client, integration_id, bitrix)


def configure(app_client, integration_id, bitrix):
    import app
    app._SOURCES.clear()
    config = {"crm": "bitrix24", "counter_id": COUNTER, "metrika_token": "y0_b24", "timezone": "Europe/Moscow",
              "connection": {"webhook_url": bitrix.webhook_url, "application_token": APP_TOKEN,
                             "member_id": bitrix.member_id, "domain": bitrix.domain}}
    response = app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(), body=json.dumps(config))
    assert response.status_code == 200, response.json_body
    applied = app_client.http.post(f"/integrations/{integration_id}/status-mapping/defaults", headers=admin_headers())
    assert applied.status_code == 200, applied.json_body
    return integration_id


def deliver(client, integration_id, bitrix, token=APP_TOKEN, times=1):
    events = list(bitrix.outbox) * times
    bitrix.outbox.clear()
    answers = []
    for event, entity_id in events:
        response = client.http.post(f"/webhooks/bitrix24/{integration_id}", headers=FORM,
                                    body=bitrix.event_body(event, entity_id, token))
        answers.append(response)
    return answers


def orders_uploads(metrika_sandbox):
    return [r for r in metrika_sandbox.requests if r["path"].endswith("/data/orders/json")]


def test_deal_added_then_won_in_another_funnel(app_client, integration, bitrix, portal, worker, metrika_sandbox):
    deal = bitrix.create_deal("Заказ #2001", stage_id="C2:NEW", category_id=2, opportunity="15990.00",
                              contact_id=portal["contact_id"], lead_id=portal["lead_id"],
                              products=[(17, "Чайник синий", "7995.00", "2"), (0, "Доставка", "0", "1")])
    deliver(app_client, integration, bitrix)
    worker.drain()
    bitrix.update_deal(deal["ID"], STAGE_ID="C2:WON")
    deliver(app_client, integration, bitrix)
    worker.drain()
    counter = metrika_sandbox.counter(COUNTER)
    order = counter.orders[deal["ID"]]
    final = bitrix.deals[deal["ID"]]
    assert order == {"id": deal["ID"], "client_uniq_id": portal["contact_id"], "client_type": "CONTACT",
                     "order_status": "C2:WON", "create_date_time": final["DATE_CREATE"][:19].replace("T", " "),
                     "update_date_time": final["DATE_MODIFY"][:19].replace("T", " "),
                     "finish_date_time": final["MOVED_TIME"][:19].replace("T", " "),
                     "revenue": 15990, "currency": "RUB",
                     "products": {"17": 2, f"row-{bitrix.product_rows[deal['ID']][1]['ID']}": 1}}
    contact = counter.contacts[portal["contact_id"]]
    assert contact["client_ids"] == ["1714140095123456789"]  # found on the source lead
    assert contact["phones"] == ["79165550102"] and contact["emails"] == ["anna@example.com"]
    assert contact["name"] == "Анна Петрова"
    assert counter.order_statuses["C2:WON"]["type"] == "PAID"
    assert {c["method"] for c in bitrix.calls} >= {"batch"}


@pytest.mark.parametrize("token", ["wrong-token", APP_TOKEN[:-1]])
def test_wrong_application_token_is_403_and_no_rest_call(app_client, integration, bitrix, portal, worker, token):
    calls_before = len(bitrix.calls)
    bitrix.update_deal(portal["deal_id"], STAGE_ID="C2:WON")
    [answer] = deliver(app_client, integration, bitrix, token=token)
    assert answer.status_code == 403
    worker.drain()
    assert len(bitrix.calls) == calls_before


def test_storm_of_updates_gives_one_state_and_few_uploads(app_client, integration, bitrix, portal, worker, metrika_sandbox):
    deal_id = portal["deal_id"]
    for i in range(19):
        bitrix.update_deal(deal_id, OPPORTUNITY=f"{16000 + i}.00")
    bitrix.update_deal(deal_id, STAGE_ID="C2:WON", OPPORTUNITY="17000.00")
    answers = deliver(app_client, integration, bitrix)
    assert len(answers) == 20 and sum(a.json_body["queued"] for a in answers) == 1
    worker.drain()
    order = metrika_sandbox.counter(COUNTER).orders[deal_id]
    assert (order["order_status"], order["revenue"]) == ("C2:WON", 17000)
    assert len(orders_uploads(metrika_sandbox)) == 1
    assert sum(1 for c in bitrix.calls if c["method"] == "batch") == 1


def test_lost_webhook_is_recovered_by_reconciliation(app_client, integration, bitrix, portal, worker, metrika_sandbox):
    first = app_client.http.post(f"/integrations/{integration}/reconcile", headers=admin_headers(), body=b"{}")
    assert first.status_code == 200 and first.json_body["found"] == 1  # the seeded deal, never announced
    worker.drain()
    bitrix.update_deal(portal["deal_id"], STAGE_ID="C2:WON")
    bitrix.outbox.clear()  # the event never arrives: Bitrix24 does not retry
    second = app_client.http.post(f"/integrations/{integration}/reconcile", headers=admin_headers(), body=b"{}")
    assert second.json_body["queued"] == 1
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[portal["deal_id"]]["order_status"] == "C2:WON"
    uploads = len(orders_uploads(metrika_sandbox))
    # The next run overlaps the last one (clock skew): it may re-read the deal, but sends nothing new.
    third = app_client.http.post(f"/integrations/{integration}/reconcile", headers=admin_headers(), body=b"{}")
    assert third.json_body["found"] == 1
    worker.drain()
    assert len(orders_uploads(metrika_sandbox)) == uploads


def test_reconciliation_finds_a_deal_changed_without_an_event_while_the_portal_clock_lags(
        app_client, integration_id, bitrix, queue, worker, metrika_sandbox):
    """A portal whose DATE_MODIFY runs three hours behind ours (a wrong clock or time zone): the window
    is kept in the portal's own clock (the newest DATE_MODIFY it listed), so a change it dates three hours
    "ago" is still inside the next one."""
    bitrix.reset(clock_lag=3 * 3600)
    seeded = seed_demo(bitrix)
    configure(app_client, integration_id, bitrix)
    deal_id = seeded["deal_id"]
    modified = datetime.fromisoformat(bitrix.deals[deal_id]["DATE_MODIFY"])
    assert modified < datetime.now(timezone.utc) - timedelta(hours=2)
    first = app_client.http.post(f"/integrations/{integration_id}/reconcile", headers=admin_headers(), body=b"{}")
    assert first.status_code == 200 and first.json_body["found"] == 1
    worker.drain()
    bitrix.update_deal(deal_id, STAGE_ID="C2:WON", notify=False)  # no event at all
    second = app_client.http.post(f"/integrations/{integration_id}/reconcile", headers=admin_headers(), body=b"{}")
    assert second.json_body["queued"] == 1
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[deal_id]["order_status"] == "C2:WON"


def test_scheduled_reconciliation_covers_every_integration(service_env, integration, bitrix, portal, queue, monkeypatch):
    """The schedule queues a job per integration; the worker runs them: the deleted one's is dropped,
    this one's finds the seeded deal (never announced) and queues it."""
    import app
    from chalice.test import Client
    # Other tests' integrations point at sandboxes that are gone: list this one and a deleted one.
    monkeypatch.setattr(app.get_store(), "list_integration_ids", lambda: ["deleted-meanwhile", integration])
    with Client(app.app) as client:
        event = client.events.generate_cw_event(source="aws.events", detail_type="Scheduled Event", detail={},
                                                resources=[], region="eu-central-1")
        event["time"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert client.lambda_.invoke("reconcile_all", event).payload["queued"] == 2
    jobs = queue.bodies()
    assert sorted((m["integration_id"], m["kind"]) for m in jobs) == [("deleted-meanwhile", "reconcile"),
                                                                      (integration, "reconcile")]
    report = app.get_worker().handle(json.dumps(m) for m in jobs)
    assert (report.jobs, report.jobs_skipped, report.failed_jobs) == (1, 1, 0)
    assert [(m["integration_id"], m["kind"], m["crm_id"]) for m in queue.bodies()] == [
        (integration, "order", str(portal["deal_id"]))]


def test_deleted_deal_becomes_cancelled(app_client, integration, bitrix, portal, worker, metrika_sandbox):
    bitrix.update_deal(portal["deal_id"], TITLE="Заказ #1042 (правка)")
    deliver(app_client, integration, bitrix)
    worker.drain()
    bitrix.delete_deal(portal["deal_id"])
    deliver(app_client, integration, bitrix)
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[portal["deal_id"]]["order_status"] == "CANCELLED"


def test_contact_update_event(app_client, integration, bitrix, portal, worker, metrika_sandbox):
    bitrix.update_contact(portal["contact_id"], EMAIL=[{"VALUE": "anna.p@example.com", "VALUE_TYPE": "WORK"}])
    deliver(app_client, integration, bitrix)
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).contacts[portal["contact_id"]]["emails"] == ["anna.p@example.com"]


def test_rest_errors_and_rate_limit(bitrix, portal):
    client = Bitrix24Client(bitrix.webhook_url)
    assert client.deal(portal["deal_id"])["OPPORTUNITY"] == "15990.00"
    assert client.product_rows(portal["deal_id"])[0]["QUANTITY"] == 2.0
    assert client.lead(portal["lead_id"])["UF_CRM_YM_CLIENT_ID"] == "1714140095123456789"
    assert client.contact(portal["contact_id"])["NAME"] == "Анна"
    assert client.deal("999999") is None  # "Not found": the deal does not exist
    from chalicelib.errors import Misconfigured, Transient
    with pytest.raises(Misconfigured, match="NO_AUTH_FOUND"):
        Bitrix24Client(bitrix.webhook_url.replace(bitrix.code, "wrong")).deal("1")
    bitrix.bucket_size = 3
    try:
        with pytest.raises(Transient, match="QUERY_LIMIT_EXCEEDED"):
            fast = Bitrix24Client(bitrix.webhook_url, attempts=2, backoff=0.01)
            for _ in range(10):
                fast.deal(portal["deal_id"])
    finally:
        bitrix.bucket_size = 50
    assert "democode" not in repr(client) and bitrix.code not in repr(client)


def test_shared_limiter_keeps_under_the_bucket(service_env, integration, bitrix, portal):
    from app import get_store
    from chalicelib.crm.bitrix24.source import Bitrix24Source
    bitrix.bucket_size, bitrix.drain_per_second = 2, 2.0  # a tight bucket: any burst would be refused
    try:
        source = Bitrix24Source(get_store().reserve_slot)
        config = get_store().get_integration(integration)
        for _ in range(4):
            source.snapshot(config, [], [])
            list(source.client_for(config).deals_modified_since("2020-01-01T00:00:00+00:00"))
        assert bitrix.limit_hits == 0
    finally:
        bitrix.bucket_size, bitrix.drain_per_second = 50, 2.0


def test_status_list_and_defaults(bitrix, portal):
    client = Bitrix24Client(bitrix.webhook_url)
    entries = {e["crm_status"]: e for e in default_mapping(list(client.deal_stages()), client.deal_categories())}
    assert entries["WON"] == {"crm_status": "WON", "metrika_status_id": "WON", "humanized": "Общая: Сделка успешна",
                              "type": "PAID"}
    assert entries["C2:WON"]["type"] == "PAID" and entries["C2:LOSE"]["type"] == "CANCELLED"
    assert entries["APOLOGY"]["type"] == "CANCELLED" and entries["C2:NEW"]["type"] == "IN_PROGRESS"
    assert entries["C2:NEW"]["humanized"] == "Опт: Новая"


# --- pure translation ---------------------------------------------------------------------------------

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
MAPPING = [{"crm_status": "C2:WON", "metrika_status_id": "C2:WON", "type": "PAID"}]
DEAL = {"ID": "4821", "TITLE": "Order #1042", "STAGE_ID": "C2:WON", "CLOSED": "Y", "OPPORTUNITY": "15990.50",
        "CURRENCY_ID": "RUB", "CONTACT_ID": None, "LEAD_ID": "977", "DATE_CREATE": "2024-04-28T18:03:11+03:00",
        "DATE_MODIFY": "2024-05-01T09:59:42+03:00", "MOVED_TIME": "2024-05-01T09:59:42+03:00"}


def test_deal_translation_in_utc_with_client_id_on_the_deal():
    entity = deal_rows({**DEAL, "UF_CRM_CID": "1714140095123456789"}, contact=None, lead={"UF_CRM_CID": "1799999999999999999"},
                       product_rows=[], mapping=MAPPING, client_id_field="UF_CRM_CID", now=NOW)
    assert entity.contacts[0]["uniq_id"] == "deal-4821"
    assert entity.contacts[0]["client_ids"] == ["1714140095123456789"]  # the deal's own value wins
    [order] = to_cdp_rows(OrderRow(time_zone="UTC", now=NOW), entity.orders)
    assert order["create_date_time"] == "2024-04-28 15:03:11" and order["revenue"] == 15990.5
    assert order["finish_date_time"] == "2024-05-01 06:59:42"


def test_client_id_falls_back_to_lead_then_contact():
    contact = {"ID": "311", "NAME": "Anna", "UF_CRM_CID": ["1700000000000000001"]}
    entity = deal_rows(DEAL, contact=contact, lead=None, product_rows=[], mapping=MAPPING, client_id_field="UF_CRM_CID", now=NOW)
    assert entity.contacts[0]["client_ids"] == ["1700000000000000001"]


def test_unmapped_stage_is_held():
    entity = deal_rows({**DEAL, "STAGE_ID": "C2:NEW"}, contact=None, lead=None, product_rows=[], mapping=MAPPING,
                       client_id_field="UF_CRM_CID", now=NOW)
    assert entity.error["code"] == "unmapped_stage" and entity.error["crm_status"] == "C2:NEW"


def test_product_ids_fit_metrikas_pattern():
    assert product_id({"PRODUCT_ID": 17, "ID": "5"}) == "17"
    assert product_id({"PRODUCT_ID": 0, "ID": "5"}) == "row-5"
    assert product_id({"PRODUCT_ID": "0", "ID": "5.1"}) == "row-5_1"


def test_future_times_are_clamped():
    future = (NOW + timedelta(minutes=5)).isoformat()
    entity = deal_rows({**DEAL, "DATE_MODIFY": future}, contact=None, lead=None, product_rows=[], mapping=MAPPING,
                       client_id_field="X", now=NOW)
    assert entity.orders[0]["update_date_time"] == NOW


def test_an_amount_that_is_not_a_number_parks_the_deal_naming_the_field():
    from chalicelib.crm.bitrix24.translate import deal_rows
    entity = deal_rows({**DEAL, "OPPORTUNITY": "двадцать"}, contact=None, lead=None, product_rows=[], mapping=MAPPING,
                       client_id_field="UF_CRM_CID", now=NOW)
    assert entity.error["code"] == "bad_value" and "OPPORTUNITY" in entity.error["message"]
    rows = [{"ID": "1", "PRODUCT_ID": "5", "QUANTITY": "2 шт"}]
    entity = deal_rows(DEAL, contact=None, lead=None, product_rows=rows, mapping=MAPPING, client_id_field="UF_CRM_CID",
                       now=NOW)
    assert entity.error and "QUANTITY" in entity.error["message"]


# --- the deal's currency, phones in the integration's region, the cost field --------------------------

def test_the_deal_keeps_its_own_currency():
    for currency in ("RUB", "USD", "KZT"):
        entity = deal_rows({**DEAL, "CURRENCY_ID": currency}, contact=None, lead=None, product_rows=[],
                           mapping=MAPPING, client_id_field="X", now=NOW)
        assert entity.orders[0]["currency"] == currency


def test_phones_of_the_contact_are_read_in_the_region_and_bad_ones_noted():
    contact = {"ID": "311", "NAME": "Олена", "PHONE": [{"VALUE": "067 123 45 67"}, {"VALUE": "+7 916 123-45-67"},
                                                       {"VALUE": "067"}]}
    entity = deal_rows(DEAL, contact=contact, lead=None, product_rows=[], mapping=MAPPING, client_id_field="X",
                       now=NOW, phone_region="UA")
    assert entity.contacts[0]["phones"] == ["+380671234567", "+79161234567"]
    assert entity.notes == {"phones_dropped": {"311": 1}, "phone_examples": {"311": "***"}}
    russian = deal_rows(DEAL, contact=contact, lead=None, product_rows=[], mapping=MAPPING, client_id_field="X", now=NOW)
    assert russian.contacts[0]["phones"] == ["+79161234567"] and russian.notes["phones_dropped"] == {"311": 2}


@pytest.mark.parametrize("value, cost", [("11000.50", 11000.5), ("11000.5|RUB", 11000.5), (11000, 11000),
                                         (["9 990"], 9990), ("0", 0)])
def test_cost_field_becomes_the_orders_cost(value, cost):
    entity = deal_rows({**DEAL, "UF_CRM_COST": value}, contact=None, lead=None, product_rows=[], mapping=MAPPING,
                       client_id_field="X", now=NOW, cost_field="UF_CRM_COST")
    [order] = to_cdp_rows(OrderRow(time_zone="UTC", now=NOW), entity.orders)
    assert order["cost"] == cost and order["revenue"] == 15990.5 and "cost_dropped" not in entity.notes


@pytest.mark.parametrize("value, reason", [
    ("-5", "negative"), ("1e400", "not a number"), ("9" * 2000, "longer than 40 characters"),
    ("двадцать", "not a number"), ("500|USD", "in USD, the order is in RUB"),
    (["1", "2"], "the field holds several values"),
    (True, "a yes/no value is not an amount"),
], ids=lambda value: str(value)[:16])
def test_a_bad_cost_is_left_out_the_order_still_goes(value, reason):
    entity = deal_rows({**DEAL, "UF_CRM_COST": value}, contact=None, lead=None, product_rows=[], mapping=MAPPING,
                       client_id_field="X", now=NOW, cost_field="UF_CRM_COST")
    assert entity.error is None
    [order] = to_cdp_rows(OrderRow(time_zone="UTC", now=NOW), entity.orders)
    assert "cost" not in order and order["order_status"] == "C2:WON"
    assert entity.notes["cost_dropped"]["reason"] == reason


def test_an_empty_or_absent_cost_field_sends_no_cost_and_notes_nothing():
    for deal in ({**DEAL, "UF_CRM_COST": ""}, {**DEAL, "UF_CRM_COST": None}, {**DEAL, "UF_CRM_COST": "|RUB"},
                 {**DEAL, "UF_CRM_COST": []}, DEAL):
        entity = deal_rows(deal, contact=None, lead=None, product_rows=[], mapping=MAPPING, client_id_field="X",
                           now=NOW, cost_field="UF_CRM_COST")
        assert "cost" not in entity.orders[0] and entity.notes == {}
