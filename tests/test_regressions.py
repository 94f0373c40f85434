"""Defects found by the outside sweep, reproduced through the app's public interface only (webhook and
admin routes, the SQS handler, moto_server, the sandboxes), so each test also runs against older
revisions — where it fails. Finer-grained versions live in test_delivery_core.py, test_adapters.py
and test_hostile_inputs.py."""
import json
from urllib.parse import urlencode

import pytest

from tests.conftest import B24_APP_TOKEN, admin_headers, bitrix24_config

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SECRET = "regression-amocrm-secret-0123456789"
COUNTER = 6161
CLIENT_ID = "1717171717123456789"


@pytest.fixture
def amo(app_client, integration_id, amocrm, queue):
    import app
    app._SOURCES.clear()  # the real amoCRM source
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
    config = {"crm": "amocrm", "counter_id": COUNTER, "metrika_token": "y0_regressions", "timezone": "Europe/Moscow",
              "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "account_id": str(amocrm.account_id),
                             "webhook_secret": SECRET}}
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(config)).status_code == 200
    assert app_client.http.post(f"/integrations/{integration_id}/status-mapping/defaults",
                                headers=admin_headers()).status_code == 200
    return integration_id


def post(client, integration_id, body):
    return client.http.post(f"/webhooks/amocrm/{integration_id}?secret={SECRET}", headers=FORM, body=body)


def lead_body(amocrm, *items):
    pairs = [("account[id]", str(amocrm.account_id)), ("account[subdomain]", "shop")]
    for index, (lead_id, updated_at) in enumerate(items):
        pairs += [(f"leads[update][{index}][id]", str(lead_id)), (f"leads[update][{index}][updated_at]", str(updated_at))]
    return urlencode(pairs).encode()


def test_1_a_new_deal_and_its_contact_in_one_batch_keep_the_client_id(app_client, amo, amocrm, worker,
                                                                       metrika_sandbox):
    contact = amocrm.create_contact("Иван Петров", phones=["+7 916 123-45-67"], notify=True)
    lead = amocrm.create_lead("Заказ", 7001, 1001, price=100, contacts=[contact["id"]], client_id=CLIENT_ID, notify=True)
    fired = dict(amocrm.outbox)
    amocrm.outbox.clear()
    # The lead's webhook first, the contact's second: both wait in the queue for one worker batch.
    for event in ("add_lead", "add_contact"):
        assert post(app_client, amo, fired[event]).status_code == 200
    worker.drain()
    counter = metrika_sandbox.counter(COUNTER)
    assert str(lead["id"]) in counter.orders
    assert counter.contacts[str(contact["id"])]["client_ids"] == [CLIENT_ID]


def test_2_a_bad_second_entity_records_nothing_and_leaves_nothing_stuck(app_client, amo, amocrm, worker,
                                                                         metrika_sandbox):
    lead = amocrm.create_lead("Заказ", 7001, 1001, price=100, notify=False)
    refused = post(app_client, amo, lead_body(amocrm, (lead["id"], lead["updated_at"]), ("9" * 2000, lead["updated_at"])))
    assert refused.status_code == 400 and "id" in refused.json_body["message"]
    assert post(app_client, amo, lead_body(amocrm, (lead["id"], lead["updated_at"]))).json_body["queued"] == 1
    worker.drain()
    assert str(lead["id"]) in metrika_sandbox.counter(COUNTER).orders


def test_3_a_future_timestamp_does_not_freeze_the_deal(app_client, amo, amocrm, worker, metrika_sandbox):
    lead = amocrm.create_lead("Заказ", 7001, 1001, price=100, notify=False)
    assert post(app_client, amo, lead_body(amocrm, (lead["id"], 4102444800))).status_code == 200  # year 2100
    worker.drain()
    amocrm.update_lead(lead["id"], status_id=142, notify=False)
    changed = amocrm.leads[lead["id"]]
    assert post(app_client, amo, lead_body(amocrm, (lead["id"], changed["updated_at"] + 1))).status_code == 200
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(lead["id"])]["order_status"] == "won"


