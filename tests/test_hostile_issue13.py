"""Hostile inputs on the surfaces issue 13 added: CRM base URLs that pass as URLs but are no base a
path can be appended to, and status mappings too large to be kept after Metrika took them. Each case
was accepted (or answered 500) before this sweep; each is now a 400 naming the field, with nothing
pushed and nothing stored."""
from __future__ import annotations

import json

import pytest
from marshmallow import ValidationError

from chalicelib.integrations import CONNECTION_SCHEMAS
from chalicelib.status_mapping import MAX_MAPPING_BYTES, StatusMapping
from tests.conftest import AMO_SECRET, AMO_TOKEN, B24_APP_TOKEN, admin_headers, amocrm_config


def amo_connection(base_url: str) -> dict:
    return {"base_url": base_url, "access_token": AMO_TOKEN, "webhook_secret": AMO_SECRET}


# --- CRM base URLs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "https://shop.amocrm.ru?",    # was stored: every call went to https://shop.amocrm.ru/?/api/v4/...
    "https://shop.amocrm.ru#",    # was stored: every call went to https://shop.amocrm.ru/ (the path a fragment)
    "https://shop.amocrm.ru/?#",
    "https://shop.amocrm.ru:0",   # was stored, though the message says 1-65535
    "https://shop.amocrm.ru:",    # an empty port
])
def test_a_base_url_that_is_no_base_is_refused_naming_it(url):
    with pytest.raises(ValidationError) as error:
        CONNECTION_SCHEMAS["amocrm"]().load(amo_connection(url))
    assert list(error.value.messages) == ["base_url"]


@pytest.mark.parametrize("url", ["https://portal.bitrix24.ru/rest/1/abcdef0123456789/?",
                                 "https://portal.bitrix24.ru/rest/1/abcdef0123456789#",
                                 "https://portal.bitrix24.ru:0/rest/1/abcdef0123456789/"])
def test_a_bitrix24_webhook_url_that_is_no_base_is_refused_naming_it(url):
    with pytest.raises(ValidationError) as error:
        CONNECTION_SCHEMAS["bitrix24"]().load({"webhook_url": url, "application_token": B24_APP_TOKEN})
    assert list(error.value.messages) == ["webhook_url"]


@pytest.mark.parametrize("url", ["https://shop.amocrm.ru", "https://shop.amocrm.ru/", "https://shop.amocrm.ru:443",
                                 "HTTPS://SHOP.AMOCRM.RU", "https://xn--80aswg.amocrm.ru"])
def test_base_urls_people_write_still_pass(url):
    assert CONNECTION_SCHEMAS["amocrm"]().load(amo_connection(url))["base_url"] == url


# --- status mappings ---------------------------------------------------------------------------------

def entries(count: int, *, label: str = "", prefix: str = "s", **extra) -> list[dict]:
    return [{"crm_status": f"{7000 + i}:{1000 + i}", "metrika_status_id": f"{prefix}_{i}", "type": "IN_PROGRESS",
             **({"humanized": label} if label else {}), **extra} for i in range(count)]


def test_a_mapping_too_large_to_keep_is_refused_naming_entries():
    with pytest.raises(ValidationError) as error:
        StatusMapping().load({"entries": entries(1000, label="h" * 4096)})  # ~4 MB: was a 500 after the push
    assert "entries" in error.value.messages and f"{MAX_MAPPING_BYTES:,}" in str(error.value.messages["entries"])


def test_a_goal_id_of_100_kb_is_refused_naming_it():
    with pytest.raises(ValidationError) as error:
        StatusMapping().load({"entries": entries(1, goal_action_ids=["x" * 100_000])})
    assert error.value.messages == {"entries": {0: {"goal_action_ids": {0: ["Length must be between 1 and 255."]}}}}


def put_mapping(client, integration_id, body):
    return client.http.put(f"/integrations/{integration_id}/status-mapping", headers=admin_headers(),
                           body=json.dumps(body))


def test_a_mapping_too_large_to_keep_is_a_400_before_anything_is_pushed(app_client, integration_id, metrika_sandbox):
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(amocrm_config(timezone="UTC"))).status_code == 200
    kept = put_mapping(app_client, integration_id, {"entries": entries(2)})
    assert kept.status_code == 200
    metrika_sandbox.requests.clear()
    before = dict(metrika_sandbox.counter(4242).order_statuses)
    for body in ({"entries": entries(1000, label="h" * 4096)},
                 {"entries": entries(1, goal_action_ids=["x" * 100_000] * 10)}):
        refused = put_mapping(app_client, integration_id, body)  # both were a 500, with Metrika's list replaced
        assert refused.status_code == 400 and "entries" in refused.json_body["details"], refused.json_body
    assert metrika_sandbox.requests == [] and metrika_sandbox.counter(4242).order_statuses == before
    shown = app_client.http.get(f"/integrations/{integration_id}/status-mapping", headers=admin_headers())
    assert shown.json_body["entries"] == kept.json_body["entries"]


def test_the_largest_mapping_allowed_is_kept(app_client, integration_id, metrika_sandbox):
    """The byte limit is below what DynamoDB (moto enforces its 400 KB) takes for one item."""
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(amocrm_config(timezone="UTC"))).status_code == 200
    body = {"entries": entries(37, label="Этап " + "я" * 4091)}  # the longest labels, in Cyrillic (2 bytes a letter)
    assert MAX_MAPPING_BYTES - 10_000 < len(json.dumps(body["entries"], ensure_ascii=False).encode()) <= MAX_MAPPING_BYTES
    assert put_mapping(app_client, integration_id, body).status_code == 200
    shown = app_client.http.get(f"/integrations/{integration_id}/status-mapping", headers=admin_headers())
    assert shown.json_body["entries"] == body["entries"]


def test_an_attribute_mapping_too_large_to_keep_is_a_400_before_metrika_creates_anything(
        app_client, integration_id, metrika_sandbox):
    """Metrika's API cannot delete an attribute: one created for a mapping the store then refused
    (100 entries with 4,096-character labels, ~450 KB: a 500) would stay on the counter for good."""
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(amocrm_config(timezone="UTC"))).status_code == 200
    metrika_sandbox.requests.clear()
    attributes = [{"crm_field": f"{752000 + i}", "entity": "contact", "name": f"field_{i}", "type": "text",
                   "humanized": "h" * 4096} for i in range(100)]
    refused = app_client.http.put(f"/integrations/{integration_id}/attributes", headers=admin_headers(),
                                  body=json.dumps({"entries": attributes}))
    assert refused.status_code == 400 and "entries" in refused.json_body["details"], refused.json_body
    assert metrika_sandbox.requests == [] and metrika_sandbox.counter(4242).custom_attributes["CONTACT"] == {}
