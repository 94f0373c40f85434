"""The web console's API (issue 17): console links (made, listed, revoked; what a link's token may and
may not reach), the integrations list, stages beside the mapping, delivery by day, the page's files
and their headers, and JSON answers in UTF-8 text."""
from __future__ import annotations

import json
import re

import pytest

from chalicelib import console_api, console_links
from chalicelib.errors import ApiError, Unavailable
from chalicelib.store.memory import MemoryStore
from tests.conftest import ADMIN_TOKEN, AMO_SECRET, AMO_TOKEN, METRIKA_TOKEN, admin_headers, amocrm_config

YEAR_2100 = 4_102_444_800


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


@pytest.fixture
def fresh_links():
    """Each test starts with an empty cache of link answers (a revocation is otherwise seen after 30 s)."""
    import app
    app._CONSOLE_LINKS = None
    yield
    app._CONSOLE_LINKS = None


class FakeAmoCrm:
    """The amoCRM source's reads the console makes, without a CRM (these integrations name none)."""

    def __init__(self, disabled=False):
        self.disabled = disabled

    def webhook_health(self, integration, integration_id):
        return {"registered": True, "disabled": self.disabled, "events": ["update_lead"]}

    def default_mapping(self, integration):
        return [{"crm_status": "7001:142", "metrika_status_id": "won", "humanized": "Успешно реализовано", "type": "PAID"}]


@pytest.fixture
def fake_crm(app_client):
    import app
    app._SOURCES.clear()
    app._SOURCES.update(amocrm=FakeAmoCrm(disabled=True), bitrix24=FakeAmoCrm())
    yield
    app._SOURCES.clear()


def make_integration(client, integration_id, **overrides):
    config = amocrm_config(timezone="Europe/Moscow", **overrides)
    answer = client.http.put(f"/integrations/{integration_id}", headers=admin_headers(), body=json.dumps(config))
    assert answer.status_code == 200, answer.json_body


def make_link(client, integration_id, label="Ольга, маркетинг"):
    answer = client.http.post(f"/integrations/{integration_id}/console-links", headers=admin_headers(),
                              body=json.dumps({"label": label}))
    assert answer.status_code == 200, answer.json_body
    return answer.json_body


def token_of(link: dict) -> str:
    return link["link"].split("#link=", 1)[1]


# --- UTF-8 answers --------------------------------------------------------------------------------------

def test_json_answers_are_utf8_text_with_their_charset(app_client, integration_id, metrika_sandbox):
    make_integration(app_client, integration_id)
    entries = [{"crm_status": "7001:142", "metrika_status_id": "won", "humanized": "Успешно реализовано", "type": "PAID"}]
    put = app_client.http.put(f"/integrations/{integration_id}/status-mapping", headers=admin_headers(),
                              body=json.dumps({"entries": entries}))
    assert put.status_code == 200
    got = app_client.http.get(f"/integrations/{integration_id}/status-mapping", headers=admin_headers())
    assert got.headers["Content-Type"] == "application/json; charset=utf-8"
    assert "Успешно реализовано".encode() in got.body and b"\\u04" not in got.body
    assert got.json_body["entries"][0]["humanized"] == "Успешно реализовано"
    # Errors too: a 400 naming a Cyrillic field value.
    bad = app_client.http.put(f"/integrations/{integration_id}/status-mapping", headers=admin_headers(),
                              body=json.dumps({"entries": [{**entries[0], "type": "ОПЛАЧЕН"}]}))
    assert bad.status_code == 400 and bad.headers["Content-Type"] == "application/json; charset=utf-8"
    assert b"\\u04" not in bad.body


# --- console links through the API -----------------------------------------------------------------------------

