"""Custom attributes and product lists end to end: the mapping is validated against the counter and
created in the Metrika sandbox; values from an amoCRM custom field and a Bitrix24 `UF_CRM_` field arrive
on contacts and orders (through the CSV upload); a bad value parks only its deal; products in orders get
names in the sandbox's product list, which the sandbox replaces on every save."""
import json
from datetime import datetime, timezone

import pytest

from chalicelib.metrika import cdp
from chalicelib.metrika.schemas import coerce_attribute_value, normalize_product_id, resolve_time_zone
from tests.conftest import admin_headers

AMO_COUNTER, B24_COUNTER = 9191, 9292
AMO_SECRET = "attr-amocrm-secret-0123456789abc"
B24_APP_TOKEN = "at8w3e7r2t6y1u5i9o4p0a3s8d2f7g1h"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TIER_FIELD, BUDGET_FIELD, PAID_FIELD = 880001, 880002, 880003

AMO_ATTRIBUTES = [
    {"crm_field": str(TIER_FIELD), "entity": "contact", "name": "customer_tier", "type": "text", "humanized": "Тип клиента"},
    {"crm_field": str(BUDGET_FIELD), "entity": "order", "name": "budget", "type": "numeric"},
    {"crm_field": str(PAID_FIELD), "entity": "order", "name": "paid_on", "type": "date"},
]


def field(field_id, name, *values):
    return {"field_id": field_id, "field_name": name, "field_code": None, "values": [{"value": v} for v in values]}


def put_attributes(client, integration_id, entries):
    return client.http.put(f"/integrations/{integration_id}/attributes", headers=admin_headers(),
                           body=json.dumps({"entries": entries}))


@pytest.fixture
def amo(app_client, integration_id, amocrm, queue, metrika_sandbox):
    import app
    app._SOURCES.clear()
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    metrika_sandbox.add_counter(AMO_COUNTER, "Europe/Moscow")
    config = {"crm": "amocrm", "counter_id": AMO_COUNTER, "metrika_token": "y0_attr", "timezone": "Europe/Moscow",
              "connection": {"base_url": amocrm.url, "access_token": amocrm.token,
                             "account_id": str(amocrm.account_id), "webhook_secret": AMO_SECRET}}
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(config)).status_code == 200
    assert app_client.http.post(f"/integrations/{integration_id}/status-mapping/defaults",
                                headers=admin_headers()).status_code == 200
    return integration_id


@pytest.fixture
def b24(app_client, integration_id, bitrix, queue, metrika_sandbox):
    import app
    app._SOURCES.clear()
    bitrix.reset()
    bitrix.add_funnel(0, "Общая", [("NEW", "Новая", None), ("WON", "Сделка успешна", "S")])
    metrika_sandbox.add_counter(B24_COUNTER, "Europe/Moscow")
    config = {"crm": "bitrix24", "counter_id": B24_COUNTER, "metrika_token": "y0_attr_b24", "timezone": "Europe/Moscow",
              "connection": {"webhook_url": bitrix.webhook_url, "application_token": B24_APP_TOKEN,
                             "member_id": bitrix.member_id, "domain": bitrix.domain}}
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(config)).status_code == 200
    assert app_client.http.post(f"/integrations/{integration_id}/status-mapping/defaults",
                                headers=admin_headers()).status_code == 200
    return integration_id


def deliver_amocrm(client, integration_id, amocrm):
    for _, body in amocrm.outbox:
        response = client.http.post(f"/webhooks/amocrm/{integration_id}?secret={AMO_SECRET}", headers=FORM, body=body)
        assert response.status_code == 200
    amocrm.outbox.clear()


def deliver_bitrix(client, integration_id, bitrix):
    for event, entity_id in bitrix.outbox:
        response = client.http.post(f"/webhooks/bitrix24/{integration_id}", headers=FORM,
                                    body=bitrix.event_body(event, entity_id, B24_APP_TOKEN))
        assert response.status_code == 200
    bitrix.outbox.clear()


