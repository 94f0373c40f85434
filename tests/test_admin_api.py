"""Integrations admin API through the Chalice app in-process, against moto_server and the Metrika
sandbox over loopback HTTP."""
import json

import pytest

from tests.conftest import (
    ADMIN_TOKEN, AMO_SECRET, AMO_TOKEN, B24_APP_TOKEN, B24_WEBHOOK_URL, METRIKA_TOKEN, SECRETS, admin_headers,
    amocrm_config, bitrix24_config,
)


def put(client, integration_id, body, headers=None):
    return client.http.put(f"/integrations/{integration_id}", headers=headers or admin_headers(),
                           body=json.dumps(body))


def test_health_needs_no_token(app_client):
    assert app_client.http.get("/health").json_body == {"status": "ok"}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_missing_admin_token_is_401(app_client, integration_id, method):
    response = app_client.http.request(method, f"/integrations/{integration_id}", body=b"{}",
                                       headers={"Content-Type": "application/json"})
    assert response.status_code == 401


@pytest.mark.parametrize("header", ["Bearer wrong-token", f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN, "Bearer "])
def test_wrong_admin_token_is_403(app_client, integration_id, header):
    response = app_client.http.get(f"/integrations/{integration_id}", headers={"Authorization": header})
    assert response.status_code == 403


def test_create_read_delete_amocrm_integration(app_client, integration_id, metrika_sandbox):
    metrika_sandbox.add_counter(4242, "Asia/Novosibirsk")
    created = put(app_client, integration_id, amocrm_config())
    assert created.status_code == 200
    assert created.json_body["timezone"] == "Asia/Novosibirsk"  # read from the counter
    assert created.json_body["timezone_source"] == "counter"
    assert created.json_body["client_id_field"] == "_YM_UID"
    read = app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers())
    assert read.json_body["connection"]["base_url"] == "https://shop.amocrm.ru"
    assert app_client.http.delete(f"/integrations/{integration_id}", headers=admin_headers()).status_code == 200
    gone = app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers())
    assert gone.status_code == 404 and gone.json_body["error"] == "not_found"
    assert app_client.http.delete(f"/integrations/{integration_id}", headers=admin_headers()).status_code == 404


def test_explicit_timezone_is_kept_without_asking_metrika(app_client, integration_id, metrika_sandbox):
    created = put(app_client, integration_id, bitrix24_config(timezone="UTC", hash_pii=True))
    assert created.status_code == 200
    assert created.json_body["timezone"] == "UTC" and created.json_body["hash_pii"] is True
    assert metrika_sandbox.requests == []


def test_secrets_are_masked_on_get_and_absent_from_logs(app_client, integration_id, captured_logs):
    put(app_client, integration_id, amocrm_config())
    put(app_client, integration_id + "b", bitrix24_config(timezone="UTC"))
    for iid in (integration_id, integration_id + "b"):
        body = app_client.http.get(f"/integrations/{iid}", headers=admin_headers()).body.decode()
        assert not any(secret in body for secret in SECRETS)
        assert "********" in body
    assert captured_logs.records, "the admin path logs its events"
    assert not any(secret in captured_logs.text for secret in SECRETS)


def test_secrets_left_out_or_masked_keep_their_stored_values(app_client, integration_id, metrika_sandbox):
    put(app_client, integration_id, amocrm_config())
    shown = app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).json_body
    shown["counter_id"] = 777
    shown["connection"].pop("access_token")
    assert shown["timezone_source"] == "counter"  # read-only, sent back as GET showed it
    assert put(app_client, integration_id, shown).status_code == 200
    from app import get_store
    stored = get_store().get_integration(integration_id)
    assert stored["counter_id"] == 777 and stored["timezone_source"] == "counter"
    assert metrika_sandbox.requests[-1]["path"].endswith("/counter/777")  # the new counter's time zone was read
    refused = put(app_client, integration_id, {**shown, "timezone_source": "mine"})
    assert refused.status_code == 400 and "timezone_source" in refused.json_body["details"]
    assert stored["metrika_token"] == METRIKA_TOKEN
    assert stored["connection"]["access_token"] == AMO_TOKEN and stored["connection"]["webhook_secret"] == AMO_SECRET