def test_a_console_link_is_shown_once_listed_without_its_token_and_revoked(app_client, integration_id, fresh_links):
    make_integration(app_client, integration_id)
    made = make_link(app_client, integration_id)
    assert re.fullmatch(rf"http://[^/]+/console#link=cl1\.{integration_id}\.[0-9a-f]{{16}}\.[A-Za-z0-9_-]{{43}}", made["link"])
    assert made["label"] == "Ольга, маркетинг"
    listed = app_client.http.get(f"/integrations/{integration_id}/console-links", headers=admin_headers())
    assert listed.json_body["links"] == [{"link_id": made["link_id"], "label": made["label"], "created_at": made["created_at"]}]
    assert token_of(made) not in listed.body.decode() and "hash" not in listed.body.decode()
    # Stored as its SHA-256 digest only.
    import app
    stored = app.get_store().get_console_link(integration_id, made["link_id"])
    assert stored["hash"] == console_links.digest(token_of(made)) and token_of(made) not in json.dumps(stored)
    token = token_of(made)
    assert app_client.http.get(f"/integrations/{integration_id}/status-mapping", headers=bearer(token)).status_code == 200
    revoked = app_client.http.delete(f"/integrations/{integration_id}/console-links/{made['link_id']}", headers=admin_headers())
    assert revoked.json_body == {"revoked": made["link_id"]}
    again = app_client.http.delete(f"/integrations/{integration_id}/console-links/{made['link_id']}", headers=admin_headers())
    assert again.status_code == 404
    app._CONSOLE_LINKS = None  # past the cache's 30 s (ConsoleLinks' own test covers the timing)
    assert app_client.http.get(f"/integrations/{integration_id}/status-mapping", headers=bearer(token)).status_code == 403


@pytest.mark.parametrize("body, field", [({"label": "x" * 101}, "label"), ({"label": True}, "label"),
                                         ({"label": "a\nb"}, "label"), ({"label": "ok", "token": "mine"}, None),
                                         (["label"], None)])
def test_a_bad_link_request_is_a_400(app_client, integration_id, body, field):
    make_integration(app_client, integration_id)
    answer = app_client.http.post(f"/integrations/{integration_id}/console-links", headers=admin_headers(),
                                  body=json.dumps(body))
    assert answer.status_code == 400, answer.json_body
    assert field is None or field in answer.json_body["details"]


def test_a_link_for_an_unknown_integration_is_a_404_and_a_bad_link_id_a_400(app_client, integration_id):
    assert app_client.http.post(f"/integrations/{integration_id}/console-links", headers=admin_headers(),
                                body="{}").status_code == 404
    make_integration(app_client, integration_id)
    bad = app_client.http.delete(f"/integrations/{integration_id}/console-links/ZZZ", headers=admin_headers())
    assert bad.status_code == 400 and "link_id" in bad.json_body["details"]


def test_a_link_reaches_only_its_own_integrations_console_routes(app_client, integration_id, metrika_sandbox,
                                                                  fresh_links, fake_crm):
    other = integration_id + "-b"
    make_integration(app_client, integration_id)
    make_integration(app_client, other, counter_id=4343)
    try:
        token = token_of(make_link(app_client, integration_id))
        mine = f"/integrations/{integration_id}"
        assert app_client.http.get(mine + "/summary", headers=bearer(token)).json_body == {
            "integration_id": integration_id, "crm": "amocrm", "counter_id": 4242, "timezone": "Europe/Moscow",
            "currency": None, "id_prefix": None, "crm_account": "shop.amocrm.ru"}
        entries = [{"crm_status": "7001:142", "metrika_status_id": "won", "humanized": "Успешно", "type": "PAID"}]
        put = app_client.http.put(mine + "/status-mapping", headers=bearer(token), body=json.dumps({"entries": entries}))
        assert put.status_code == 200, put.json_body
        for path in (mine + "/status", mine + "/delivery", mine + "/attributes", mine + "/backfill", mine + "/stages",
                     mine + "/fields", mine + "/status-mapping/defaults"):
            answer = app_client.http.get(path, headers=bearer(token))
            assert answer.status_code == 200, (path, answer.json_body)
            text = answer.body.decode()
            assert not any(secret in text for secret in (METRIKA_TOKEN, AMO_TOKEN, AMO_SECRET, ADMIN_TOKEN, "********"))
        refused = [("GET", f"/integrations/{other}/status-mapping"), ("PUT", f"/integrations/{other}/status-mapping"),
                   ("GET", f"/integrations/{other}/summary"), ("GET", f"/integrations/{other}/status"),
                   ("GET", "/integrations"), ("GET", mine), ("PUT", mine), ("DELETE", mine),
                   ("POST", mine + "/console-links"), ("GET", mine + "/console-links"), ("GET", "/dead-letters"),
                   ("POST", mine + "/reconcile"), ("POST", mine + "/backfill/stop"), ("POST", mine + "/products/sync")]
        for method, path in refused:
            answer = app_client.http.request(method, path, headers=bearer(token), body=b"{}")
            assert answer.status_code == 403, (method, path, answer.status_code)
        assert app_client.http.get(f"/integrations/{other}", headers=admin_headers()).status_code == 200  # still there
        # The other integration's mapping was not changed by the refused PUT.
        assert app_client.http.get(f"/integrations/{other}/status-mapping", headers=admin_headers()).json_body["entries"] == []
    finally:
        app_client.http.delete(f"/integrations/{other}", headers=admin_headers())