@pytest.mark.parametrize("body, field", [
    ([("leads[update][0][id]", "5"), ("leads[update][0][updated_at]", "1" + "0" * 40)], "updated_at"),
    ([("leads[update][0][id]", "5"), ("leads[update][0][updated_at]", "²")], "updated_at"),
    ([("leads[update][0][id]", "5" * 2000), ("leads[update][0][updated_at]", "1790000000")], "id"),
])
def test_7_bad_webhook_input_is_a_400_naming_the_field(app_client, amo, amocrm, body, field):
    answer = post(app_client, amo, urlencode([("account[id]", str(amocrm.account_id)), *body]).encode())
    assert answer.status_code == 400 and field in answer.json_body["message"]


def test_7_deeply_nested_json_and_a_string_connection_are_400s(app_client, integration_id):
    deep = "[" * 1000 + "]" * 1000
    answer = app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                                 body=json.dumps({"crm": "amocrm", "counter_id": 1, "metrika_token": "x",
                                                  "connection": "abc"}))
    assert answer.status_code == 400 and "connection" in json.dumps(answer.json_body)
    answer = app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(), body=deep)
    assert answer.status_code == 400


def test_7_bitrix24_ts_that_is_not_ascii_digits_is_a_400(app_client, integration_id):
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(bitrix24_config(timezone="UTC"))).status_code == 200
    body = urlencode({"event": "ONCRMDEALUPDATE", "data[FIELDS][ID]": "1", "ts": "²",
                      "auth[application_token]": B24_APP_TOKEN}).encode()
    answer = app_client.http.post(f"/webhooks/bitrix24/{integration_id}", headers=FORM, body=body)
    assert answer.status_code == 400 and "ts" in answer.json_body["message"]


def test_8_bitrix24_event_without_an_application_token_is_401(app_client, integration_id):
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(bitrix24_config(timezone="UTC"))).status_code == 200
    body = urlencode({"event": "ONCRMDEALUPDATE", "data[FIELDS][ID]": "1", "ts": "1790000000"}).encode()
    answer = app_client.http.post(f"/webhooks/bitrix24/{integration_id}", headers=FORM, body=body)
    assert answer.status_code == 401


def test_sweep_json_nan_lone_surrogates_and_long_echoes_are_clean_400s(app_client, amo):
    raw = b'{"since": NaN}'
    answer = app_client.http.post(f"/integrations/{amo}/reconcile", headers=admin_headers(), body=raw)
    assert answer.status_code == 400 and json.loads(answer.body)  # valid JSON out
    body = json.dumps({"entries": [{"crm_status": "7001:142", "metrika_status_id": "won", "type": "PAID",
                                    "humanized": "\ud800"}]})
    answer = app_client.http.put(f"/integrations/{amo}/status-mapping", headers=admin_headers(), body=body)
    assert answer.status_code == 400
    answer = app_client.http.post(f"/integrations/{amo}/replay", headers=admin_headers(),
                                  body=json.dumps({"kind": "x" * 1_000_000, "crm_id": "5"}))
    assert answer.status_code == 400 and len(answer.body) < 2000
    answer = app_client.http.get("/integrations/" + "a" * 3000, headers=admin_headers())
    assert answer.status_code == 400 and "integration_id" in answer.json_body["details"]


def test_sweep_lenient_booleans_and_unusable_urls_are_refused(app_client, amo, amocrm):
    answer = app_client.http.post(f"/integrations/{amo}/backfill", headers=admin_headers(),
                                  body=json.dumps({"since": "2026-11-01", "restart": "false"}))
    assert answer.status_code == 400 and "restart" in answer.json_body["message"]
    answer = app_client.http.put(f"/integrations/{amo}/attributes", headers=admin_headers(), body=json.dumps(
        {"entries": [{"crm_field": "UTM", "entity": "order", "name": "utm", "type": "text", "multivalued": "false"}]}))
    assert answer.status_code == 400 and "multivalued" in json.dumps(answer.json_body)
    for url in ("https://shop.amocrm.ru:99999", "https://%00", "https://exa mple.ru"):
        config = {"crm": "amocrm", "counter_id": COUNTER, "metrika_token": "y0_regressions", "timezone": "UTC",
                  "connection": {"base_url": url, "access_token": "t", "webhook_secret": SECRET}}
        answer = app_client.http.put(f"/integrations/{amo}", headers=admin_headers(), body=json.dumps(config))
        assert answer.status_code == 400 and "base_url" in json.dumps(answer.json_body), url
