"""Hostile-input sweep of issue 17's public and admin routes: what it found, each pinned here."""
from __future__ import annotations

import pytest

from chalicelib.amocrm_install import complete, disable
from chalicelib.crm.amocrm.oauth import disable_signature_ok, state_problem
from chalicelib.errors import ApiError
from chalicelib.store.memory import MemoryStore

SECRET = "sweep-client-secret"
NOW = 1_800_000_000


# --- a lone surrogate in a query (a JSON event may carry "\ud800") was a UnicodeEncodeError: a 500 -------

@pytest.mark.parametrize("state", ["1.\ud800.mac", f"{NOW + 60}.nonce.\ud800", f"{NOW + 60}.\udfff.x"])
def test_a_state_with_a_lone_surrogate_is_a_400_not_a_crash(state):
    assert state_problem(SECRET, state, now=NOW)
    with pytest.raises(ApiError) as caught:
        complete(MemoryStore(), None, {"state": state, "code": "c", "referer": "shop.amocrm.ru"}, secret=SECRET,
                 client_id="cid", public_url="https://bridge.example", now=NOW)
    assert caught.value.status == 400 and "state" in caught.value.details


@pytest.mark.parametrize("field", ["client_uuid", "account_id", "signature"])
def test_a_disable_hook_with_a_lone_surrogate_is_a_403_not_a_crash(field):
    query = {"client_uuid": "cid", "account_id": "123", "signature": "ab" * 32, field: "\ud800"}
    assert disable_signature_ok("cid", SECRET, query) is False
    with pytest.raises(ApiError) as caught:
        disable(MemoryStore(), query, client_id="cid", client_secret=SECRET, now=NOW)
    assert caught.value.status == 403 and "signature" in caught.value.details


# --- a lone surrogate echoed in a 400's details: the body could not be encoded (chalice local's 500) ------

@pytest.mark.parametrize("method, path, field", [
    ("GET", "/integrations?after=\ud800", "after"),
    ("GET", "/integrations?limit=\ud800", "limit"),
    ("GET", "/integrations/\ud800/summary", "integration_id"),
    ("DELETE", "/integrations/sweep17/console-links/\ud800", "link_id"),
])
def test_a_lone_surrogate_echoed_in_a_400_is_replaced_not_a_crash(app_client, method, path, field):
    from tests.conftest import admin_headers
    answer = app_client.http.request(method, path, headers=admin_headers())
    assert answer.status_code == 400 and answer.headers["Content-Type"] == "application/json; charset=utf-8"
    assert answer.json_body["details"][field] == "\ufffd" or "\ufffd" in answer.json_body["details"][field]
    answer.body.decode("utf-8")  # strict UTF-8: what any client can read
