"""Status mapping: validation, push to the Metrika sandbox, Metrika refusing, GET after PUT.

The rules (`chalicelib.status_mapping`) and the admin operations (`chalicelib.mapping_admin`) are also
tested directly, without the app, against an in-memory store and a fake Metrika client.
"""
import json

import pytest

from chalicelib.errors import ApiError, Misconfigured, Permanent, Transient
from chalicelib.mapping_admin import read_mapping, replace_mapping
from chalicelib.status_mapping import merge_defaults, status_for, to_order_statuses
from tests.conftest import admin_headers, amocrm_config

MAPPING = {"entries": [
    {"crm_status": "7001:142", "metrika_status_id": "won", "humanized": "Успешно реализовано", "type": "PAID"},
    {"crm_status": "7001:143", "metrika_status_id": "lost", "humanized": "Закрыто и не реализовано", "type": "CANCELLED"},
    {"crm_status": "7001:1001", "metrika_status_id": "in_work", "humanized": "В работе", "type": "IN_PROGRESS"},
    {"crm_status": "7002:2001", "metrika_status_id": "in_work", "humanized": "В работе", "type": "IN_PROGRESS"},
    {"crm_status": "7001:1002", "metrika_status_id": "junk", "type": "SPAM", "goal_action_ids": ["spam_lead"]},
]}


@pytest.fixture
def integration(app_client, integration_id):
    response = app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                                   body=json.dumps(amocrm_config(timezone="Europe/Moscow")))
    assert response.status_code == 200
    return integration_id


def put_mapping(client, integration_id, body):
    return client.http.put(f"/integrations/{integration_id}/status-mapping", headers=admin_headers(),
                           body=json.dumps(body))


def get_mapping(client, integration_id):
    return client.http.get(f"/integrations/{integration_id}/status-mapping", headers=admin_headers())


def test_put_pushes_the_full_list_and_get_shows_it(app_client, integration, metrika_sandbox):
    assert get_mapping(app_client, integration).json_body == {"integration_id": integration, "entries": [],
                                                              "pushed_at": None}
    response = put_mapping(app_client, integration, MAPPING)
    assert response.status_code == 200
    pushed = metrika_sandbox.counter(4242).order_statuses
    assert list(pushed) == ["won", "lost", "in_work", "junk"]  # one entry per Metrika id
    assert pushed["won"] == {"id": "won", "type": "PAID", "humanized": "Успешно реализовано"}
    assert pushed["junk"] == {"id": "junk", "type": "SPAM", "humanized": "junk", "goal_action_ids": ["spam_lead"]}
    shown = get_mapping(app_client, integration).json_body
    assert shown["entries"] == MAPPING["entries"] and shown["pushed_at"] == response.json_body["pushed_at"]


@pytest.mark.parametrize("entry, field", [
    ({"type": "CANCELED"}, "type"),
    ({"type": "DONE"}, "type"),
    ({"metrika_status_id": "в работе"}, "metrika_status_id"),
    ({"metrika_status_id": "x" * 256}, "metrika_status_id"),
    ({"crm_status": ""}, "crm_status"),
    ({"colour": "red"}, "colour"),
])
def test_invalid_entries_get_a_400_naming_the_field(app_client, integration, metrika_sandbox, entry, field):
    body = {"entries": [{**MAPPING["entries"][0], **entry}]}
    response = put_mapping(app_client, integration, body)
    assert response.status_code == 400
    assert field in response.json_body["details"]["entries"]["0"]
    assert metrika_sandbox.requests == []  # nothing pushed


def test_cancelled_misspelling_says_what_to_send(app_client, integration):
    body = {"entries": [{**MAPPING["entries"][1], "type": "CANCELED"}]}
    message = put_mapping(app_client, integration, body).json_body["details"]["entries"]["0"]["type"][0]
    assert "use CANCELLED" in message


def test_crm_status_mapped_twice_or_conflicting_ids_are_refused(app_client, integration):
    twice = {"entries": [MAPPING["entries"][0], {**MAPPING["entries"][1], "crm_status": "7001:142"}]}
    assert "mapped twice" in json.dumps(put_mapping(app_client, integration, twice).json_body)
    conflict = {"entries": [MAPPING["entries"][0], {**MAPPING["entries"][1], "metrika_status_id": "won"}]}
    assert "different type" in json.dumps(put_mapping(app_client, integration, conflict).json_body)
    assert put_mapping(app_client, integration, {"entries": []}).status_code == 400
    assert put_mapping(app_client, integration, "text").status_code == 400


def test_metrika_refusing_keeps_the_stored_mapping(app_client, integration, metrika_sandbox):
    assert put_mapping(app_client, integration, MAPPING).status_code == 200
    before = get_mapping(app_client, integration).json_body
    metrika_sandbox.set_faults(error_503=1.0)
    response = put_mapping(app_client, integration, {"entries": [MAPPING["entries"][0]]})
    assert response.status_code == 502
    assert response.json_body["error"] == "metrika_unavailable" and "503" in response.json_body["message"]
    metrika_sandbox.set_faults()
    metrika_sandbox.tokens = {"another-token": None}
    try:
        refused = put_mapping(app_client, integration, {"entries": [MAPPING["entries"][0]]})
    finally:
        metrika_sandbox.tokens = None
    assert refused.status_code == 422 and "Invalid oauth_token" in refused.json_body["message"]
    assert get_mapping(app_client, integration).json_body == before