def test_the_routes_refuse_a_link_even_when_its_policy_were_too_broad(app_client, integration_id, fresh_links,
                                                                      monkeypatch):
    """Defence in depth: with the authorizer's policy opened to every route (as a mis-enforced or
    mis-cached policy would be), the routes' own check still keeps a link to its integration's console."""
    import chalicelib.console_links
    other = integration_id + "-b"
    make_integration(app_client, integration_id)
    make_integration(app_client, other, counter_id=4343)
    try:
        token = token_of(make_link(app_client, integration_id))
        monkeypatch.setattr(chalicelib.console_links, "policy_routes", lambda iid: [("*", ["*"])])
        monkeypatch.setattr("app.AuthRoute", lambda path, methods: "*")
        assert app_client.http.get(f"/integrations/{integration_id}/attributes", headers=bearer(token)).status_code == 200
        for method, path in [("GET", f"/integrations/{other}/attributes"), ("GET", f"/integrations/{integration_id}"),
                             ("GET", "/integrations"), ("GET", "/dead-letters"),
                             ("DELETE", f"/integrations/{integration_id}")]:
            answer = app_client.http.request(method, path, headers=bearer(token), body=b"")
            assert answer.status_code == 403 and answer.json_body["error"] == "forbidden", (method, path)
            assert "console link" in answer.json_body["message"], answer.json_body  # the route's check, not the policy's
        assert app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).status_code == 200
    finally:
        app_client.http.delete(f"/integrations/{other}", headers=admin_headers())


def test_forged_link_tokens_open_nothing(app_client, integration_id, fresh_links):
    other = integration_id + "-b"
    make_integration(app_client, integration_id)
    make_integration(app_client, other, counter_id=4343)
    try:
        made = make_link(app_client, integration_id)
        _, iid, link_id, secret = token_of(made).split(".")
        forged = [f"cl1.{iid}.{link_id}.{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}",  # one character off
                  f"cl1.{other}.{link_id}.{secret}",  # the same link id under another integration
                  f"cl1.{iid}.{link_id}.{secret}.x", f"cl2.{iid}.{link_id}.{secret}", "cl1...", "x" * 5000,
                  f"cl1.{iid}.{link_id}.{secret}\ud800"]
        for token in forged:
            for path in (f"/integrations/{iid}/status-mapping", f"/integrations/{other}/status-mapping"):
                answer = app_client.http.get(path, headers={"Authorization": f"Bearer {token}"})
                assert answer.status_code in (401, 403), (token[:60], path, answer.status_code)
    finally:
        app_client.http.delete(f"/integrations/{other}", headers=admin_headers())


