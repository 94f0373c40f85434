"""The Bitrix24 application over loopback: install (verified at the sandbox's OAuth server) → offline events
→ drain → worker → Metrika sandbox; uninstall; forged installs and events; the portal or our endpoint
down while events queue; the access token's refresh by one worker of many.

Logic on the in-memory store and queue with a fake clock (tests/core.py); the Bitrix24 sandbox plays the
portal, its OAuth server and its offline-event queue."""
from __future__ import annotations

import time
from urllib.parse import urlencode

import pytest

from chalicelib.bitrix24_app import Bitrix24App, drain, handler_base, tokens_for
from chalicelib.crm.bitrix24.api import Bitrix24Client
from chalicelib.crm.bitrix24.app_events import OFFLINE_EVENTS, integration_id_for, parse_install, parse_offline_page
from chalicelib.crm.bitrix24.oauth import Bitrix24OAuth, parse_grant
from chalicelib.crm.bitrix24.source import Bitrix24Source
from chalicelib.crm import EntityRef, WebhookError
from chalicelib.errors import ApiError, Misconfigured, Permanent, Transient
from chalicelib.queue import DRAIN, message
from sandbox.bitrix24 import seed_demo
from sandbox.httpserver import Reply, SandboxServer
from tests.core import Clock, Core, at_once

import json

HANDLER = "http://127.0.0.1:9"  # our API as the install names it: nobody listens, so nudges fail fast


def _body(item: str) -> dict:
    return json.loads(item)


def no_wait(*args):
    return 0.0


class Rig:
    """The app wired to the sandbox portal: `Core` (memory store and queue, the worker, Metrika sandbox)
    with a Bitrix24 source whose application calls take their token from the TOKENS item."""

    def __init__(self, bitrix, metrika_sandbox, *, secret: str | None = None) -> None:
        self.bitrix = bitrix
        self.core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={}, threads=1)
        self.oauth = Bitrix24OAuth(bitrix.url, bitrix.client_id, lambda: secret or bitrix.client_secret,
                                   clock=self.core.clock)
        self.app = Bitrix24App(self.core.store, self.core.queue, self.oauth, allow_loopback=True, clock=self.core.clock,
                               client_for=lambda endpoint, auth: Bitrix24Client(endpoint, auth=auth, attempts=1))
        self.core.sources["bitrix24"] = Bitrix24Source(no_wait, tokens_for=tokens_for(self.app.keeper()), attempts=1)
        self.integration_id = integration_id_for(bitrix.member_id)

    def install(self, **kwargs) -> dict:
        return self.app.install(self.bitrix.install_body(**kwargs), HANDLER)

    def configure(self, metrika_sandbox) -> None:
        """What the operator PUTs after the install: the counter, its token and the status mapping."""
        store, iid = self.core.store, self.integration_id
        store.put_integration(iid, {**store.get_integration(iid), "counter_id": self.core.counter_id,
                                    "metrika_token": "y0_b24app", "timezone": "Europe/Moscow",
                                    "client_id_field": "UF_CRM_YM_CLIENT_ID", "deleted_deal_status": "CANCELLED"})
        mapping = self.core.sources["bitrix24"].default_mapping(store.get_integration(iid))
        store.put_status_mapping(iid, mapping, 0)
        metrika_sandbox.counter(self.core.counter_id).order_statuses.update(
            {e["metrika_status_id"]: {"id": e["metrika_status_id"], "type": e["type"]} for e in mapping})

    def drain_job(self) -> None:
        self.core.queue.send([message(self.integration_id, DRAIN, str(int(self.core.clock())))])
        self.core.drain()


@pytest.fixture
def portal(bitrix):
    bitrix.reset()
    return seed_demo(bitrix)


@pytest.fixture
def rig(bitrix, portal, metrika_sandbox):
    return Rig(bitrix, metrika_sandbox)


def orders_sent(metrika_sandbox, counter_id: int = 7070) -> dict:
    """The orders Metrika holds, by id (tests/core.py's counter)."""
    return dict(metrika_sandbox.counter(counter_id).orders)


def uploads(metrika_sandbox) -> int:
    return sum(1 for r in metrika_sandbox.requests if r["path"].endswith("/data/orders/json"))


