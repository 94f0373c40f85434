"""Outbound calls carry secrets (amoCRM's bearer token, Bitrix24's secret webhook URL, Metrika's OAuth
token): no redirect is followed, and a CRM host that leads to a private address is not called. Over
loopback HTTP: a server answering 3xx, and a recorder on another port (or another path of the same
host) where a followed redirect would land; it must receive nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from chalicelib.crm.amocrm.api import AmoCrmClient
from chalicelib.crm.bitrix24.api import Bitrix24Client
from chalicelib.errors import Misconfigured, Transient
from chalicelib.metrika.client import MetrikaClient
from chalicelib.outbound import is_public, redirect_target, session
from chalicelib.settings import load_settings
from sandbox.httpserver import Reply, SandboxServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "outbound-test-token-0123456789"
WEBHOOK_CODE = "s3cr3tc0de0123456789"


class Recorder(SandboxServer):
    """Answers every request with `reply(request)` and keeps what it got."""

    def __init__(self):
        super().__init__()
        self.got: list = []
        self.reply = lambda request: Reply(200, {})

        def handle(request):
            self.got.append(request)
            return self.reply(request)
        for method in ("GET", "POST", "DELETE"):
            self.route(method, r"/.*", handle)


@pytest.fixture(scope="module")
def servers():
    started = [Recorder().start(), Recorder().start()]  # stopping one takes half a second: two per module
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def landing(servers):
    """Where a followed redirect would land: it must get nothing."""
    servers[1].got.clear()
    servers[1].reply = lambda request: Reply(200, {})
    return servers[1]


@pytest.fixture
def redirecting(servers, landing):
    """`status` → the server answering every request with that redirect to the landing server (same path);
    `to=""` points to the same host's `/elsewhere` instead."""
    origin = servers[0]

    def start(status, to=None):
        origin.got.clear()
        origin.reply = lambda request: (Reply(200, {"_embedded": {"leads": []}}) if request.path == "/elsewhere" else
                                        Reply(status, {}, {"Location": "/elsewhere" if to == "" else landing.url + request.path}))
        return origin
    return start


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_amocrm_redirect_is_misconfigured_and_the_token_goes_nowhere(redirecting, landing, status):
    origin = redirecting(status)
    with pytest.raises(Misconfigured) as refused:
        AmoCrmClient(origin.url, TOKEN, attempts=3, backoff=0).get("/api/v4/leads")
    assert landing.got == [] and len(origin.got) == 1  # not followed, not retried
    assert origin.got[0].headers["authorization"] == f"Bearer {TOKEN}"  # (the request did carry it)
    message = refused.value.message
    assert f"answered {status} redirecting to {landing.url}" in message and "connection.base_url" in message
    assert "/api/v4" not in message and refused.value.status == status


def test_amocrm_same_host_redirect_is_not_followed_either(redirecting, landing):
    """requests keeps the Authorization header on a same-host redirect: the case that leaks most easily."""
    same = redirecting(302, to="")
    with pytest.raises(Misconfigured) as refused:
        AmoCrmClient(same.url, TOKEN, attempts=2, backoff=0).leads(["1"])
    assert [r.path for r in same.got] == ["/api/v4/leads"] and landing.got == []
    assert "to another path on the same host" in refused.value.message


@pytest.mark.parametrize("status", [302, 307])
def test_bitrix24_redirect_does_not_carry_the_secret_webhook_url(redirecting, landing, status):
    origin = redirecting(status)
    with pytest.raises(Misconfigured) as refused:
        Bitrix24Client(f"{origin.url}/rest/1/{WEBHOOK_CODE}/", attempts=3, backoff=0).call("crm.deal.list")
    assert landing.got == [] and len(origin.got) == 1
    assert WEBHOOK_CODE not in refused.value.message and "connection.webhook_url" in refused.value.message
    assert f"redirecting to {landing.url}" in refused.value.message


