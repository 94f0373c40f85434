"""Installing into amoCRM (OAuth 2.0) on the amoCRM sandbox, end to end over loopback: the install's
redirects, the code exchange, the webhook it registers, deliveries with the OAuth token (refreshed when
amoCRM refuses it), a revoked refresh token parking deals with what to do, forged installs changing
nothing, the disable hook stopping deliveries, and the scheduled refresh. Plus the pure checks."""
from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import boto3
import pytest

from chalicelib.crm.amocrm.api import AmoCrmClient
from chalicelib.crm.amocrm.oauth import (DUE, AmoOAuth, account_base_url, disable_signature_ok, sign_state,
                                         state_problem, token_pair)
from chalicelib.errors import Misconfigured, Transient
from chalicelib.oauth import TokenKeeper, TokenPair
from chalicelib.store.memory import MemoryStore
from tests.conftest import admin_headers
from tests.core import StoredSignal, at_once

CLIENT_ID = "0b6c2d8e-4f1a-4c3b-9e7d-5a6b7c8d9e0f"
CLIENT_SECRET = "install-test-client-secret-" + hashlib.sha256(str(random.random()).encode()).hexdigest()[:16]
PUBLIC = "http://127.0.0.1:9"  # the app's public URL as amoCRM knows it (nothing listens: see `deliver`)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
COUNTER = 6161
ACCOUNT_ID = random.randint(10 ** 8, 10 ** 9)  # its own integration id (amocrm-<account>) per run


@pytest.fixture(scope="module")
def amo():
    from sandbox.amocrm import AmoCrmSandbox
    sandbox = AmoCrmSandbox(token="install-test-long-lived", account_id=ACCOUNT_ID, subdomain="installshop").start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def installs(service_env, amo, monkeypatch, app_client):
    """The stage configured for installs: our client id and secret, our public URL, the sandbox host."""
    import app
    from chalicelib.settings import get_settings
    for name, value in {"AMOCRM_CLIENT_ID": CLIENT_ID, "AMOCRM_CLIENT_SECRET": CLIENT_SECRET, "PUBLIC_URL": PUBLIC,
                        "AMOCRM_SANDBOX_HOSTS": amo.host, "AMOCRM_AUTH_URL": amo.url + "/oauth"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    monkeypatch.setattr(app, "_AMOCRM_SECRET", None)
    app._SOURCES.clear()
    amo.reset()
    amo.clock_offset = 0.0
    for kept in (amo.codes, amo.access_tokens, amo.refresh_tokens):
        kept.clear()
    amo.token_calls.clear()
    amo.disable_calls.clear()
    amo.register_integration(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=PUBLIC + "/oauth/amocrm",
                             disable_url=None)
    amo.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
    contact = amo.create_contact("Анна", phones=["+7 916 000-11-22"], notify=False)
    lead = amo.create_lead("Заказ", 7001, 1001, price=1500, contacts=[contact["id"]], client_id="1700000000111222333",
                           notify=False)
    yield {"lead": lead["id"], "integration": f"amocrm-{ACCOUNT_ID}"}
    app.get_store().delete_integration(f"amocrm-{ACCOUNT_ID}")
    app._SOURCES.clear()
    get_settings.cache_clear()


def start(client, amo) -> str:
    """`GET /install/amocrm`, then the user allowing access on amoCRM's page: our redirect route's path."""
    response = client.http.get("/install/amocrm")
    assert response.status_code == 302, response.body
    location = {k.lower(): v for k, v in response.headers.items()}["location"]
    assert location.startswith(amo.url + "/oauth?")
    query = parse_qs(urlsplit(location).query)
    assert query["client_id"] == [CLIENT_ID]
    redirect = amo.consent_redirect(CLIENT_ID, query["state"][0])
    assert redirect.startswith(PUBLIC + "/oauth/amocrm?")
    return redirect[len(PUBLIC):]


def install(client, amo) -> dict:
    response = client.http.get(start(client, amo))
    assert response.status_code == 200, response.json_body
    return response.json_body


def connect_metrika(client, integration_id, metrika_sandbox):
    metrika_sandbox.add_counter(COUNTER, "Europe/Moscow")
    config = client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).json_body
    config.update(counter_id=COUNTER, metrika_token="y0_install_test", timezone="Europe/Moscow")
    response = client.http.put(f"/integrations/{integration_id}", headers=admin_headers(), body=json.dumps(config))
    assert response.status_code == 200, response.json_body
    response = client.http.post(f"/integrations/{integration_id}/status-mapping/defaults", headers=admin_headers())
    assert response.status_code == 200, response.json_body