def test_a_deleted_integration_takes_its_links_along(app_client, integration_id, fresh_links):
    make_integration(app_client, integration_id)
    token = token_of(make_link(app_client, integration_id))
    assert app_client.http.delete(f"/integrations/{integration_id}", headers=admin_headers()).status_code == 200
    make_integration(app_client, integration_id)  # the same id again: a new integration, not the old links'
    import app
    app._CONSOLE_LINKS = None
    assert app_client.http.get(f"/integrations/{integration_id}/summary", headers=bearer(token)).status_code == 403


# --- the link cache and the access check (pure) --------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_link_answers_are_cached_briefly_bounded_and_refuse_when_the_store_is_down(monkeypatch):
    store, clock = MemoryStore(), Clock()
    store.put_integration("shop", {"crm": "amocrm"})
    made = console_links.create(store, "shop", {"label": "x"}, "https://h/api", now=YEAR_2100)
    token = token_of(made)
    reads = []

    def get_link(integration_id, link_id):
        reads.append(link_id)
        return store.get_console_link(integration_id, link_id)
    links = console_links.ConsoleLinks(get_link, ttl=30, clock=clock)
    assert links.integration_for(token) == "shop" and links.integration_for(token) == "shop"
    assert len(reads) == 1  # the second answer came from the cache
    console_links.revoke(store, "shop", made["link_id"])
    clock.t += 29
    assert links.integration_for(token) == "shop"  # within the cache's time
    clock.t += 2
    assert links.integration_for(token) is None  # revoked, seen after 30 s
    assert links.integration_for("not a link token") is None and len(reads) == 2  # no read for a malformed token

    def down(integration_id, link_id):
        raise Unavailable("store", "down")
    assert console_links.ConsoleLinks(down, clock=clock).integration_for(token) is None
    monkeypatch.setattr(console_links, "CACHE_ENTRIES", 3)
    for n in range(10):
        links.integration_for(f"cl1.shop.{n:016x}.{'s' * 43}")
    assert len(links._cache) == 3


def test_the_access_check_lets_a_link_reach_only_its_routes():
    link = {"role": "console", "integration_id": "shop", "principalId": "console:shop"}
    console_links.check_access(link, "GET", "/integrations/{integration_id}/status-mapping", "shop")
    console_links.check_access({"role": "admin"}, "DELETE", "/integrations/{integration_id}", "other")
    console_links.check_access(None, "POST", "/webhooks/amocrm/{integration_id}", "shop")
    with pytest.raises(ApiError) as other:
        console_links.check_access(link, "GET", "/integrations/{integration_id}/status-mapping", "other")
    assert other.value.status == 403 and "another integration" in other.value.message
    with pytest.raises(ApiError) as route:
        console_links.check_access(link, "DELETE", "/integrations/{integration_id}", "shop")
    assert route.value.status == 403
    with pytest.raises(ApiError):
        console_links.check_access(link, "GET", "/integrations", None)
    assert {path for path, _ in console_links.policy_routes("shop")} == {
        r.replace("{integration_id}", "shop") for _, r in console_links.CONSOLE_ROUTES}


def test_every_console_route_exists_in_the_app():
    import app
    for method, route in console_links.CONSOLE_ROUTES:
        assert method in app.app.routes[route], (method, route)


# --- the page's files ---------------------------------------------------------------------------------------

def test_the_page_and_its_files_are_served_with_strict_headers(app_client):
    page = app_client.http.get("/console")
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    for name, kind in [("console.js", "text/javascript"), ("console.css", "text/css"), ("i18n.js", "text/javascript")]:
        answer = app_client.http.get(f"/console/{name}")
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith(kind)
    for answer in (page, app_client.http.get("/console/console.js")):
        csp = answer.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert answer.headers["Cache-Control"].startswith("public, max-age=")
    for name in ("..%2Fapp.py", "app.py", "index.htm", "console.JS", "%2e%2e"):
        assert app_client.http.get(f"/console/{name}").status_code == 404, name