def test_secrets_are_not_carried_over_to_another_crm(app_client, integration_id):
    put(app_client, integration_id, amocrm_config())
    response = put(app_client, integration_id, {"crm": "bitrix24", "counter_id": 1, "timezone": "UTC",
                                                "connection": {"webhook_url": B24_WEBHOOK_URL}})
    assert response.status_code == 400
    assert "application_token" in response.json_body["details"]["connection"]


@pytest.mark.parametrize("change, field", [
    ({"crm": "salesforce"}, "crm"),
    ({"counter_id": "12345"}, "counter_id"),
    ({"counter_id": 0}, "counter_id"),
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"hash_pii": "maybe"}, "hash_pii"),
    ({"metrika_token": ""}, "metrika_token"),
    ({"unexpected": 1}, "unexpected"),
])
def test_each_bad_field_gets_a_clear_400(app_client, integration_id, change, field):
    response = put(app_client, integration_id, amocrm_config(**change))
    assert response.status_code == 400
    assert response.json_body["error"] == "invalid_request"
    assert field in response.json_body["details"]
    assert app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).status_code == 404


@pytest.mark.parametrize("connection, field", [
    ({"base_url": "http://shop.amocrm.ru"}, "base_url"),
    ({"webhook_secret": "short"}, "webhook_secret"),
    ({"account_id": "abc"}, "account_id"),
    ({"access_token": None}, "access_token"),
])
def test_bad_amocrm_connection_fields(app_client, integration_id, connection, field):
    config = amocrm_config(timezone="UTC")
    config["connection"] = {**config["connection"], **connection}
    response = put(app_client, integration_id, config)
    assert response.status_code == 400
    assert field in response.json_body["details"]["connection"]


def test_bad_bitrix24_webhook_url(app_client, integration_id):
    config = bitrix24_config(timezone="UTC")
    config["connection"]["webhook_url"] = "https://portal.bitrix24.ru/crm/deal/"
    response = put(app_client, integration_id, config)
    assert "webhook_url" in response.json_body["details"]["connection"]
    assert B24_APP_TOKEN not in response.body.decode()


def test_malformed_bodies_and_ids(app_client, integration_id):
    response = app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(), body=b"{not json")
    assert response.status_code == 400
    assert put(app_client, integration_id, ["a", "list"]).status_code == 400
    assert put(app_client, "bad%20id", amocrm_config()).status_code == 400


def test_metrika_refusing_the_token_stores_nothing(app_client, integration_id, metrika_sandbox):
    metrika_sandbox.tokens = {"someone-else": None}
    try:
        response = put(app_client, integration_id, amocrm_config())
    finally:
        metrika_sandbox.tokens = None
    assert response.status_code == 422
    assert response.json_body["error"] == "metrika_refused"
    assert "Invalid oauth_token" in response.json_body["message"]
    assert app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).status_code == 404


def _nested(levels):
    node = {}
    for _ in range(levels):
        node = {"x": node}
    return node


@pytest.mark.parametrize("change, field", [
    ({"connection": "abc"}, "connection"),  # once a 503: the secret carry-over did dict("abc")
    ({"connection": []}, "connection"),
    ({"connection": _nested(20)}, "connection"),
    ({"hash_pii": "false"}, "hash_pii"),  # once stored as the truthy string "false"
    ({"counter_id": True}, "counter_id"),
    ({"currency": "RUB\n"}, "currency"),
])
def test_hostile_config_fields_are_a_400_naming_the_field(app_client, integration_id, change, field):
    response = put(app_client, integration_id, amocrm_config(timezone="UTC", **change))
    assert response.status_code == 400 and response.json_body["error"] == "invalid_request"
    assert field in response.json_body["details"]
    assert app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).status_code == 404


def test_a_1_mb_base_url_is_a_400_not_a_dynamodb_error(app_client, integration_id):
    config = amocrm_config(timezone="UTC")
    config["connection"]["base_url"] = "https://" + "a" * 1_000_000 + ".ru"
    response = put(app_client, integration_id, config)
    assert response.status_code == 400
    assert "base_url" in response.json_body["details"]["connection"]
    assert len(response.body) < 2000


def test_a_body_nested_1000_deep_is_a_400(app_client, integration_id):
    response = app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                                   body=b'{"connection":' * 1000 + b"{}" + b"}" * 1000)
    assert response.status_code == 400