def deliver(client, amo) -> list[int]:
    """Post what the sandbox fired to the destination it registered, as amoCRM would (the registered URL is
    the public one: the test client stands in for it)."""
    (hook,) = amo.webhooks
    path = hook["destination"][len(PUBLIC):]
    statuses = [client.http.post(path, headers=FORM, body=body).status_code for _, body in amo.outbox]
    amo.outbox.clear()
    return statuses


def tokens_of(integration_id):
    import app
    return app.get_store().get_tokens(integration_id)


def test_install_then_webhook_then_delivery_with_a_refresh_on_401(app_client, installs, amo, worker, queue,
                                                                   metrika_sandbox):
    iid = installs["integration"]
    answer = install(app_client, amo)
    assert (answer["installed"], answer["account_id"], answer["reinstall"]) == (iid, str(ACCOUNT_ID), False)
    assert answer["base_url"] == amo.url and answer["webhook_registered"] is True
    assert "counter_id" in answer["next"]  # no Metrika counter yet: says what to do
    assert {e["crm_status"] for e in answer["status_mapping_proposed"]} >= {"7001:142", "7001:143"}
    (hook,) = amo.webhooks
    secret = parse_qs(urlsplit(hook["destination"]).query)["secret"][0]
    assert hook["destination"].startswith(f"{PUBLIC}/webhooks/amocrm/{iid}?") and len(secret) >= 32
    assert {"add_lead", "update_lead", "status_lead"} <= set(hook["settings"])
    assert amo.token_calls == ["authorization_code"]
    # Tokens are stored apart and never shown.
    tokens = tokens_of(iid)
    config = app_client.http.get(f"/integrations/{iid}", headers=admin_headers()).json_body
    assert config["connection"]["auth"] == "oauth" and config["connection"]["webhook_secret"] == "********"
    assert tokens["access_token"] not in json.dumps(config) and tokens["refresh_token"] not in json.dumps(config)
    before = app_client.http.get(f"/integrations/{iid}/status", headers=admin_headers()).json_body
    assert "counter_id" in before["deliveries_stopped"] and before["oauth"]["version"] == 1
    refused = app_client.http.post(f"/integrations/{iid}/confirm", headers=admin_headers(), body="{}")
    assert refused.status_code == 409 and refused.json_body["error"] == "metrika_not_connected"
    connect_metrika(app_client, iid, metrika_sandbox)
    status = app_client.http.get(f"/integrations/{iid}/status", headers=admin_headers()).json_body
    assert status["oauth"]["version"] == 1 and "deliveries_stopped" not in status
    assert tokens["access_token"] not in json.dumps(status)
    amo.update_lead(installs["lead"], status_id=142)
    assert deliver(app_client, amo) == [200, 200]
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(installs["lead"])]["order_status"] == "won"
    # amoCRM refuses the access token (revoked early): one forced refresh, the call retried, delivered.
    amo.access_tokens.clear()
    amo.update_lead(installs["lead"], price=2500)
    assert deliver(app_client, amo) == [200]
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(installs["lead"])]["revenue"] == 2500
    assert amo.token_calls == ["authorization_code", "refresh_token"]
    assert tokens_of(iid)["version"] == 2
    # Installed again: the same integration, its Metrika settings kept, the same webhook.
    again = install(app_client, amo)
    assert (again["installed"], again["reinstall"]) == (iid, True)
    stored = app_client.http.get(f"/integrations/{iid}", headers=admin_headers()).json_body
    assert stored["counter_id"] == COUNTER and len(amo.webhooks) == 1
    assert "deliveries are on" in again["next"] and tokens_of(iid)["version"] == 3
    # Deleted by the admin: our webhook leaves the account first.
    deleted = app_client.http.delete(f"/integrations/{iid}", headers=admin_headers())
    assert deleted.json_body == {"deleted": iid, "webhook_removed": True} and amo.webhooks == []
    assert tokens_of(iid) is None