def test_the_page_has_no_inline_script_style_or_handler():
    html = (console_api.CONSOLE_DIR / "index.html").read_text()
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))
    assert "<style" not in html and not re.search(r"\sstyle=", html) and not re.search(r"\son\w+=", html)
    for name in console_api.ASSETS:
        assert (console_api.CONSOLE_DIR / name).is_file(), name
    js = "".join((console_api.CONSOLE_DIR / n).read_text() for n in console_api.ASSETS if n.endswith(".js"))
    assert ".innerHTML" not in js and "outerHTML" not in js and "eval(" not in js and "localStorage.setItem(\"mcb.token" not in js
    assert "sessionStorage" in js and "history.replaceState" in js


def test_the_link_base_follows_the_stage_path():
    class Request:
        headers = {"Host": "abc.execute-api.eu-central-1.amazonaws.com", "X-Forwarded-Proto": "https"}
        context = {"path": "/api/integrations/shop/console-links"}
    assert console_api.base_url(Request(), "/integrations/shop/console-links") == \
        "https://abc.execute-api.eu-central-1.amazonaws.com/api"
    Request.context = {"path": "/integrations/shop/console-links"}
    Request.headers = {"host": "127.0.0.1:8000"}
    assert console_api.base_url(Request(), "/integrations/shop/console-links") == "http://127.0.0.1:8000"


# --- the integrations list, stages and delivery figures ------------------------------------------------------

def test_the_integrations_list_pages_with_health(app_client, integration_id, monkeypatch, fake_crm):
    import app
    from chalicelib.store.dynamodb import DynamoStore
    ids = [integration_id + s for s in ("-a", "-b", "-c")]
    monkeypatch.setattr(DynamoStore, "list_integration_ids", lambda self: ids)  # other tests' integrations aside
    for n, iid in enumerate(ids):
        make_integration(app_client, iid, counter_id=5000 + n)
    try:
        first = app_client.http.get("/integrations?limit=2", headers=admin_headers()).json_body
        assert [i["integration_id"] for i in first["integrations"]] == ids[:2] and first["next"] == ids[1]
        row = first["integrations"][0]
        assert row["crm"] == "amocrm" and row["counter_id"] == 5000 and "connection" not in row
        assert row["health"]["backlog"] == 0 and row["health"]["complete"] is True
        assert row["health"]["webhook"] == {"registered": True, "disabled": True, "events": ["update_lead"]}
        used = app.get_metrika({"metrika_token": METRIKA_TOKEN}).governor.used_today()  # the token's day, shared
        assert row["health"]["metrika_requests_left_today"] == 5000 - used
        second = app_client.http.get(f"/integrations?limit=2&after={ids[1]}", headers=admin_headers()).json_body
        assert [i["integration_id"] for i in second["integrations"]] == ids[2:] and second["next"] is None
        for bad in ("0", "101", "x", "1e3", "9" * 2000, "%D9%A3", "-1", "%201"):
            answer = app_client.http.get(f"/integrations?limit={bad}", headers=admin_headers())
            assert answer.status_code == 400 and "limit" in answer.json_body["details"], bad
        assert app_client.http.get("/integrations?after=a%20b", headers=admin_headers()).status_code == 400
        assert app_client.http.get("/integrations").status_code == 401
    finally:
        for iid in ids:
            app_client.http.delete(f"/integrations/{iid}", headers=admin_headers())