def test_amocrm_custom_fields_arrive_as_attributes_and_a_bad_value_parks_only_its_deal(
        app_client, amo, amocrm, worker, metrika_sandbox):
    saved = put_attributes(app_client, amo, AMO_ATTRIBUTES)
    assert saved.status_code == 200, saved.json_body
    assert sorted(saved.json_body["created_in_metrika"]) == ["contact:customer_tier", "order:budget", "order:paid_on"]
    counter = metrika_sandbox.counter(AMO_COUNTER)
    assert counter.custom_attributes["CONTACT"]["customer_tier"]["humanized"] == "Тип клиента"
    assert app_client.http.get(f"/integrations/{amo}/attributes", headers=admin_headers()).json_body["entries"][1]["name"] == "budget"

    kettle = amocrm.add_catalog_element(4521, "Чайник синий", 2490)
    good_contact = amocrm.create_contact("Иван", phones=["+79161234567"], custom_fields=[field(TIER_FIELD, "Тип", "VIP; опт")])
    bad_contact = amocrm.create_contact("Пётр", phones=["+79161234568"])
    paid_on = int(datetime(2026, 10, 1, 22, 30, tzinfo=timezone.utc).timestamp())  # 2 Oct in Moscow
    good = amocrm.create_lead("Заказ 1", 7001, 1001, price=4980, contacts=[good_contact["id"]], products=[(kettle["id"], 2)],
                              custom_fields=[field(BUDGET_FIELD, "Бюджет", "1 500,50"), field(PAID_FIELD, "Оплачен", paid_on)])
    bad = amocrm.create_lead("Заказ 2", 7001, 1001, price=10, contacts=[bad_contact["id"]],
                             custom_fields=[field(BUDGET_FIELD, "Бюджет", "около тысячи")])
    deliver_amocrm(app_client, amo, amocrm)
    worker.drain()

    contact = counter.contacts[str(good_contact["id"])]
    assert contact["attribute_values"] == {"customer_tier": ["VIP; опт"]}
    order = counter.orders[str(good["id"])]
    assert order["attribute_values"] == {"budget": ["1500.5"], "paid_on": ["2026-10-02"]}
    assert order["products"] == {str(kettle["id"]): 2.0}
    uploads = [r["path"] for r in metrika_sandbox.requests if "/data/" in r["path"]]
    assert any(p.endswith("/data/orders/csv") for p in uploads) and any(p.endswith("/data/contacts/csv") for p in uploads)
    # The bad value held only its own deal, with the field and value named.
    assert str(bad["id"]) not in counter.orders
    status = app_client.http.get(f"/integrations/{amo}/status", headers=admin_headers()).json_body
    assert [f["crm_id"] for f in status["failed"]] == [str(bad["id"])]
    assert "около тысячи" in json.dumps(status["failed"][0]["error"], ensure_ascii=False)
    assert "budget" in status["failed"][0]["error"]["fields"]["attribute_values"]
    # Products in orders got names.
    assert counter.products == {str(kettle["id"]): "Чайник синий"}
    assert status["products_listed"] == 1


def test_bitrix24_uf_fields_arrive_on_contacts_and_orders(app_client, b24, bitrix, worker, metrika_sandbox):
    entries = [{"crm_field": "UF_CRM_CUSTOMER_TYPE", "entity": "contact", "name": "customer_type", "type": "text"},
               {"crm_field": "UF_CRM_1721244482250", "entity": "order", "name": "categories", "type": "text",
                "multivalued": True},
               {"crm_field": "SOURCE_ID", "entity": "order", "name": "crm_source", "type": "text"},
               {"crm_field": "UF_CRM_DELIVERY_AT", "entity": "order", "name": "delivery_at", "type": "datetime"}]
    assert put_attributes(app_client, b24, entries).status_code == 200
    contact = bitrix.create_contact("Анна", "Петрова", phones=["+7 916 555-01-02"],
                                    fields={"UF_CRM_CUSTOMER_TYPE": "Оптовик"}, notify=False)
    deal = bitrix.create_deal("Заказ", stage_id="WON", opportunity="15990.00", contact_id=contact["ID"],
                              products=[(17, "Чайник синий", "7995.00", "2"), (0, "Доставка курьером", "500", "1")],
                              fields={"UF_CRM_1721244482250": ["Чайники", "Посуда"], "SOURCE_ID": "WEB",
                                      "UF_CRM_DELIVERY_AT": "2026-11-01T10:00:00+03:00"})
    deliver_bitrix(app_client, b24, bitrix)
    worker.drain()
    counter = metrika_sandbox.counter(B24_COUNTER)
    assert counter.contacts[contact["ID"]]["attribute_values"] == {"customer_type": ["Оптовик"]}
    order = counter.orders[deal["ID"]]
    assert order["attribute_values"] == {"categories": ["Чайники", "Посуда"], "crm_source": ["WEB"],
                                         "delivery_at": ["2026-11-01 10:00:00"]}
    free_row = next(p for p in order["products"] if p.startswith("row-"))
    assert counter.products == {"17": "Чайник синий", free_row: "Доставка курьером"}


def test_product_sync_on_demand_sends_the_whole_catalogue(app_client, amo, amocrm, worker, metrika_sandbox):
    for n in range(300):  # more than one API page
        amocrm.add_catalog_element(4521, f"Товар {n}", 100 + n)
    synced = app_client.http.post(f"/integrations/{amo}/products/sync", headers=admin_headers())
    assert synced.status_code == 200, synced.json_body
    assert synced.json_body == {"products": 300, "added": 300}
    counter = metrika_sandbox.counter(AMO_COUNTER)
    assert len(counter.products) == 300 and counter.products[str(min(amocrm.catalogs[4521]))] == "Товар 0"
    # A product added later reaches the list with the order that names it; the list is sent whole,
    # so the sandbox (which replaces it on each save) still has the other 300.
    extra = amocrm.add_catalog_element(4521, "Новинка", 990)
    contact = amocrm.create_contact("Ольга", phones=["+79160000001"])
    amocrm.create_lead("Заказ", 7001, 1001, price=990, contacts=[contact["id"]], products=[(extra["id"], 1)])
    deliver_amocrm(app_client, amo, amocrm)
    worker.drain()
    assert len(counter.products) == 301 and counter.products[str(extra["id"])] == "Новинка"
    again = app_client.http.post(f"/integrations/{amo}/products/sync", headers=admin_headers()).json_body
    assert again == {"products": 301, "added": 0}