def test_a_revoked_refresh_token_parks_deals_with_what_to_do(app_client, installs, amo, worker, queue,
                                                             metrika_sandbox):
    iid = installs["integration"]
    install(app_client, amo)
    connect_metrika(app_client, iid, metrika_sandbox)
    amo.access_tokens.clear()
    amo.refresh_tokens.clear()  # revoked in amoCRM (or 3 months unused)
    amo.update_lead(installs["lead"], status_id=1002)
    assert deliver(app_client, amo) == [200, 200]
    worker.drain()
    assert str(installs["lead"]) not in metrika_sandbox.counter(COUNTER).orders
    status = app_client.http.get(f"/integrations/{iid}/status", headers=admin_headers()).json_body
    assert status["failed_count"] == 1
    message = status["failed"][0]["error"]["message"]
    assert "Token has been revoked" in message and "install the integration again from amoCRM" in message
    assert status["oauth"]["refresh_failure"]["message"] == message
    assert amo.token_calls == ["authorization_code", "refresh_token"]  # refused once, not asked again
    amo.update_lead(installs["lead"], price=99)
    deliver(app_client, amo)
    worker.drain()
    assert amo.token_calls == ["authorization_code", "refresh_token"]


def test_two_workers_refreshing_at_once_make_one_refresh_call_at_the_sandbox(service_env, installs, amo):
    """Two threads with an expired token: the loser of the election waits (its sleep lets the refresher
    answer), then uses the winner's token, which amoCRM accepts."""
    oauth = AmoOAuth(CLIENT_ID, lambda: CLIENT_SECRET, PUBLIC + "/oauth/amocrm", sandbox_hosts=(amo.host,))
    query = parse_qs(urlsplit(amo.consent_redirect(CLIENT_ID, "s")).query)
    pair = oauth.exchange(amo.url, query["code"][0])
    waiting = threading.Event()
    store = StoredSignal()
    stored = store.stored
    store.put_tokens("race", {**pair.fields(), "expires_at": int(time.time()) - 1})

    class Slow:  # the refresher waits until the other thread waits: both are inside access_token at once
        source, reinstall_hint = oauth.source, oauth.reinstall_hint

        def refresh(self, integration, refresh_token):
            waiting.wait(5)
            return oauth.refresh(integration, refresh_token)

    def sleep(seconds):
        waiting.set()
        stored.wait(5)
    keeper = TokenKeeper(store, Slow(), due=DUE, sleep=sleep)
    integration = {"connection": {"base_url": amo.url}}
    results, errors = at_once(lambda: keeper.access_token("race", integration), 2, timeout=10)
    assert errors == []
    assert amo.token_calls == ["authorization_code", "refresh_token"]
    assert len(results) == 2 and results[0] == results[1] != pair.access_token
    assert AmoCrmClient(amo.url, results[0]).get("/api/v4/account")["id"] == ACCOUNT_ID


def test_eight_threads_with_real_waits_still_refresh_once(service_env, installs, amo):
    oauth = AmoOAuth(CLIENT_ID, lambda: CLIENT_SECRET, PUBLIC + "/oauth/amocrm", sandbox_hosts=(amo.host,))
    pair = oauth.exchange(amo.url, parse_qs(urlsplit(amo.consent_redirect(CLIENT_ID, "s")).query)["code"][0])
    store = MemoryStore()
    store.put_tokens("race8", {**pair.fields(), "expires_at": int(time.time()) - 1})
    keeper = TokenKeeper(store, oauth, due=DUE, poll_seconds=0.005)
    results, errors = at_once(lambda: keeper.access_token("race8", {"connection": {"base_url": amo.url}}), 8,
                              timeout=10)
    assert errors == []
    assert amo.token_calls.count("refresh_token") == 1 and len(set(results)) == 1 and len(results) == 8