def test_stages_show_names_mapping_and_held_deals_per_stage():
    from chalicelib.crm import EntityRef
    store = MemoryStore()
    store.put_integration("shop", {"crm": "amocrm", "counter_id": 1})
    store.put_status_mapping("shop", [{"crm_status": "7001:142", "metrika_status_id": "won", "type": "PAID",
                                       "humanized": "Успешно"},
                                      {"crm_status": "9:9", "metrika_status_id": "old", "type": "PAID"}], 1_700_000_000)
    for crm_id, stage in (("1", "7001:1002"), ("2", "7001:1002"), ("3", "8:8")):
        store.mark_dirty("shop", EntityRef("order", crm_id, 100, "update"), now=1000, lease_seconds=60, future_skew=600)
        seen = store.claim("shop", "order", crm_id)
        store.mark_failed("shop", "order", crm_id, event_time=seen["event_time"],
                          error={"code": "unmapped_stage", "crm_status": stage, "message": "held"})
    proposed = [{"crm_status": "7001:1002", "metrika_status_id": "amo_7001_1002", "humanized": "Продажи: Переговоры",
                 "type": "IN_PROGRESS"},
                {"crm_status": "7001:142", "metrika_status_id": "won", "humanized": "Успешно реализовано", "type": "PAID"}]
    answer = console_api.stages(store, proposed, "shop")
    rows = {r["crm_status"]: r for r in answer["stages"]}
    assert rows["7001:1002"]["held"] == 2 and rows["7001:1002"]["mapped"] is None
    assert rows["7001:1002"]["name"] == "Продажи: Переговоры"
    assert rows["7001:142"]["name"] == "Продажи: Успешно реализовано"  # the pipeline named for won/lost too
    assert rows["7001:142"]["mapped"]["metrika_status_id"] == "won"
    assert rows["9:9"]["in_crm"] is False and rows["8:8"]["held"] == 1 and rows["8:8"]["in_crm"] is False
    assert answer["held_total"] == 3 and answer["pushed_at"] == 1_700_000_000


def test_delivery_figures_by_day_count_each_order_once_by_its_last_send():
    from chalicelib.crm import EntityRef
    now = [1_764_460_800.0]  # 2025-11-30 00:00 UTC
    store = MemoryStore(clock=lambda: now[0])

    def sent(crm_id, at, **facts):
        now[0] = at
        store.mark_dirty("shop", EntityRef("order", crm_id, 100, "update"), now=at, lease_seconds=60, future_skew=600)
        seen = store.claim("shop", "order", crm_id)
        store.mark_clean("shop", "order", crm_id, event_time=seen["event_time"], content_hash="h", row_hashes=None,
                         uploading_id=None, facts={"order": True, **facts})
    day = 86400
    sent("1", 1_764_460_800 - 2 * day + 10, with_client_id=True, with_phone=True)
    sent("2", 1_764_460_800 - 2 * day + 20, with_email=True, late=True)
    sent("3", 1_764_460_800 - day, with_client_id=True)
    sent("old", 1_764_460_800 - 40 * day, with_client_id=True)  # older than the 30 days shown
    series = console_api.delivery_series(store, "shop", now=1_764_460_800)
    assert series["days"] == [
        {"day": "2025-11-28", "orders": 2, "with_client_id": 1, "with_phone": 1, "with_email": 1, "late": 1},
        {"day": "2025-11-29", "orders": 1, "with_client_id": 1, "with_phone": 0, "with_email": 0, "late": 0}]
    sent("1", 1_764_460_800 - day + 5, with_client_id=True)  # sent again: counted on its last day only
    days = console_api.delivery_series(store, "shop", now=1_764_460_800)["days"]
    assert [(d["day"], d["orders"]) for d in days] == [("2025-11-28", 1), ("2025-11-29", 2)]


def test_the_health_summary_is_read_in_bounded_time(monkeypatch):
    store = MemoryStore()
    calls = []
    monkeypatch.setattr(store, "entity_summary", lambda iid, limit: calls.append(limit) or {"scanned": 0})
    console_api.health(store, "shop", requests_left=1, webhook=None)
    assert calls == [console_api.SUMMARY_ENTITIES]


# --- the CRMs' fields, for the attributes page ------------------------------------------------------------

def test_amocrm_fields_are_listed_with_their_names_through_the_api(app_client, integration_id, amocrm, fresh_links):
    import app
    app._SOURCES.clear()  # the real sources
    make_integration(app_client, integration_id, connection={
        "base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": AMO_SECRET})
    amocrm.reset()
    token = token_of(make_link(app_client, integration_id))
    answer = app_client.http.get(f"/integrations/{integration_id}/fields", headers=bearer(token))
    assert answer.status_code == 200, answer.json_body
    fields = {(f["entity"], f["id"]): f for f in answer.json_body["fields"]}
    assert fields[("order", "752015")] == {"id": "752015", "name": "Способ оплаты", "code": None, "entity": "order",
                                           "type": "select"}
    assert fields[("contact", "735653")]["name"] == "Должность"
    assert "Способ оплаты".encode() in answer.body  # UTF-8 text