@pytest.mark.parametrize("entry, status, text", [
    ({"crm_field": "1", "entity": "contact", "name": "bad name", "type": "text"}, 400, "Latin letters, digits"),
    ({"crm_field": "1", "entity": "contact", "name": "vip", "type": "boolean"}, 400, "no boolean"),
    ({"crm_field": "1", "entity": "deal", "name": "vip", "type": "text"}, 400, "Must be one of"),
    ({"crm_field": "", "entity": "order", "name": "vip", "type": "text"}, 400, "crm_field"),
    ({"crm_field": "1", "entity": "contact", "name": "emails", "type": "email"}, 409, "system attribute"),
])
def test_invalid_mappings_are_refused_and_nothing_is_stored(app_client, amo, metrika_sandbox, entry, status, text):
    response = put_attributes(app_client, amo, [entry])
    assert response.status_code == status
    assert text in json.dumps(response.json_body, ensure_ascii=False)
    assert app_client.http.get(f"/integrations/{amo}/attributes", headers=admin_headers()).json_body["entries"] == []
    assert metrika_sandbox.counter(AMO_COUNTER).custom_attributes["CONTACT"] == {}


def test_existing_attribute_of_another_type_is_a_conflict_and_same_type_is_reused(app_client, amo, metrika_sandbox):
    assert put_attributes(app_client, amo, AMO_ATTRIBUTES[:1]).status_code == 200
    again = put_attributes(app_client, amo, AMO_ATTRIBUTES[:1] + AMO_ATTRIBUTES[1:2])
    assert again.status_code == 200 and again.json_body["created_in_metrika"] == ["order:budget"]
    clash = put_attributes(app_client, amo, [{**AMO_ATTRIBUTES[0], "type": "numeric"}])
    assert clash.status_code == 409
    assert "already exists" in clash.json_body["details"]["attributes"]["customer_tier"]
    duplicate = put_attributes(app_client, amo, AMO_ATTRIBUTES[:1] * 2)
    assert duplicate.status_code == 400 and "mapped twice" in json.dumps(duplicate.json_body)
    assert app_client.http.put(f"/integrations/{amo}/attributes", body="{}").status_code == 401


@pytest.mark.parametrize("type_name, value, expected", [
    ("numeric", "1 500,50", "1500.5"), ("numeric", 42, "42"), ("numeric", True, "1"),
    ("date", 1759357800, "2025-10-02"), ("date", "01.10.2026", "2026-10-01"),
    ("date", "2026-10-01T23:30:00+00:00", "2026-10-02"),
    ("datetime", "2026-01-05T10:00:00+03:00", "2026-01-05 10:00:00"), ("email", " Ivan@Example.COM ", "ivan@example.com"),
    ("text", False, "false"),
])
def test_attribute_values_are_coerced(type_name, value, expected):
    now = datetime(2026, 11, 1, 12, 0)
    assert coerce_attribute_value(type_name, value, resolve_time_zone("Europe/Moscow"), now) == expected


@pytest.mark.parametrize("type_name, value, reason", [
    ("numeric", "abc", "not a number"), ("numeric", "NaN", "finite"), ("date", "1969-12-31", "1970"),
    ("datetime", "2030-01-01 00:00:00", "future"), ("email", "no-at-sign", "e-mail"), ("date", "soon", "not a date"),
])
def test_bad_attribute_values_say_why(type_name, value, reason):
    with pytest.raises(ValueError, match=reason):
        coerce_attribute_value(type_name, value, resolve_time_zone("UTC"), datetime(2026, 11, 1))


def test_csv_rows_quote_cells_and_list_items():
    text, columns = cdp.rows_to_csv("orders", [
        {"id": "1", "client_uniq_id": "c;1", "order_status": "PAID", "products": {"a": 2, "b": 1.5},
         "attribute_values": {"tags": ["x", "y"]}},
        {"id": "2", "client_uniq_id": "c2", "order_status": "PAID"}])
    assert columns == ["id", "client_uniq_id", "order_status", "products", "tags"]
    assert text.splitlines() == ["id;client_uniq_id;order_status;products;tags", '1;"c;1";PAID;a:2,b:1.5;x,y',
                                 "2;c2;PAID;;"]
    request = cdp.upload_csv(5, "orders", [{"id": "1"}], "SAVE")
    assert request.params["columns_mapping"] == '"id":"id"' and request.params["delimiter_type"] == "SEMICOLON"


def test_product_ids_are_normalised_for_the_list():
    assert normalize_product_id("SKU 12/ä.b") == "SKU_12___b"
    assert normalize_product_id(" ") == "_" and len(normalize_product_id("x" * 300)) == 255