def test_forged_installs_change_nothing(app_client, installs, amo):
    import app
    from sandbox.httpserver import Reply, SandboxServer
    iid = installs["integration"]
    path = start(app_client, amo)
    good = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}

    def attempt(**changes):
        query = {k: v for k, v in {**good, **changes}.items() if v is not None}
        return app_client.http.get("/oauth/amocrm?" + urlencode(query))
    for state in ("", "1.2.3", good["state"] + "x", sign_state("not our secret", now=time.time()),
                  sign_state(CLIENT_SECRET, now=time.time() - 3600), "9" * 2000):
        answer = attempt(state=state)
        assert answer.status_code == 400 and answer.json_body["error"] == "invalid_state", state[:40]
    assert attempt(state=None).status_code == 400
    # An attacker's server on loopback named as the account: refused before anything is sent to it.
    attacker = SandboxServer()
    seen = []
    attacker.route("POST", r"/.*", lambda request: (seen.append(request), Reply(200, {}))[1])
    attacker.start()
    try:
        host = attacker.url.split("://", 1)[1]
        for referer in (host, "evil.example.com", "installshop.amocrm.ru.evil.com", "amocrm.ru", "", "x" * 300,
                        f"{amo.host}/path", "localhost"):
            answer = attempt(referer=referer)
            assert answer.status_code == 400 and "referer" in answer.json_body["details"], referer
    finally:
        attacker.stop()
    assert seen == []
    for code in ("", "a b", "é"):
        assert attempt(code=code).status_code == 400
    assert attempt(client_id="someone-else").status_code == 400
    assert amo.token_calls == [] and app.get_store().get_integration(iid) is None and tokens_of(iid) is None
    # The real one installs; the same redirect replayed (the code is single use) changes nothing.
    assert attempt().status_code == 200
    version = tokens_of(iid)["version"]
    replayed = attempt()
    assert replayed.status_code == 422 and replayed.json_body["error"] == "crm_refused"
    assert tokens_of(iid)["version"] == version
    assert amo.token_calls == ["authorization_code", "authorization_code"]


def test_the_disable_hook_stops_deliveries_until_installed_again(app_client, installs, amo, worker, queue,
                                                                 metrika_sandbox):
    iid = installs["integration"]
    install(app_client, amo)
    connect_metrika(app_client, iid, metrika_sandbox)
    amo.update_lead(installs["lead"], status_id=142)
    assert deliver(app_client, amo) == [200, 200]  # recorded before the integration is disabled
    signature = hmac.new(CLIENT_SECRET.encode(), f"{CLIENT_ID}|{ACCOUNT_ID}".encode(), hashlib.sha256).hexdigest()
    query = {"account_id": str(ACCOUNT_ID), "client_uuid": CLIENT_ID, "signature": signature}
    for forged in ({"signature": "0" * 64}, {"client_uuid": "another-app"}, {"account_id": "1"}, {"signature": None}):
        changed = {k: v for k, v in {**query, **forged}.items() if v is not None}
        answer = app_client.http.get("/oauth/amocrm/disable?" + urlencode(changed))
        assert answer.status_code == 403, forged
    assert "disabled" not in app_client.http.get(f"/integrations/{iid}", headers=admin_headers()).json_body
    answer = app_client.http.get("/oauth/amocrm/disable?" + urlencode(query))
    assert answer.status_code == 200 and answer.json_body["disabled"] == iid
    worker.drain()
    assert str(installs["lead"]) not in metrika_sandbox.counter(COUNTER).orders
    status = app_client.http.get(f"/integrations/{iid}/status", headers=admin_headers()).json_body
    assert "disabled in amoCRM" in status["disabled"]["reason"] and "install it again" in status["deliveries_stopped"]
    assert status["failed_count"] == 1 and "install it again" in status["failed"][0]["error"]["message"]
    amo.update_lead(installs["lead"], price=7)
    answer = app_client.http.post(amo.webhooks[0]["destination"][len(PUBLIC):], headers=FORM, body=amo.outbox[-1][1])
    assert answer.status_code == 410 and answer.json_body["error"] == "integration_disabled"
    amo.outbox.clear()
    # An admin's GET → PUT does not enable it again; installing again does.
    config = app_client.http.get(f"/integrations/{iid}", headers=admin_headers()).json_body
    assert app_client.http.put(f"/integrations/{iid}", headers=admin_headers(), body=json.dumps(config)).status_code == 200
    assert "disabled" in app_client.http.get(f"/integrations/{iid}/status", headers=admin_headers()).json_body
    install(app_client, amo)
    assert "disabled" not in app_client.http.get(f"/integrations/{iid}/status", headers=admin_headers()).json_body


def test_the_sandbox_calls_the_disable_hook_with_a_signature_that_verifies(installs, amo):
    from sandbox.httpserver import Reply, SandboxServer
    hook = SandboxServer()
    seen = []
    hook.route("GET", r"/disable", lambda request: (seen.append(request.query), Reply(200, {}))[1])
    hook.start()
    try:
        amo.register_integration(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                 redirect_uri=PUBLIC + "/oauth/amocrm", disable_url=hook.url + "/disable")
        assert amo.uninstall() == {"disable_hook": 200}
    finally:
        hook.stop()
    assert disable_signature_ok(CLIENT_ID, CLIENT_SECRET, seen[0])
    assert not disable_signature_ok(CLIENT_ID, "another secret", seen[0])


