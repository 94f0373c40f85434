"""Issue 16 review: defects found in the one-click installs (amoCRM OAuth, the Bitrix24 application) and
the token keeper, each pinned by a test. Pure or on the in-memory store; no servers, fake clocks."""
from __future__ import annotations

import json
import traceback

import pytest
import requests

from chalicelib import deadline
from chalicelib.amocrm_install import complete
from chalicelib.bitrix24_app import Bitrix24Refresher
from chalicelib.crm.amocrm.oauth import AmoOAuth, account_base_url, sign_state, state_problem
from chalicelib.crm.bitrix24.oauth import Bitrix24OAuth
from chalicelib.errors import ApiError, BridgeError, Misconfigured
from chalicelib.oauth import RefreshRefused, TokenKeeper, due_by_margin
from chalicelib.store.memory import MemoryStore
from tests.core import Clock

NOW = 1_750_000_000.0
SECRET = "review16-client-secret-0123456789"


class GrantSession:
    """Bitrix24's OAuth server: answers a new pair for any refresh token, and records what it got."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def get(self, url, params=None, **kwargs):
        self.seen.append(dict(params or {}))
        response = requests.Response()
        response.status_code = 200
        n = len(self.seen)
        response._content = json.dumps({
            "access_token": f"access-{n + 1}", "refresh_token": f"refresh-{n + 1}", "expires_in": 3600,
            "member_id": "abc123", "client_endpoint": "https://shop.bitrix24.ru/rest/"}).encode()
        return response


# --- 1. our own configuration problem recorded as "the CRM refused the refresh token" -----------------

@pytest.mark.parametrize("problem", ["ssm parameter missing", "client id missing"])
def test_a_problem_on_our_side_before_the_refresh_token_is_sent_is_not_recorded_as_a_refusal(problem):
    """An operator's slip (the SSM client secret missing for a minute during a rotation, BITRIX24_CLIENT_ID
    unset by a bad deploy) must not kill every portal whose token came due meanwhile: the refresh token was
    never sent, so once the setting is back the same token refreshes, without a reinstall by each portal."""
    clock = Clock(NOW)
    store = MemoryStore(clock=clock)
    iid = "b24-abc123"
    store.put_tokens(iid, {"access_token": "access-1", "refresh_token": "refresh-1", "expires_at": int(NOW) - 1})
    broken = {"on": True}

    def secret() -> str:
        if broken["on"] and problem == "ssm parameter missing":
            raise Misconfigured("the SSM parameter /x/bitrix24-client-secret does not exist", source="bitrix24")
        return SECRET
    session = GrantSession()
    oauth = Bitrix24OAuth("https://oauth.bitrix.info", "" if problem == "client id missing" else "app.1", secret,
                          session=session, clock=clock)
    keeper = TokenKeeper(store, Bitrix24Refresher(oauth), due=due_by_margin(0), clock=clock, sleep=lambda s: None)
    integration = {"crm": "bitrix24", "connection": {"auth": "oauth", "member_id": "abc123"}}
    with pytest.raises(Misconfigured) as caught:  # deliveries park with the operator's message meanwhile
        keeper.access_token(iid, integration)
    assert not isinstance(caught.value, RefreshRefused)
    tokens = store.get_tokens(iid)
    assert not tokens.get("failure") and "lease_owner" not in tokens
    assert session.seen == []  # the refresh token never left
    # the operator fixes the stage: the same refresh token refreshes
    broken["on"] = False
    if problem == "client id missing":
        oauth._client_id = "app.1"
    assert keeper.access_token(iid, integration) == "access-2"
    assert [p["refresh_token"] for p in session.seen] == ["refresh-1"]


def test_an_amocrm_config_naming_no_amocrm_host_is_not_recorded_as_a_refusal():
    """Same for amoCRM: a config whose base_url fails our own check never sent the refresh token."""
    clock = Clock(NOW)
    store = MemoryStore(clock=clock)
    iid = "amocrm-42"
    store.put_tokens(iid, {"access_token": "access-1", "refresh_token": "refresh-1", "expires_at": int(NOW)})

    class Session:
        def request(self, *args, **kwargs):
            raise AssertionError("nothing may be sent")
    oauth = AmoOAuth("cid", lambda: SECRET, "https://bridge.example/oauth/amocrm", session=Session(), clock=clock)
    keeper = TokenKeeper(store, oauth, due=due_by_margin(3600), clock=clock, sleep=lambda s: None)
    with pytest.raises(Misconfigured):
        keeper.access_token(iid, {"connection": {"base_url": "https://shop.amocrm.ru.evil.com"}})
    assert not store.get_tokens(iid).get("failure")


# --- 2. a state whose expiry Python calls a digit but int() refuses: a 500 on a public route ---------

@pytest.mark.parametrize("expires", ["\u00b2", "\u2460", "1\u00b3"])
def test_a_state_with_a_superscript_digit_is_a_400_not_a_crash(expires):
    state = f"{expires}.nonce.mac"
    assert state_problem(SECRET, state, now=NOW)  # a reason, not a ValueError
    with pytest.raises(ApiError) as caught:
        complete(MemoryStore(), None, {"state": state, "code": "c", "referer": "shop.amocrm.ru"}, secret=SECRET,
                 client_id="cid", public_url="https://bridge.example", now=NOW)
    assert caught.value.status == 400 and "state" in caught.value.details


# --- 3. a referer with a port: the client secret to an amoCRM host's any port, or a 5xx -----------------

@pytest.mark.parametrize("referer", ["shop.amocrm.ru:8443", "shop.amocrm.ru:99999", "shop.amocrm.ru:0",
                                     "shop.kommo.com:443"])
def test_a_referer_with_a_port_is_refused_unless_it_is_the_sandbox(referer):
    with pytest.raises(ValueError):
        account_base_url(referer, sandbox_hosts=("127.0.0.1:8002",))
    assert account_base_url("127.0.0.1:8002", sandbox_hosts=("127.0.0.1:8002",)) == "http://127.0.0.1:8002"
    state = sign_state(SECRET, now=NOW)
    with pytest.raises(ApiError) as caught:
        complete(MemoryStore(), AmoOAuth("cid", lambda: SECRET, "https://bridge.example/oauth/amocrm"),
                 {"state": state, "code": "c", "referer": referer}, secret=SECRET, client_id="cid",
                 public_url="https://bridge.example", now=NOW)
    assert caught.value.status == 400 and "referer" in caught.value.details


# --- 4. the client secret and refresh token in a chained exception's message ---------------------------

def test_a_refresh_cut_short_by_the_deadline_carries_no_secret_in_its_traceback():
    class Session:
        def get(self, url, params=None, **kwargs):
            query = "&".join(f"{k}={v}" for k, v in params.items())
            raise requests.ConnectTimeout(f"HTTPSConnectionPool(host='oauth.bitrix.info', port=443): Max retries "
                                          f"exceeded with url: /oauth/token/?{query}")
    oauth = Bitrix24OAuth("https://oauth.bitrix.info", "app.1", lambda: SECRET, session=Session())
    refresh_token = "refresh-" + SECRET[::-1]  # not in any source line the traceback quotes
    with deadline.invocation(5.0):  # less than the (3.05, 10) s timeout: clipped, so cut short
        with pytest.raises(BridgeError) as caught:
            oauth.refresh(refresh_token)
    printed = "".join(traceback.format_exception(caught.value))
    assert "did not answer within" in printed
    assert SECRET not in printed and refresh_token not in printed


# --- 5. an admin PUT pointing an installed integration's tokens elsewhere, or borrowing another's ------

def _amocrm_body(connection: dict) -> dict:
    return {"crm": "amocrm", "counter_id": 1, "metrika_token": "y0_x", "timezone": "Europe/Moscow",
            "connection": connection}


def test_an_installed_amocrm_connection_is_the_installs_and_oauth_is_never_set_by_hand():
    """Tokens are found by the connection's account_id (member_id for Bitrix24) and sent to its base_url
    (client_endpoint): a PUT that changed them on an installed integration, or set `auth: oauth` on
    another, sent one account's tokens to another account's host, and a refresh refused there recorded a
    failure on the real integration's tokens (its account then had to install again)."""
    from chalicelib.integrations import public_view, save_integration
    store = MemoryStore()
    installed = {"base_url": "https://shop.amocrm.ru", "account_id": "42", "auth": "oauth", "webhook_secret": "w" * 32}
    store.put_integration("amocrm-42", {"crm": "amocrm", "connection": dict(installed), "client_id_field": "_YM_UID",
                                        "deleted_deal_status": "CANCELLED"})
    store.put_integration("long", {"crm": "amocrm", "client_id_field": "_YM_UID", "deleted_deal_status": "CANCELLED",
                                   "connection": {"base_url": "https://long.amocrm.ru", "access_token": "t" * 20,
                                                  "webhook_secret": "v" * 32}})
    tz = lambda config: "Europe/Moscow"  # noqa: E731
    for iid, connection in (("amocrm-42", {**installed, "account_id": "43"}),
                            ("amocrm-42", {**installed, "base_url": "https://other.amocrm.ru"}),
                            ("shop2", {**installed, "base_url": "https://other.amocrm.ru", "webhook_secret": "x" * 32}),
                            ("long", {"base_url": "https://long.amocrm.ru", "auth": "oauth", "account_id": "42",
                                      "webhook_secret": "v" * 32})):
        with pytest.raises(ApiError) as caught:
            save_integration(store, iid, _amocrm_body(connection), tz)
        assert caught.value.status == 400 and any("connection" in key for key in caught.value.details), (iid, connection)
    assert store.get_integration("amocrm-42")["connection"] == installed and store.get_integration("shop2") is None
    # GET → edit → PUT keeps working: the connection as GET shows it, or left out
    shown = public_view(store.get_integration("amocrm-42"))["connection"]
    assert save_integration(store, "amocrm-42", _amocrm_body(shown), tz)["counter_id"] == 1
    assert save_integration(store, "amocrm-42", {k: v for k, v in _amocrm_body(shown).items() if k != "connection"},
                            tz)["counter_id"] == 1
    assert store.get_integration("amocrm-42")["connection"] == installed