def test_unknown_integration_is_404(app_client, integration_id):
    assert get_mapping(app_client, integration_id).status_code == 404
    assert put_mapping(app_client, integration_id, MAPPING).status_code == 404


def test_mapping_needs_the_admin_token(app_client, integration):
    response = app_client.http.get(f"/integrations/{integration}/status-mapping",
                                   headers={"Authorization": "Bearer nope"})
    assert response.status_code == 403


def test_lookup_never_guesses():
    assert status_for(MAPPING["entries"], "7002:2001") == "in_work"
    assert status_for(MAPPING["entries"], "7002:142") is None
    assert [s["id"] for s in to_order_statuses(MAPPING["entries"])] == ["won", "lost", "in_work", "junk"]


def test_defaults_fill_only_unmapped_stages():
    current = [MAPPING["entries"][0]]
    proposed = [{**MAPPING["entries"][0], "metrika_status_id": "other"}, MAPPING["entries"][1]]
    assert merge_defaults(current, proposed) == [MAPPING["entries"][0], MAPPING["entries"][1]]


# --- mapping_admin without the app ------------------------------------------------------------------

class MemoryStore:
    def __init__(self, integrations):
        self.integrations, self.mappings = integrations, {}

    def get_integration(self, integration_id):
        return self.integrations.get(integration_id)

    def get_status_mapping(self, integration_id):
        return self.mappings.get(integration_id)

    def put_status_mapping(self, integration_id, entries, pushed_at):
        self.mappings[integration_id] = {"entries": entries, "pushed_at": pushed_at}

    def integrations_on_counter(self, counter_id):
        return sorted(i for i, config in self.integrations.items() if config["counter_id"] == counter_id)

    def acquire_lease(self, scope, slots, owner, now, ttl):  # a push holds the counter's (shared_counter)
        return 0

    def release_lease(self, scope, slot, owner):
        pass


class FakeMetrika:
    def __init__(self, error=None):
        self.error, self.pushed = error, []

    def save_order_statuses(self, counter_id, statuses):
        if self.error:
            raise self.error
        self.pushed.append((counter_id, statuses))


def admin_case(error=None):
    store = MemoryStore({"shop": {"crm": "amocrm", "counter_id": 4242}})
    metrika = FakeMetrika(error)
    return store, metrika, (lambda integration: metrika)


def test_admin_replace_pushes_stores_and_requeues():
    store, metrika, metrika_for = admin_case()
    requeued = []
    result = replace_mapping(store, "shop", MAPPING, metrika_for,
                             lambda integration_id, entries: requeued.append(integration_id) or 3)
    assert [s["id"] for s in metrika.pushed[0][1]] == ["won", "lost", "in_work", "junk"] and metrika.pushed[0][0] == 4242
    assert result["requeued"] == 3 and requeued == ["shop"]
    assert read_mapping(store, "shop") == {"integration_id": "shop", "entries": MAPPING["entries"],
                                           "pushed_at": result["pushed_at"]}


@pytest.mark.parametrize("error, status, code", [
    (Transient("HTTP 503", source="metrika", status=503), 502, "metrika_unavailable"),
    (Transient("HTTP 429", source="metrika", status=429), 503, "metrika_unavailable"),
    (Permanent("bad status id", source="metrika", status=400), 422, "metrika_refused"),
    (Misconfigured("Invalid oauth_token", source="metrika", status=403), 422, "metrika_refused"),
])
def test_admin_replace_passes_metrika_refusal_on_and_stores_nothing(error, status, code):
    store, metrika, metrika_for = admin_case(error)
    with pytest.raises(ApiError) as info:
        replace_mapping(store, "shop", MAPPING, metrika_for)
    assert (info.value.status, info.value.error) == (status, code)
    assert info.value.message.startswith("Metrika did not accept the status mapping: ")
    assert store.mappings == {}


def test_admin_invalid_body_is_400_and_nothing_is_pushed():
    store, metrika, metrika_for = admin_case()
    with pytest.raises(ApiError) as info:
        replace_mapping(store, "shop", {"entries": [{**MAPPING["entries"][0], "type": "CANCELED"}]}, metrika_for)
    assert info.value.status == 400 and "type" in info.value.details["entries"][0]
    assert metrika.pushed == [] and store.mappings == {}


def test_admin_unknown_integration_is_404():
    store, metrika, metrika_for = admin_case()
    for call in (lambda: read_mapping(store, "nope"), lambda: replace_mapping(store, "nope", MAPPING, metrika_for)):
        with pytest.raises(ApiError) as info:
            call()
        assert info.value.status == 404
    assert metrika.pushed == []