def test_the_scheduled_refresh_refreshes_an_idle_installed_integration(app_client, installs, amo, worker, queue):
    import app
    from chalicelib.queue import REFRESH, message
    from chalicelib.schedules import JOBS
    from chalicelib.settings import get_settings
    assert JOBS["refresh_tokens"] == REFRESH
    iid = installs["integration"]
    install(app_client, amo)
    app.get_queue().send([message(iid, REFRESH, str(int(time.time())))])
    worker.drain()
    assert amo.token_calls == ["authorization_code"]  # installed just now: not idle
    boto3.client("dynamodb").update_item(  # the test's own write: tokens last refreshed 31 days ago
        TableName=get_settings().config_table, Key={"pk": {"S": f"INTEGRATION#{iid}"}, "sk": {"S": "TOKENS"}},
        UpdateExpression="SET refreshed_at = :t", ExpressionAttributeValues={":t": {"N": str(int(time.time()) - 31 * 86400)}})
    app.get_queue().send([message(iid, REFRESH, str(int(time.time())))])
    worker.drain()
    assert amo.token_calls == ["authorization_code", "refresh_token"] and tokens_of(iid)["version"] == 2


def test_the_refresh_job_skips_what_is_not_an_installed_integration():
    from chalicelib.schedules import Jobs
    store = MemoryStore()
    store.put_integration("long-lived", {"crm": "amocrm", "connection": {"base_url": "https://a.amocrm.ru"}})
    store.put_integration("gone", {"crm": "amocrm", "disabled": {"at": 1}, "connection": {"auth": "oauth"}})

    class Source:
        calls = 0

        def keep_alive(self, integration):
            Source.calls += 1
            return True
    jobs = Jobs(store, None, lambda c: None, {"amocrm": Source()})
    for kind in ("reconcile", "confirm"):  # the gone one's jobs stop too (its token is revoked)
        assert "disabled in amocrm" in jobs.run(kind, "gone", "1")["skipped"]
    assert "skipped" in jobs.run("refresh", "long-lived", "1")
    assert "skipped" in jobs.run("refresh", "gone", "1")
    assert "skipped" in jobs.run("refresh", "absent", "1")
    assert Source.calls == 0


# --- pure checks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("referer, expected", [
    ("shop.amocrm.ru", "https://shop.amocrm.ru"), ("Shop.Kommo.com", "https://shop.kommo.com"),
    ("a.amocrm.com", "https://a.amocrm.com"), ("127.0.0.1:8002", "http://127.0.0.1:8002")])
def test_account_hosts_accepted(referer, expected):
    assert account_base_url(referer, sandbox_hosts=("127.0.0.1:8002",)) == expected


@pytest.mark.parametrize("referer", [
    "127.0.0.1:8003", "127.0.0.1", "localhost", "shop.amocrm.ru.evil.com", "a.b.amocrm.ru", "amocrm.ru",
    "https://shop.amocrm.ru", "shop.amocrm.ru/", "shop.amocrm.ru@evil.com", "", None, 7, True, ["shop.amocrm.ru"],
    "9" * 2000, "shop.amocrm.ru:443\n", "169.254.169.254", "xn--80a.amocrm.ru.example"])
def test_account_hosts_refused(referer):
    with pytest.raises(ValueError):
        account_base_url(referer, sandbox_hosts=("127.0.0.1:8002",))


def test_state_is_signed_expires_and_cannot_be_altered():
    now = 1_750_000_000
    state = sign_state("k", now=now)
    assert state_problem("k", state, now=now + 1199) is None
    assert "expired" in state_problem("k", state, now=now + 1201)
    assert state_problem("other", state, now=now)
    expires, nonce, mac = state.split(".")
    assert state_problem("k", f"{int(expires) + 10 ** 9}.{nonce}.{mac}", now=now)  # year 2100 and beyond: forged
    for bad in (None, 1, True, "", "..", "a.b.c", "1" * 5000, {"state": state}):
        assert state_problem("k", bad, now=now)
    assert sign_state("k", now=now) != state  # a fresh nonce each time