def test_bitrix24_fields_are_named_by_their_labels(bitrix):
    from chalicelib.crm.bitrix24.source import Bitrix24Source
    bitrix.reset()
    source = Bitrix24Source(MemoryStore().reserve_slot)
    integration = {"crm": "bitrix24", "counter_id": 1, "connection": {"webhook_url": bitrix.webhook_url,
                                                                     "application_token": "t" * 32}}
    fields = {(f["entity"], f["id"]): f["name"] for f in source.fields(integration)}
    assert fields[("order", "UF_CRM_COST")] == "Себестоимость"  # a user field: its label, not its code
    assert fields[("order", "TITLE")] == "Название" and fields[("contact", "POST")] == "Должность"


def test_a_crm_that_refuses_the_field_listing_is_a_422_naming_it():
    from chalicelib.errors import Misconfigured

    class Refusing:
        def fields(self, integration):
            raise Misconfigured("401 Unauthorized: the token was revoked", source="amocrm", status=401)
    store = MemoryStore()
    store.put_integration("shop", {"crm": "amocrm"})
    with pytest.raises(ApiError) as refused:
        console_api.crm_fields(store, {"amocrm": Refusing()}, "shop")
    assert refused.value.status == 422 and "could not read the CRM's fields" in refused.value.message
    assert console_api.crm_fields(store, {"amocrm": object()}, "shop") == {"integration_id": "shop", "fields": []}


def test_the_integrations_page_keeps_the_requests_deadline_on_its_threads():
    from chalicelib import deadline
    store = MemoryStore()
    for n in range(5):
        store.put_integration(f"shop-{n}", {"crm": "amocrm", "counter_id": n})
    seen = []

    def health(integration_id, config):
        seen.append(deadline.remaining())
        return {}
    with deadline.invocation(20.0):
        page = console_api.page_of_integrations(store, after="shop-0", limit="3", health=health)
    assert [r["integration_id"] for r in page["integrations"]] == ["shop-1", "shop-2", "shop-3"]
    assert page["next"] == "shop-3" and len(seen) == 3
    assert all(r is not None and 0 < r <= 20.0 for r in seen), seen


@pytest.mark.parametrize("method, path, headers", [
    ("POST", "/console", {}),  # Chalice's own 405
    ("DELETE", "/oauth/amocrm/disable", {}),
    ("POST", "/install/bitrix24", {"Content-Type": "application/json"}),  # Chalice's own 415
])
def test_chalices_own_refusals_name_their_charset_too(app_client, method, path, headers):
    """The answers Chalice writes itself and `one_error_shape` reshapes are JSON in UTF-8 like every
    other: their Content-Type names the charset (sweep of issue 17)."""
    answer = app_client.http.request(method, path, headers=headers, body=b"{}")
    assert answer.status_code in (405, 415) and answer.json_body["error"] in ("method_not_allowed",
                                                                                "unsupported_media_type")
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"


def test_delivery_counts_a_send_time_past_now_on_today_never_a_day_in_2100():
    now = 1_764_460_800.0  # 2025-11-30 00:00 UTC

    class Entities:
        def console_entities(self, integration_id, limit):
            return [{"kind": "order", "sent_at": sent, "facts": {"order": True}}
                    for sent in (4_102_444_800, 1e300, True, "1764460800", now - 10)], True
    days = console_api.delivery_series(Entities(), "shop", now=now)["days"]
    # The two sends past now (a clock in 2100; one past datetime's range) count on today; a boolean or
    # a text time is no send at all.
    assert days == [{"day": "2025-11-29", "orders": 1, "with_client_id": 0, "with_phone": 0, "with_email": 0, "late": 0},
                    {"day": "2025-11-30", "orders": 2, "with_client_id": 0, "with_phone": 0, "with_email": 0, "late": 0}]