def test_the_stored_config_holds_validated_values(app_client, integration_id):
    assert put(app_client, integration_id, amocrm_config(timezone="UTC", hash_pii=False)).status_code == 200
    from app import get_store
    stored = get_store().get_integration(integration_id)
    assert stored["hash_pii"] is False and stored["counter_id"] == 4242


@pytest.mark.parametrize("since", [True, False, -1, 1.5, "123", 2**60, [], {"x": 1}])
def test_reconcile_since_must_be_unix_seconds(app_client, integration_id, since):
    assert put(app_client, integration_id, amocrm_config(timezone="UTC")).status_code == 200
    response = app_client.http.post(f"/integrations/{integration_id}/reconcile", headers=admin_headers(),
                                    body=json.dumps({"since": since}))
    assert response.status_code == 400 and response.json_body["error"] == "invalid_request"
    assert "since" in response.json_body["details"] and "since" in response.json_body["message"]


def test_a_masked_token_does_not_follow_a_new_base_url(app_client, integration_id, amocrm):
    """The stored amoCRM token is never sent to another host: moving base_url needs the token again."""
    assert put(app_client, integration_id, amocrm_config(timezone="UTC")).status_code == 200
    shown = app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).json_body
    shown["connection"]["base_url"] = amocrm.url  # a host this test controls, where a leaked token would show
    response = put(app_client, integration_id, shown)
    assert response.status_code == 400
    assert {"connection.access_token", "connection.webhook_secret"} <= set(response.json_body["details"])
    assert AMO_TOKEN not in response.body.decode()
    from app import get_store
    assert get_store().get_integration(integration_id)["connection"]["base_url"] == "https://shop.amocrm.ru"
    shown["connection"].update(access_token=amocrm.token, webhook_secret=AMO_SECRET)
    assert put(app_client, integration_id, shown).status_code == 200


def test_a_deployment_without_the_loopback_leave_refuses_loopback_crm_urls(app_client, integration_id, amocrm,
                                                                           monkeypatch):
    from chalicelib.settings import get_settings
    monkeypatch.setenv("ALLOW_LOOPBACK_CRM", "0")
    get_settings.cache_clear()
    try:
        config = amocrm_config(timezone="UTC")
        config["connection"]["base_url"] = amocrm.url
        refused = put(app_client, integration_id, config)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert refused.status_code == 400 and "base_url" in refused.json_body["details"]["connection"]
    assert put(app_client, integration_id, config).status_code == 200  # the tests' deployment allows it


def test_a_second_integration_on_a_counter_gets_an_id_prefix_that_get_put_keeps(app_client, integration_id):
    counter = 100_000 + int(integration_id[-5:], 16)  # a counter no other test uses
    second = integration_id + "-b24"
    try:
        first = put(app_client, integration_id, amocrm_config(counter_id=counter, timezone="UTC"))
        assert first.status_code == 200 and "id_prefix" not in first.json_body
        created = put(app_client, second, bitrix24_config(counter_id=counter, timezone="UTC"))
        assert created.status_code == 200 and created.json_body["id_prefix"] == second + ":"
        shown = app_client.http.get(f"/integrations/{second}", headers=admin_headers()).json_body
        assert put(app_client, second, shown).json_body["id_prefix"] == second + ":"
        refused = put(app_client, second, {**shown, "id_prefix": "mine:"})
        assert refused.status_code == 400 and "id_prefix" in refused.json_body["details"]
    finally:
        app_client.http.delete(f"/integrations/{second}", headers=admin_headers())


def test_the_confirm_route(app_client, integration_id, metrika_sandbox):
    assert app_client.http.post(f"/integrations/{integration_id}/confirm", headers=admin_headers()).status_code == 404
    assert put(app_client, integration_id, amocrm_config(timezone="UTC")).status_code == 200
    wrong = app_client.http.post(f"/integrations/{integration_id}/confirm", headers=admin_headers(), body=b"[1]")
    assert wrong.status_code == 400
    assert app_client.http.post(f"/integrations/{integration_id}/confirm").status_code == 401
    answer = app_client.http.post(f"/integrations/{integration_id}/confirm", headers=admin_headers(), body=b"{}")
    assert answer.status_code == 200
    assert answer.json_body == {"checked": 0, "passed": 0, "failed": 0, "resent": 0, "unconfirmed": 0, "pages": 0,
                                "unconfirmed_over_6h": 0, "oldest_unconfirmed": None}
    assert metrika_sandbox.requests == []  # nothing waits: Metrika is not asked