def test_disable_signature():
    query = {"client_uuid": "cid", "account_id": "42",
             "signature": hmac.new(b"sec", b"cid|42", hashlib.sha256).hexdigest()}
    assert disable_signature_ok("cid", "sec", query)
    assert disable_signature_ok("cid", "sec", {**query, "signature": query["signature"].upper()})
    assert not disable_signature_ok("other", "sec", query)
    assert not disable_signature_ok("cid", "sec", {**query, "account_id": "43"})
    assert not disable_signature_ok("cid", "sec", {**query, "signature": ["x"]})
    assert not disable_signature_ok("cid", "sec", {k: v for k, v in query.items() if k != "signature"})


def test_token_answers_as_the_taxonomy_has_them():
    ok = json.dumps({"access_token": "a", "refresh_token": "r", "expires_in": 86400}).encode()
    assert token_pair(200, ok, now=100) == TokenPair("a", "r", 86500)
    for expires_in in ("86400", True, 10 ** 2000, -5, 0, None):
        body = json.dumps({"access_token": "a", "refresh_token": "r", "expires_in": expires_in}).encode()
        assert token_pair(200, body, now=100).expires_at == 3700  # refreshed within the hour
    assert isinstance(token_pair(401, b'{"hint": "Token has been revoked"}', now=0), Misconfigured)
    assert "revoked" in token_pair(401, b'{"hint": "Token has been revoked"}', now=0).message
    assert isinstance(token_pair(400, b"", now=0), Misconfigured)
    for status, body in ((503, b""), (429, b"{}"), (200, b"<html>"), (200, b'{"access_token": "a"}'),
                         (200, json.dumps({"access_token": "a b", "refresh_token": "r"}).encode()),
                         (200, json.dumps({"access_token": "a" * 9000, "refresh_token": "r"}).encode())):
        assert isinstance(token_pair(status, body, now=0), Transient), (status, body)


def test_secrets_go_only_to_an_amocrm_host_whatever_the_config_says():
    calls = []

    class Session:
        def request(self, *args, **kwargs):
            calls.append(args)
            raise AssertionError("must not be called")
    oauth = AmoOAuth("id", lambda: "secret", "https://bridge.example/oauth/amocrm", session=Session())
    for base_url in ("https://evil.example.com", "http://shop.amocrm.ru", "https://shop.amocrm.ru.evil.com", ""):
        with pytest.raises(Misconfigured):
            oauth.refresh({"connection": {"base_url": base_url}}, "refresh")
    assert calls == []


def test_a_stage_without_install_settings_answers_501_naming_what_is_missing(app_client, monkeypatch):
    import app
    from chalicelib.settings import get_settings
    for name in ("AMOCRM_CLIENT_ID", "AMOCRM_CLIENT_SECRET", "PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr(app, "_AMOCRM_SECRET", None)
    try:
        for path in ("/install/amocrm", "/oauth/amocrm?code=x&state=y&referer=a.amocrm.ru",
                     "/oauth/amocrm/disable?account_id=1&client_uuid=x&signature=y"):
            answer = app_client.http.get(path)
            assert answer.status_code == 501 and answer.json_body["error"] == "not_configured", path
            assert "AMOCRM_CLIENT_ID" in answer.json_body["message"]
    finally:
        get_settings.cache_clear()


def test_the_client_secret_is_read_from_ssm_once_and_a_missing_parameter_is_not_an_outage():
    from botocore.exceptions import ClientError
    from chalicelib.amocrm_install import ClientSecret
    from chalicelib.errors import ApiError, Unavailable
    from chalicelib.settings import load_settings
    settings = load_settings({"STAGE": "prod"})
    assert settings.amocrm_client_secret_parameter == "/metrika-crm-bridge/prod/amocrm-client-secret"

    class Ssm:
        def __init__(self, answer):
            self.answer, self.calls = answer, 0

        def get_parameter(self, Name, WithDecryption):
            self.calls += 1
            assert (Name, WithDecryption) == (settings.amocrm_client_secret_parameter, True)
            if isinstance(self.answer, Exception):
                raise self.answer
            return {"Parameter": {"Value": self.answer}}
    now = [0.0]
    ssm = Ssm("s3cret")
    secret = ClientSecret(settings, ssm=ssm, clock=lambda: now[0])
    assert secret() == secret() == "s3cret" and ssm.calls == 1
    now[0] = 301.0
    assert secret() == "s3cret" and ssm.calls == 2  # re-read after 5 minutes: a rotation shows
    missing = ClientError({"Error": {"Code": "ParameterNotFound", "Message": "no"}}, "GetParameter")
    with pytest.raises(ApiError) as caught:
        ClientSecret(settings, ssm=Ssm(missing))()
    assert caught.value.status == 501 and settings.amocrm_client_secret_parameter in caught.value.message
    throttled = ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "GetParameter")
    with pytest.raises(Unavailable):
        ClientSecret(settings, ssm=Ssm(throttled))()
    assert ClientSecret(load_settings({"AMOCRM_CLIENT_SECRET": "env"}), ssm=Ssm(missing))() == "env"