def test_a_bitrix24_application_connection_is_never_set_by_hand():
    from chalicelib.integrations import save_integration
    store = MemoryStore()
    body = {"crm": "bitrix24", "counter_id": 1, "metrika_token": "y0_x", "timezone": "Europe/Moscow",
            "connection": {"auth": "oauth", "member_id": "abc123", "client_endpoint": "https://other.bitrix24.ru/rest/",
                           "application_token": "a" * 32}}
    with pytest.raises(ApiError) as caught:
        save_integration(store, "shop3", body, lambda config: "Europe/Moscow")
    assert caught.value.status == 400 and "connection.auth" in caught.value.details
    assert store.get_integration("shop3") is None


# --- 6. a wrong client secret (a rotation's typo) recorded as every due integration's refused token -----

class WrongSecretSession:
    """An OAuth server that refuses our client (invalid_client) until the secret is right again."""

    def __init__(self, amocrm: bool) -> None:
        self.amocrm, self.secret_ok, self.seen = amocrm, False, []

    def _answer(self, params: dict) -> requests.Response:
        self.seen.append(params.get("refresh_token"))
        response = requests.Response()
        if not self.secret_ok:
            response.status_code = 401
            response._content = json.dumps(
                {"title": "Unauthorized", "status": 401, "detail": "Client authentication failed",
                 "hint": "Client authentication failed"} if self.amocrm else
                {"error": "invalid_client", "error_description": "Invalid client credentials"}).encode()
            return response
        response.status_code = 200
        response._content = json.dumps({"access_token": "access-2", "refresh_token": "refresh-2", "expires_in": 86400
                                         if self.amocrm else 3600, "member_id": "abc123",
                                         "client_endpoint": "https://shop.bitrix24.ru/rest/"}).encode()
        return response

    def get(self, url, params=None, **kwargs):
        return self._answer(params or {})

    def request(self, method, url, json=None, **kwargs):
        return self._answer(json or {})