class Attacker(SandboxServer):
    """A loopback server a forged install points at: it records whatever reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        for method in ("GET", "POST"):
            self.route(method, r"/.*", self._record)

    def _record(self, request) -> Reply:
        self.seen.append(f"{request.method} {request.path} {request.body[:200]!r} {request.query}")
        return Reply(200, {"result": True})


@pytest.fixture
def attacker():
    server = Attacker().start()
    yield server
    server.stop()


# --- install ------------------------------------------------------------------------------------------

def test_install_stores_tokens_apart_binds_offline_events_and_asks_for_the_counter(rig, bitrix):
    answer = rig.install()
    assert answer["integration_id"] == rig.integration_id == "b24-" + bitrix.member_id
    assert answer["needs"] == ["counter_id", "metrika_token"]
    config = rig.core.store.get_integration(rig.integration_id)
    assert config["connection"] == {"auth": "oauth", "member_id": bitrix.member_id, "client_endpoint": f"{bitrix.url}/rest/",
                                    "domain": "127.0.0.1", "application_token": bitrix.application_token}
    tokens = rig.core.store.get_tokens(rig.integration_id)
    assert tokens["access_token"] in bitrix.access_tokens and tokens["refresh_token"] in bitrix.refresh_tokens
    assert "access_token" not in str(config)  # the tokens live in their own item, never in the config
    handler = HANDLER + "/install/bitrix24/events"
    assert sorted((b["event"], b["event_type"], b["handler"]) for b in bitrix.bindings) == sorted(
        [(e, "offline", "") for e in OFFLINE_EVENTS] + [("ONAPPUNINSTALL", "online", handler),
                                                        ("ONOFFLINEEVENT", "online", handler)])


def test_the_same_install_twice_binds_nothing_twice_and_a_new_address_is_rebound(rig, bitrix):
    rig.install()
    again = rig.install(keep_bindings=True)
    assert again["bound"] == [] and again["unbound"] == []
    assert len(bitrix.bindings) == len(OFFLINE_EVENTS) + 2
    moved = rig.app.install(bitrix.install_body(version=2, keep_bindings=True), "https://new.example.org/api")
    assert moved["unbound"] == ["ONAPPUNINSTALL (online)", "ONOFFLINEEVENT (online)"]
    assert {b["handler"] for b in bitrix.bindings if b["event_type"] == "online"} == {
        "https://new.example.org/api/install/bitrix24/events"}
    assert len(bitrix.bindings) == len(OFFLINE_EVENTS) + 2


def test_a_reinstall_keeps_the_metrika_part_and_clears_the_uninstall(rig, bitrix, metrika_sandbox):
    rig.install()
    rig.configure(metrika_sandbox)
    rig.app.event(bitrix.app_event_body("ONAPPUNINSTALL"))
    assert rig.core.store.get_integration(rig.integration_id)["disabled"]["reason"] == "uninstalled"
    answer = rig.install()
    config = rig.core.store.get_integration(rig.integration_id)
    assert "disabled" not in config and config["metrika_token"] == "y0_b24app" and answer["needs"] == []


def test_a_refresh_token_the_oauth_server_never_issued_changes_nothing(rig, bitrix):
    with pytest.raises(ApiError) as refused:
        rig.app.install(bitrix.install_body(refresh_token="forged-refresh-token"), HANDLER)
    assert refused.value.status == 403 and "refused its refresh token" in refused.value.message
    assert rig.core.store.get_integration(rig.integration_id) is None
    assert rig.core.store.get_tokens(rig.integration_id) is None
    assert bitrix.bindings == []


def test_a_forged_domain_and_endpoints_receive_nothing(rig, bitrix, attacker):
    """The form's DOMAIN, client_endpoint and server_endpoint name the attacker: the install refreshes at
    our OAuth server, calls the endpoint that server names, and the attacker sees not one request."""
    answer = rig.app.install(bitrix.install_body(domain=attacker.url.removeprefix("http://"),
                                                 client_endpoint=attacker.url + "/rest/",
                                                 server_endpoint=attacker.url + "/rest/"), HANDLER)
    assert answer["installed"] is True
    assert attacker.seen == []
    assert rig.core.store.get_integration(rig.integration_id)["connection"]["client_endpoint"] == f"{bitrix.url}/rest/"


def test_a_portal_whose_oauth_server_names_no_bitrix24_cloud_host_is_a_422_and_writes_nothing(bitrix, metrika_sandbox):
    """An on-premise or custom-domain portal: the endpoint our OAuth server names for it is no Bitrix24
    cloud host (here the sandbox's loopback address, with loopback not allowed), so the install is refused
    with 422 after its verification and before any write (README: "On-premise portals … are refused")."""
    rig = Rig(bitrix, metrika_sandbox)
    strict = Bitrix24App(rig.core.store, rig.core.queue, rig.oauth, allow_loopback=False, clock=rig.core.clock,
                         client_for=lambda endpoint, auth: Bitrix24Client(endpoint, auth=auth, attempts=1))
    with pytest.raises(ApiError) as refused:
        strict.install(bitrix.install_body(), HANDLER)
    assert (refused.value.status, refused.value.error) == (422, "crm_refused")
    assert "client_endpoint" in refused.value.message
    assert rig.core.store.list_integration_ids() == [] and rig.core.store.get_tokens(rig.integration_id) is None


def test_a_member_id_that_is_not_the_tokens_portal_changes_nothing(rig, bitrix):
    with pytest.raises(ApiError) as refused:
        rig.app.install(bitrix.install_body(member_id="0123456789abcdef0123456789abcdef"), HANDLER)
    assert refused.value.status == 403
    assert rig.core.store.list_integration_ids() == []
    assert rig.core.store.get_tokens(integration_id_for("0123456789abcdef0123456789abcdef")) is None


def test_a_wrong_client_secret_is_refused_and_the_secret_goes_only_to_the_oauth_server(bitrix, portal, metrika_sandbox):
    rig = Rig(bitrix, metrika_sandbox, secret="not-our-secret")
    with pytest.raises(ApiError) as refused:
        rig.install()
    # invalid_client: our stage's secret is wrong, not the install (tests/test_review16.py)
    assert refused.value.status == 501 and rig.core.store.list_integration_ids() == []


@pytest.mark.parametrize("auth, field", [
    ({"member_id": "x" * 57}, "member_id"), ({"member_id": "../admin"}, "member_id"),
    ({"refresh_token": ""}, "refresh_token"), ({"application_token": "a b"}, "application_token"),
    ({"refresh_token": "r" * 2000}, "refresh_token")])
def test_a_malformed_install_is_a_400_naming_the_field(auth, field):
    base = {"member_id": "7f3c2a9be1d04c5a8e6b0d2f4a1c9e37", "refresh_token": "r1", "application_token": "a1"}
    body = urlencode({"event": "ONAPPINSTALL", **{f"auth[{k}]": v for k, v in {**base, **auth}.items()}}).encode()
    with pytest.raises(WebhookError, match=field):
        parse_install(body)
    with pytest.raises(WebhookError, match="ONAPPINSTALL"):
        parse_install(urlencode({"event": "ONCRMDEALADD"}).encode())
    assert repr(parse_install(urlencode({"event": "ONAPPINSTALL", **{f"auth[{k}]": v for k, v in base.items()}})
                              .encode())).count("r1") == 0  # tokens never in a repr


# --- offline events: install → event → drain → delivery -----------------------------------------------

def test_install_then_offline_event_then_drain_delivers_the_deal(rig, bitrix, portal, metrika_sandbox):
    rig.install()
    rig.configure(metrika_sandbox)
    deal = bitrix.create_deal("Заказ #3001", stage_id="C2:WON", category_id=2, opportunity="500.00",
                              contact_id=portal["contact_id"], products=[(17, "Чайник синий", "500.00", "1")])
    assert [r["EVENT_NAME"] for r in bitrix.offline] == ["ONCRMDEALADD"]
    assert bitrix.nudges == [0]  # our endpoint named at install is down: the queue keeps the event
    rig.drain_job()
    assert bitrix.offline == []  # cleared only after it was recorded
    order = orders_sent(metrika_sandbox)[deal["ID"]]
    assert order["order_status"] == "C2:WON" and order["revenue"] == 500
    assert order["client_uniq_id"] == portal["contact_id"]


def test_events_queued_while_the_portal_is_unreachable_are_drained_later(rig, bitrix, portal, metrika_sandbox):
    """The drain fails (the portal answers 503 for a "minute"): nothing is cleared, nothing is lost; the
    next drain records and delivers every event, and the queue empties."""
    rig.install()
    rig.configure(metrika_sandbox)
    deals = [bitrix.create_deal(f"Заказ #{n}", stage_id="C2:NEW", category_id=2, opportunity="100.00",
                                contact_id=portal["contact_id"])["ID"] for n in range(3)]
    bitrix.fail_method("event.offline.get", "", "INTERNAL_SERVER_ERROR", "Internal error")
    with pytest.raises(Transient):
        drain(rig.core.store, rig.core.queue, rig.core.sources["bitrix24"], rig.integration_id,
              rig.core.store.get_integration(rig.integration_id), clock=rig.core.clock)
    assert len(bitrix.offline) == 3
    bitrix.clear_failures()
    rig.core.clock.advance(60)
    rig.drain_job()
    assert bitrix.offline == []
    assert set(orders_sent(metrika_sandbox)) >= set(deals)


def test_a_drain_that_dies_after_reading_loses_nothing(rig, bitrix, portal, metrika_sandbox):
    """The worker dies after event.offline.get answered and before anything was recorded: the records stay
    reserved for our process id, and the next drain gets them again."""
    rig.install()
    rig.configure(metrika_sandbox)
    deal = bitrix.create_deal("Заказ #4001", stage_id="C2:NEW", category_id=2, opportunity="100.00",
                              contact_id=portal["contact_id"])
    bitrix.fail_method("event.offline.clear", "", "INTERNAL_SERVER_ERROR", "Internal error")  # no clear happens
    store = rig.core.store

    class Dies(Exception):
        pass

    original = store.mark_dirty
    store.mark_dirty = lambda *a, **k: (_ for _ in ()).throw(Dies())  # dies before recording
    with pytest.raises(Dies):
        drain(store, rig.core.queue, rig.core.sources["bitrix24"], rig.integration_id,
              store.get_integration(rig.integration_id), clock=rig.core.clock)
    store.mark_dirty = original
    assert [r["PROCESS_ID"] for r in bitrix.offline] == ["mcb-" + rig.integration_id]  # reserved, not gone
    bitrix.clear_failures()
    rig.drain_job()
    assert bitrix.offline == []
    assert deal["ID"] in orders_sent(metrika_sandbox)


def test_a_nudge_queues_one_drain_and_a_forged_nudge_nothing(rig, bitrix):
    rig.install()
    assert rig.app.event(bitrix.app_event_body("ONOFFLINEEVENT"))["queued"] == 1
    assert rig.app.event(bitrix.app_event_body("ONOFFLINEEVENT"))["queued"] == 0  # within NUDGE_SECONDS
    assert [(m["kind"], m["integration_id"]) for m in map(_body, rig.core.queue.receive(10))] == [
        (DRAIN, rig.integration_id)]
    rig.core.clock.advance(11)
    for forged in ("wrong-token", ""):
        with pytest.raises(ApiError) as refused:
            rig.app.event(bitrix.app_event_body("ONOFFLINEEVENT", forged))
        assert refused.value.status in (401, 403)
    assert rig.core.queue.receive(10) == []


def test_uninstall_stops_deliveries_and_a_forged_uninstall_changes_nothing(rig, bitrix, portal, metrika_sandbox):
    rig.install()
    rig.configure(metrika_sandbox)
    with pytest.raises(ApiError) as refused:
        rig.app.event(bitrix.app_event_body("ONAPPUNINSTALL", "forged-application-token"))
    assert refused.value.status == 403
    assert "disabled" not in rig.core.store.get_integration(rig.integration_id)
    bitrix.create_deal("Заказ #5001", stage_id="C2:NEW", category_id=2, opportunity="100.00", contact_id=portal["contact_id"])
    rig.drain_job()
    before = uploads(metrika_sandbox)
    assert before >= 1
    assert rig.app.event(bitrix.app_event_body("ONAPPUNINSTALL"))["disabled"] is True
    # Events still queued (a webhook, a stale message) are not delivered; the drain skips the integration.
    deal = rig.core.store.list_entities(rig.integration_id)[0]
    rig.core.clock.advance(60)  # past the sandbox's TIMESTAMP_X, which the drain recorded (the portal's clock)
    rig.core.ingest.requeue(rig.integration_id, [EntityRef(deal["kind"], deal["crm_id"], int(rig.core.clock()), "update")])
    bitrix.create_deal("Заказ #5002", stage_id="C2:NEW", category_id=2, opportunity="100.00", notify=True)
    rig.drain_job()
    assert uploads(metrika_sandbox) == before
    parked = rig.core.store.get_entity(rig.integration_id, deal["kind"], deal["crm_id"])
    assert not parked["dirty"] and "install it again" in parked["last_error"]["message"]  # replayable after a reinstall
    with pytest.raises(ApiError) as webhook:  # the webhook path refuses it too (410 to the token's holder)
        rig.core.ingest.bitrix24(rig.integration_id, bitrix.event_body("ONCRMDEALUPDATE", deal["crm_id"],
                                                                       bitrix.application_token))
    assert webhook.value.status == 410


# --- the access token: refresh on 401 expired_token, one refresher among many --------------------------

def test_an_expired_access_token_is_refreshed_once_and_the_call_repeated(rig, bitrix, portal, metrika_sandbox):
    rig.install()
    rig.configure(metrika_sandbox)
    bitrix.create_deal("Заказ #6001", stage_id="C2:NEW", category_id=2, opportunity="100.00", contact_id=portal["contact_id"])
    calls_before = len(bitrix.oauth_calls)
    bitrix.expire_access_tokens()  # the portal now answers 401 expired_token
    rig.drain_job()
    assert len(bitrix.oauth_calls) == calls_before + 1 and bitrix.oauth_calls[-1]["ok"]
    assert bitrix.offline == []
    assert rig.core.store.get_tokens(rig.integration_id)["access_token"] in bitrix.access_tokens


def test_the_forced_refresh_retries_at_once_and_is_not_counted_as_an_attempt(monkeypatch):
    """A 401 expired_token after a backoff: the call after the refresh goes without a pause, and the
    attempt it repeated is not spent (2 attempts: a 503, the 401 + its repeat, then the answer)."""
    class Answer:
        def __init__(self, status, body):
            self.status_code, self.content, self.headers = status, json.dumps(body).encode(), {}

    answers = [Answer(503, {"error": "QUERY_LIMIT_EXCEEDED"}), Answer(401, {"error": "expired_token"}),
               Answer(200, {"result": {"ok": True}})]
    sent, asked, slept = [], [], []

    class Session:
        def post(self, url, json, timeout, allow_redirects):
            sent.append(json["auth"])
            return answers.pop(0)

    def auth(expired):
        asked.append(expired)
        return "new-token" if expired else "old-token"
    monkeypatch.setattr(time, "sleep", slept.append)
    client = Bitrix24Client("https://portal.bitrix24.ru/rest/", session=Session(), auth=auth, attempts=2, backoff=1.0)
    assert client.call("app.info")["result"] == {"ok": True}
    assert asked == [False, True] and sent == ["old-token", "old-token", "new-token"]
    assert slept == [1.0]  # the backoff before attempt 2 only: none before the repeat


def test_two_workers_refreshing_make_one_refresh_call(rig, bitrix, portal, metrika_sandbox):
    rig.install()
    rig.configure(metrika_sandbox)
    bitrix.expire_access_tokens()
    calls_before = len(bitrix.oauth_calls)
    integration = rig.core.store.get_integration(rig.integration_id)
    answers, errors = at_once(lambda: rig.core.sources["bitrix24"].client_for(integration).call("app.info")
                              ["result"]["member_id"], 4, timeout=20)
    assert errors == [] and answers == [bitrix.member_id] * 4
    assert len(bitrix.oauth_calls) == calls_before + 1


def test_a_refresh_the_portal_refuses_parks_with_a_reinstall_message(rig, bitrix, portal, metrika_sandbox):
    rig.install()
    rig.configure(metrika_sandbox)
    deal = bitrix.create_deal("Заказ #7001", stage_id="C2:NEW", category_id=2, opportunity="100.00",
                              contact_id=portal["contact_id"])
    rig.drain_job()
    bitrix.refresh_tokens.clear()  # revoked
    bitrix.expire_access_tokens()
    rig.core.clock.advance(60)  # past the sandbox's TIMESTAMP_X, which the drain recorded (the portal's clock)
    rig.core.ingest.requeue(rig.integration_id, [EntityRef("order", deal["ID"], int(rig.core.clock()), "update")])
    rig.core.drain()
    state = rig.core.store.get_entity(rig.integration_id, "order", deal["ID"])
    failure = rig.core.store.get_tokens(rig.integration_id)["failure"]
    assert "install the application on the Bitrix24 portal again" in failure["message"]
    assert state["last_error"] and "install the application" in str(state["last_error"])


# --- pure parts ---------------------------------------------------------------------------------------

def test_offline_page_parsing_keeps_what_it_can_and_clears_the_rest():
    page = parse_offline_page({"process_id": "p1", "events": [
        {"ID": "1", "EVENT_NAME": "ONCRMDEALUPDATE", "EVENT_DATA": {"FIELDS": {"ID": 42}},
         "TIMESTAMP_X": "2026-09-21T10:00:00+03:00"},
        {"ID": "2", "EVENT_NAME": "ONCRMLEADADD", "EVENT_DATA": {"FIELDS": {"ID": "7"}}},
        {"ID": "3", "EVENT_NAME": "ONCRMCONTACTADD", "EVENT_DATA": {"FIELDS": {"ID": "9" * 30}}},
        {"ID": "4", "EVENT_NAME": "ONCRMCONTACTADD", "EVENT_DATA": {"FIELDS": {"ID": "5"}}, "TIMESTAMP_X": "2100-13-45"},
        {"EVENT_NAME": "ONCRMDEALADD", "EVENT_DATA": {"FIELDS": {"ID": "8"}}}, "not a record"]}, now=1000)
    assert page.record_ids == ["1", "2", "3", "4"]
    assert [(r.kind, r.crm_id, r.event_time) for r in page.refs] == [
        ("order", "42", 1789974000), ("contact", "5", 1000), ("order", "8", 1000)]
    assert page.skipped == 3
    for bad in (None, {}, {"process_id": ""}, {"process_id": "p", "events": "x"}):
        with pytest.raises(ValueError):
            parse_offline_page(bad, now=0)


@pytest.mark.parametrize("status, body, kind", [
    (400, b'{"error": "invalid_grant"}', Permanent), (401, b'{"error": "invalid_client"}', Misconfigured),
    (503, b'{"error": "x"}', Transient), (200, b"<html>", Transient), (302, b"", Exception),
    (200, b'{"access_token": "a", "refresh_token": "r", "member_id": "m", "client_endpoint": "https://p.bitrix24.ru/rest/",'
          b' "expires_in": true}', Transient),
    (200, b'{"access_token": "ACCESS-1", "refresh_token": "REFRESH-1", "member_id": "m", "client_endpoint": "https://p.bitrix24.ru/rest/",'
          b' "expires_in": 3600, "expires": 99999999999999999999}', None)])
def test_oauth_answers_map_to_the_taxonomy(status, body, kind):
    answer = parse_grant(status, body, now=1000)
    if kind is None:
        assert answer.expires_at == 4600 and answer.refresh_token == "REFRESH-1"  # our clock, not the 20-digit `expires`
        assert "ACCESS-1" not in repr(answer) and "REFRESH-1" not in repr(answer)
    else:
        assert isinstance(answer, kind)


def test_the_handler_address_comes_from_the_setting_or_the_host():
    assert handler_base({}, "api", "https://bridge.example.org/api") == "https://bridge.example.org/api"
    assert handler_base({"Host": "abc.execute-api.eu-central-1.amazonaws.com"}, "api", None) == \
        "https://abc.execute-api.eu-central-1.amazonaws.com/api"
    assert handler_base({"host": "127.0.0.1:8000", "x-forwarded-proto": "http"}, "api", None) == "http://127.0.0.1:8000"
    for headers in ({}, {"host": "evil.com/x"}, {"host": "a@b"}):
        with pytest.raises(ApiError):
            handler_base(headers, "api", None)


def test_the_scheduled_refresh_renews_only_an_idle_applications_tokens(rig, bitrix):
    from chalicelib.bitrix24_app import keep_alive_for
    rig.install()
    rig.core.sources["bitrix24"] = Bitrix24Source(no_wait, keep_alive=keep_alive_for(rig.app.keeper()), attempts=1)
    integration = rig.core.store.get_integration(rig.integration_id)
    calls = len(bitrix.oauth_calls)
    assert rig.core.sources["bitrix24"].keep_alive(integration) is False  # refreshed at install, moments ago
    rig.core.clock.advance(19 * 86400)
    assert rig.core.sources["bitrix24"].keep_alive(integration) is False and len(bitrix.oauth_calls) == calls
    rig.core.clock.advance(2 * 86400)
    old = rig.core.store.get_tokens(rig.integration_id)["refresh_token"]
    assert rig.core.sources["bitrix24"].keep_alive(integration) is True
    assert len(bitrix.oauth_calls) == calls + 1 and old not in bitrix.refresh_tokens
    assert rig.core.sources["bitrix24"].keep_alive({"crm": "bitrix24", "connection": {"webhook_url": "x"}}) is False


# --- the routes, on the local stack (DynamoDB and SQS on moto) -----------------------------------------

@pytest.fixture
def app_env(service_env, bitrix, monkeypatch):
    from chalicelib.settings import get_settings
    monkeypatch.setenv("BITRIX24_OAUTH_URL", bitrix.url)
    monkeypatch.setenv("BITRIX24_CLIENT_ID", bitrix.client_id)
    monkeypatch.setenv("BITRIX24_CLIENT_SECRET", bitrix.client_secret)
    # The portal's 2 calls a second are the limiter's to keep (test_bitrix24.py): not this test's subject.
    monkeypatch.setattr("chalicelib.crm.bitrix24.source.MIN_INTERVAL", 0.01)
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_routes_install_configure_deliver_uninstall(app_env, app_client, bitrix, portal, queue, worker, metrika_sandbox):
    import boto3
    from chalicelib.settings import get_settings
    from tests.conftest import admin_headers
    form = {"Content-Type": "application/x-www-form-urlencoded", "Host": "127.0.0.1:9", "X-Forwarded-Proto": "http"}
    iid = integration_id_for(bitrix.member_id)
    try:
        forged = app_client.http.post("/install/bitrix24", headers=form, body=bitrix.install_body(refresh_token="nope"))
        assert forged.status_code == 403 and forged.json_body["error"] == "forbidden"
        assert app_client.http.get(f"/integrations/{iid}", headers=admin_headers()).status_code == 404
        installed = app_client.http.post("/install/bitrix24", headers=form, body=bitrix.install_body())
        assert installed.status_code == 200, installed.json_body
        assert installed.json_body["needs"] == ["counter_id", "metrika_token"]
        assert {b["handler"] for b in bitrix.bindings if b["event_type"] == "online"} == {
            "http://127.0.0.1:9/install/bitrix24/events"}
        shown = app_client.http.get(f"/integrations/{iid}", headers=admin_headers()).json_body
        assert shown["connection"]["application_token"] == "********" and "access_token" not in str(shown)
        moved = {**shown, "connection": {**shown["connection"], "client_endpoint": "https://evil.bitrix24.ru/rest/"}}
        refused = app_client.http.put(f"/integrations/{iid}", headers=admin_headers(), body=json.dumps(
            {**moved, "counter_id": 7070, "metrika_token": "y0_b24app", "timezone": "Europe/Moscow"}))
        assert refused.status_code == 400 and "connection" in refused.json_body["details"]
        saved = app_client.http.put(f"/integrations/{iid}", headers=admin_headers(), body=json.dumps(
            {**shown, "counter_id": 7070, "metrika_token": "y0_b24app", "timezone": "Europe/Moscow"}))
        assert saved.status_code == 200, saved.json_body
        assert app_client.http.post(f"/integrations/{iid}/status-mapping/defaults",
                                    headers=admin_headers()).status_code == 200
        deal = bitrix.create_deal("Заказ #8001", stage_id="C2:WON", category_id=2, opportunity="700.00",
                                  contact_id=portal["contact_id"])
        nudged = app_client.http.post("/install/bitrix24/events", headers=form,
                                      body=bitrix.app_event_body("ONOFFLINEEVENT"))
        assert nudged.status_code == 200 and nudged.json_body["queued"] == 1
        worker.drain()
        assert metrika_sandbox.counter(7070).orders[deal["ID"]]["revenue"] == 700
        assert bitrix.offline == []
        forged_uninstall = app_client.http.post("/install/bitrix24/events", headers=form,
                                                body=bitrix.app_event_body("ONAPPUNINSTALL", "forged"))
        assert forged_uninstall.status_code == 403
        gone = app_client.http.post("/install/bitrix24/events", headers=form, body=bitrix.app_event_body("ONAPPUNINSTALL"))
        assert gone.status_code == 200 and gone.json_body["disabled"] is True
        status = app_client.http.get(f"/integrations/{iid}/status", headers=admin_headers()).json_body
        assert status["disabled"]["reason"] == "uninstalled"
    finally:
        client = boto3.client("dynamodb")
        for sort_key in ("CONFIG", "STATUS_MAPPING", "TOKENS"):
            client.delete_item(TableName=get_settings().config_table,
                               Key={"pk": {"S": f"INTEGRATION#{iid}"}, "sk": {"S": sort_key}})


def test_a_record_from_the_year_2100_does_not_freeze_the_deal(rig, bitrix, portal, metrika_sandbox):
    rig.install()
    rig.configure(metrika_sandbox)
    deal = bitrix.create_deal("Заказ #9001", stage_id="C2:NEW", category_id=2, opportunity="100.00",
                              contact_id=portal["contact_id"])
    bitrix.offline[0]["TIMESTAMP_X"] = "2100-01-01T00:00:00+03:00"
    rig.drain_job()
    state = rig.core.store.get_entity(rig.integration_id, "order", deal["ID"])
    assert state["event_time"] <= rig.core.clock() + 300  # capped, as the webhook path caps it
    assert deal["ID"] in orders_sent(metrika_sandbox)


def test_the_status_page_lists_the_bound_events_and_names_what_is_missing(rig, bitrix):
    rig.install()
    source, integration = rig.core.sources["bitrix24"], rig.core.store.get_integration(rig.integration_id)
    health = source.webhook_health(integration, rig.integration_id)
    assert health == {"offline_events": sorted(OFFLINE_EVENTS), "missing": []}
    bitrix.bindings = [b for b in bitrix.bindings if b["event"] != "ONCRMDEALUPDATE"]  # an update dropped one
    health = source.webhook_health(integration, rig.integration_id)
    assert health["missing"] == ["ONCRMDEALUPDATE"] and "install the application" in health["action"]
    assert source.webhook_health({"crm": "bitrix24", "connection": {"webhook_url": "x"}}, "x") is None


def test_a_stage_without_the_client_id_or_secret_answers_501_naming_it(bitrix, portal, metrika_sandbox):
    from types import SimpleNamespace
    from chalicelib.bitrix24_app import client_secret
    rig = Rig(bitrix, metrika_sandbox)
    rig.oauth._client_id = ""
    with pytest.raises(ApiError) as refused:
        rig.install()
    assert refused.value.status == 501 and "BITRIX24_CLIENT_ID" in refused.value.message
    assert rig.core.store.list_integration_ids() == [] and bitrix.oauth_calls == []

    class NoParameter:
        def get_parameter(self, **kwargs):
            raise type("ParameterNotFound", (Exception,), {})()
    settings = SimpleNamespace(bitrix24_client_secret=None, stage="dev",
                               bitrix24_client_secret_parameter="/metrika-crm-bridge/dev/bitrix24-client-secret-x")
    rig.oauth = Bitrix24OAuth(bitrix.url, bitrix.client_id, lambda: client_secret(settings, ssm=NoParameter()))
    rig.app._oauth = rig.oauth
    with pytest.raises(ApiError) as missing:
        rig.install()
    assert missing.value.status == 501 and "bitrix24-client-secret-x" in missing.value.message


def test_two_drains_at_once_record_every_event_and_clear_the_queue(rig, bitrix, portal, metrika_sandbox):
    """A nudge's drain and a reconciliation's drain of one portal side by side: they share our process id,
    so both may read the same records; recording twice is harmless and nothing is left or lost."""
    rig.install()
    rig.configure(metrika_sandbox)
    deals = {bitrix.create_deal(f"Заказ #{n}", stage_id="C2:NEW", category_id=2, opportunity="10.00",
                                contact_id=portal["contact_id"])["ID"] for n in range(60)}  # more than a page
    integration = rig.core.store.get_integration(rig.integration_id)
    _, errors = at_once(lambda: drain(rig.core.store, rig.core.queue, rig.core.sources["bitrix24"], rig.integration_id,
                                      integration, clock=rig.core.clock), 2, timeout=30)
    assert errors == [] and bitrix.offline == []
    recorded = {e["crm_id"] for e in rig.core.store.list_entities(rig.integration_id) if e["kind"] == "order"}
    assert recorded >= deals


@pytest.mark.parametrize("body, status", [
    (b"%%%not a form" * 3, 400), (b"event=ONAPPUNINSTALL&auth[member_id]=7f3c", 401),
    (b"event=ONAPPUNINSTALL&auth[member_id]=" + b"9" * 2000 + b"&auth[application_token]=x", 400),
    ("event=ONAPPUNINSTALL&auth[member_id]=７f3c&auth[application_token]=x".encode(), 403),
    (b"event=ONOFFLINEEVENT&auth[member_id]=unknownportal&auth[application_token]=x", 403)])
def test_hostile_app_events_change_nothing(rig, bitrix, body, status):
    rig.install()
    before = rig.core.store.get_integration(rig.integration_id)
    with pytest.raises(ApiError) as refused:
        rig.app.event(body)
    assert refused.value.status == status
    assert rig.core.store.get_integration(rig.integration_id) == before and len(rig.core.queue) == 0


def test_two_installs_at_once_both_succeed_though_the_other_bound_the_events_first(rig, bitrix):
    """The same install twice at once (a double click, Bitrix24 retrying): each reads `event.get` before
    the other binds, so the second's `event.bind` meets ERROR_EVENT_HANDLER_ALREADY_EXISTS. That binding
    is what was wanted: the install succeeds, not a 422 asking to install again (sweep of issue 17)."""
    rig.install()
    stale = rig.app._client_for

    class StaleEventGet:  # event.get answered as before the other install's binds
        def __init__(self, client):
            self._client = client

        def call(self, method, params=None):
            return {"result": []} if method == "event.get" else self._client.call(method, params)
    rig.app._client_for = lambda endpoint, auth: StaleEventGet(stale(endpoint, auth))
    answer = rig.install(keep_bindings=True)
    assert answer["installed"] is True and answer["bound"] == []
    assert len(bitrix.bindings) == len(OFFLINE_EVENTS) + 2


def test_the_deployed_source_takes_an_application_token_without_the_queue(monkeypatch):
    """app.get_sources' Bitrix24 source reads an installed application's token from the TOKENS item:
    building its keeper needs no SQS client (the admin API's and the worker's CRM calls)."""
    import app
    from chalicelib.store.memory import MemoryStore

    def no_queue():
        raise AssertionError("a CRM call's token built the SQS client")
    store = MemoryStore()
    store.put_tokens(integration_id_for("7f3c"), {"access_token": "access-1", "refresh_token": "refresh-1",
                                                  "expires_at": int(time.time()) + 3600})
    monkeypatch.setattr(app, "_STORE", store)
    monkeypatch.setattr(app, "_SOURCES", {})
    monkeypatch.setattr(app, "get_queue", no_queue)
    integration = {"connection": {"auth": "oauth", "member_id": "7f3c",
                                  "client_endpoint": "https://portal.bitrix24.ru/rest/"}}
    assert app.get_sources()["bitrix24"].client_for(integration)._auth(False) == "access-1"