def test_an_installed_connection_keeps_no_token_and_a_long_lived_one_needs_its_token():
    from marshmallow import ValidationError
    from chalicelib.integrations import AmoCrmConnection
    oauth = {"base_url": "https://shop.amocrm.ru", "auth": "oauth", "account_id": "42", "webhook_secret": "s" * 32}
    assert AmoCrmConnection().load(oauth)["auth"] == "oauth"
    for broken, field in (({**oauth, "access_token": "t"}, "access_token"),
                          ({k: v for k, v in oauth.items() if k != "account_id"}, "account_id"),
                          ({**oauth, "auth": "true"}, "auth"), ({**oauth, "auth": True}, "auth"),
                          ({**oauth, "auth": "long_lived"}, "access_token")):
        with pytest.raises(ValidationError) as caught:
            AmoCrmConnection().load(broken)
        assert field in caught.value.messages, (broken, caught.value.messages)


def test_unusable_says_why_deliveries_stop():
    from chalicelib.amocrm_install import unusable
    ready = {"crm": "amocrm", "counter_id": 1, "metrika_token": "y0"}
    assert unusable(ready) is None
    assert "PUT /integrations/amocrm-1" in unusable({"crm": "amocrm"}, "amocrm-1")
    assert "disabled in amocrm" in unusable({**ready, "disabled": {"at": 1, "reason": "uninstalled"}})
    assert unusable({**ready, "disabled": "yes"}) is None  # only the hook's own record counts


def test_two_first_installs_at_once_agree_on_the_webhook_secret(installs, amo):
    """A double click: both installs see no integration yet; the webhook each registers and the config
    each stores carry the same secret, whichever write lands last."""
    import app
    from chalicelib.amocrm_install import complete, webhook_secret_for

    class Unseen:  # each install reads before the other wrote
        def __init__(self, store):
            self._store = store

        def __getattr__(self, name):
            return getattr(self._store, name)

        def get_integration(self, integration_id, **kwargs):
            return None
    oauth = AmoOAuth(CLIENT_ID, lambda: CLIENT_SECRET, PUBLIC + "/oauth/amocrm", sandbox_hosts=(amo.host,))
    answers = []
    for _ in range(2):
        query = {k: v[0] for k, v in parse_qs(urlsplit(amo.consent_redirect(CLIENT_ID, sign_state(
            CLIENT_SECRET, now=time.time()))).query).items()}
        answers.append(complete(Unseen(app.get_store()), oauth, query, secret=CLIENT_SECRET, client_id=CLIENT_ID,
                                public_url=PUBLIC, now=time.time()))
    iid = installs["integration"]
    assert [a["installed"] for a in answers] == [iid, iid] and len(amo.webhooks) == 1
    stored = app.get_store().get_integration(iid)["connection"]["webhook_secret"]
    assert parse_qs(urlsplit(amo.webhooks[0]["destination"]).query)["secret"] == [stored]
    assert stored == webhook_secret_for(CLIENT_SECRET, iid) != webhook_secret_for(CLIENT_SECRET, iid + "0")
    assert webhook_secret_for("another client secret", iid) != stored and len(stored) >= 32


