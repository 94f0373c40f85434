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