def test_metrika_redirect_is_an_error_and_the_oauth_token_goes_nowhere(redirecting, landing):
    origin = redirecting(302)
    with pytest.raises(Transient) as refused:
        MetrikaClient(TOKEN, origin.url, attempts=1).counter_time_zone(4242)
    assert landing.got == [] and len(origin.got) == 1
    assert "redirecting to" in refused.value.message and "METRIKA_API_URL" in refused.value.message


# --- private addresses ------------------------------------------------------------------------------

def test_a_crm_host_on_a_private_address_is_not_called_where_loopback_is_not_allowed(landing):
    production = session(allow_loopback=False)
    with pytest.raises(Misconfigured) as amo:
        AmoCrmClient(landing.url, TOKEN, session=production, attempts=3, backoff=0).get("/api/v4/leads")
    with pytest.raises(Misconfigured) as bitrix:
        Bitrix24Client(f"{landing.url}/rest/1/{WEBHOOK_CODE}/", session=production, attempts=3, backoff=0).call("x")
    assert landing.got == []  # connected, judged, closed: not a byte of the request was sent
    assert "127.0.0.1, not a public address" in amo.value.message and "connection.base_url" in amo.value.message
    assert WEBHOOK_CODE not in bitrix.value.message and "connection.webhook_url" in bitrix.value.message
    AmoCrmClient(landing.url, TOKEN, session=session(allow_loopback=True)).get("/api/v4/leads")
    assert len(landing.got) == 1  # the local stack's leave lets the same call through


def test_the_default_session_follows_the_deployment_setting(landing, monkeypatch):
    from chalicelib.settings import get_settings
    monkeypatch.setenv("ALLOW_LOOPBACK_CRM", "0")
    get_settings.cache_clear()
    try:
        with pytest.raises(Misconfigured):
            AmoCrmClient(landing.url, TOKEN, attempts=1).get("/api/v4/leads")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert landing.got == []


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2a00:1450:4001::1", True), ("::ffff:8.8.8.8", True),
    ("10.0.0.1", False), ("172.16.0.1", False), ("192.168.1.1", False), ("127.0.0.1", False), ("0.0.0.0", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("224.0.0.1", False), ("255.255.255.255", False),
    ("::1", False), ("fd00::1", False), ("fe80::1%eth0", False), ("::ffff:10.0.0.1", False),
    ("::ffff:127.0.0.1", False), ("2002:a00:1::1", False), ("64:ff9b::a9fe:a9fe", False), ("not an address", False),
])
def test_is_public(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize("address, allowed", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                              ("::ffff:127.0.0.1", True), ("10.0.0.1", False), ("169.254.1.1", False)])
def test_the_loopback_leave_is_for_loopback_alone(address, allowed):
    assert is_public(address, allow_loopback=True) is allowed


@pytest.mark.parametrize("headers, shown", [
    ({"Location": f"https://evil.example:8443/rest/1/{WEBHOOK_CODE}/crm.deal.list.json?x=1"}, "to https://evil.example:8443"),
    ({"location": "/api/v4/leads"}, "to another path on the same host"),
    ({}, "without a Location"),
    ({"Location": "https://[abc"}, "to an unreadable Location"),
    ({"Location": "//other.example/x"}, "to https://other.example"),
])
def test_redirect_target_names_the_host_never_the_path(headers, shown):
    assert redirect_target(headers) == shown


# --- the deployment's leave -------------------------------------------------------------------------

def test_loopback_is_off_unless_the_deployment_says_1():
    assert load_settings({}).allow_loopback_crm is False
    assert load_settings({"ALLOW_LOOPBACK_CRM": "true"}).allow_loopback_crm is False
    assert load_settings({"ALLOW_LOOPBACK_CRM": "1"}).allow_loopback_crm is True


def test_no_deployed_stage_allows_loopback():
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    texts = [json.dumps(config.get("environment_variables", {}))] + [
        json.dumps(stage) for stage in config.get("stages", {}).values()]
    assert config["stages"] and not any("ALLOW_LOOPBACK_CRM" in text for text in texts)