@pytest.mark.parametrize("crm", ["amocrm", "bitrix24"])
def test_a_wrong_client_secret_is_not_recorded_as_a_refused_refresh_token(crm):
    clock = Clock(NOW)
    store = MemoryStore(clock=clock)
    iid = "amocrm-42" if crm == "amocrm" else "b24-abc123"
    store.put_tokens(iid, {"access_token": "access-1", "refresh_token": "refresh-1", "expires_at": int(NOW)})
    session = WrongSecretSession(crm == "amocrm")
    if crm == "amocrm":
        refresher = AmoOAuth("cid", lambda: SECRET, "https://bridge.example/oauth/amocrm", session=session, clock=clock)
        integration = {"connection": {"base_url": "https://shop.amocrm.ru", "auth": "oauth", "account_id": "42"}}
    else:
        refresher = Bitrix24Refresher(Bitrix24OAuth("https://oauth.bitrix.info", "app.1", lambda: SECRET,
                                                    session=session, clock=clock))
        integration = {"connection": {"auth": "oauth", "member_id": "abc123"}}
    keeper = TokenKeeper(store, refresher, due=due_by_margin(3600), clock=clock, sleep=lambda s: None)
    with pytest.raises(Misconfigured) as caught:
        keeper.access_token(iid, integration)
    assert not isinstance(caught.value, RefreshRefused) and "client" in caught.value.message
    assert not store.get_tokens(iid).get("failure")
    session.secret_ok = True  # the operator puts the right secret back
    assert keeper.access_token(iid, integration) == "access-2"
    assert session.seen == ["refresh-1", "refresh-1"]