def test_a_refresher_that_died_after_amocrm_answered_costs_a_reinstall(service_env, installs, amo):
    """The one loss no ordering avoids: amoCRM consumed the refresh token and answered, the process died
    before storing the new pair. After its lease the next worker's refresh is refused, recorded, and says
    to install again."""
    oauth = AmoOAuth(CLIENT_ID, lambda: CLIENT_SECRET, PUBLIC + "/oauth/amocrm", sandbox_hosts=(amo.host,))
    pair = oauth.exchange(amo.url, parse_qs(urlsplit(amo.consent_redirect(CLIENT_ID, "s")).query)["code"][0])
    now = [time.time() + 86400]  # the access token is due
    store = MemoryStore()
    store.put_tokens("died", pair.fields())
    integration = {"connection": {"base_url": amo.url}}
    assert store.take_refresh_lease("died", version=1, owner="dead worker", now=now[0], until=now[0] + 30)
    oauth.refresh(integration, pair.refresh_token)  # answered; the process dies here, nothing stored

    def sleep(seconds):
        now[0] += seconds
    keeper = TokenKeeper(store, oauth, due=DUE, clock=lambda: now[0], sleep=sleep, wait_seconds=60)
    from chalicelib.oauth import RefreshRefused
    with pytest.raises(RefreshRefused) as caught:
        keeper.access_token("died", integration)
    assert "install the integration again" in caught.value.message
    assert store.get_tokens("died")["failure"]["code"] == 401


def test_the_sandbox_keeps_amocrms_lifetimes_by_its_own_clock(amo):
    """Codes live 20 minutes and work once, access tokens 24 h, refresh tokens 3 months and work once."""
    import requests
    amo.register_integration(client_id="c", client_secret="s", redirect_uri="https://r.example/cb")
    amo.clock_offset = 0.0

    def code():
        return parse_qs(urlsplit(amo.consent_redirect("c", "st")).query)["code"][0]

    def token(**grant):
        return requests.post(amo.url + "/oauth2/access_token", timeout=5, json={
            "client_id": "c", "client_secret": "s", "redirect_uri": "https://r.example/cb", **grant})

    def api(access):
        return requests.get(amo.url + "/api/v4/account", headers={"Authorization": f"Bearer {access}"}, timeout=5)
    late = code()
    amo.advance(20 * 60 + 1)
    assert token(grant_type="authorization_code", code=late).status_code == 400
    first = code()
    pair = token(grant_type="authorization_code", code=first).json()
    assert pair["expires_in"] == 86400 and api(pair["access_token"]).status_code == 200
    assert token(grant_type="authorization_code", code=first).status_code == 400  # once
    assert token(grant_type="authorization_code", code=code(), client_secret="wrong").status_code == 401
    amo.advance(86400 + 1)
    assert api(pair["access_token"]).status_code == 401
    renewed = token(grant_type="refresh_token", refresh_token=pair["refresh_token"])
    assert renewed.status_code == 200 and api(renewed.json()["access_token"]).status_code == 200
    again = token(grant_type="refresh_token", refresh_token=pair["refresh_token"])
    assert again.status_code == 401 and again.json()["detail"] == "Token has been revoked"
    amo.advance(90 * 86400 + 1)
    assert token(grant_type="refresh_token", refresh_token=renewed.json()["refresh_token"]).status_code == 401
    amo.clock_offset = 0.0


def test_a_webhook_call_answered_429_is_tried_once_more_after_its_retry_after():
    """Registering or removing our webhook runs outside the worker's rate limiter, so deliveries of the
    same moment may have spent the account's 7 requests a second: a 429 is tried once more (seen in CI:
    a deletion right after deliveries was refused and the webhook left registered)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    seen: list[tuple[str, str]] = []
    answers = {"DELETE": [429, 204], "POST": [429, 429]}

    class Amo(BaseHTTPRequestHandler):
        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path))
            status = answers[self.command].pop(0)
            self.send_response(status)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        do_DELETE = do_POST = _answer

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Amo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        oauth = AmoOAuth(CLIENT_ID, lambda: CLIENT_SECRET, PUBLIC + "/oauth/amocrm", sandbox_hosts=(host,))
        oauth.unregister_webhook(f"http://{host}", "access", PUBLIC + "/webhooks/amocrm/x?secret=s")
        assert seen == [("DELETE", "/api/v4/webhooks")] * 2
        with pytest.raises(Transient):  # a second 429 is the caller's to report
            oauth.register_webhook(f"http://{host}", "access", PUBLIC + "/webhooks/amocrm/x?secret=s")
        assert seen[2:] == [("POST", "/api/v4/webhooks")] * 2
    finally:
        server.shutdown()
        server.server_close()
