"""Review of the web console (issue 17, hostile pass): path tricks, query abuse, answers' encoding."""
from __future__ import annotations

import json

import pytest

from tests.conftest import admin_headers
from tests.test_console_api import bearer, fake_crm, fresh_links, make_integration, make_link, token_of  # noqa: F401


@pytest.mark.parametrize("query, field", [
    ("limit=" + "9" * 2000, "limit"), ("limit=true", "limit"), ("limit=1.5", "limit"), ("limit=%D9%A3", "limit"),
    ("limit=", "limit"), ("limit=-1", "limit"), ("limit=0", "limit"), ("limit=101", "limit"), ("limit=%EF%BC%91", "limit"),
    ("after=%C3%BC", "after"), ("after=", "after"), ("after=" + "a" * 2000, "after"), ("after=a%2Fb", "after"),
    ("limit=1&limit=abc", "limit"), ("limit=+5", "limit"), ("limit=5%00", "limit")])
def test_integrations_list_refuses_bad_paging_with_a_json_400_naming_it(app_client, query, field):
    answer = app_client.http.get(f"/integrations?{query}", headers=admin_headers())
    assert answer.status_code == 400, (query, answer.status_code, answer.body[:200])
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
    assert field in answer.json_body["details"]


def test_path_tricks_never_reach_another_integration(app_client, integration_id, fresh_links, fake_crm):
    other = integration_id + "-b"
    make_integration(app_client, integration_id)
    make_integration(app_client, other, counter_id=4343)
    try:
        token = token_of(make_link(app_client, integration_id))
        for path in (f"/integrations/{other}/summary/", f"/integrations/{integration_id}/../{other}/summary",
                     f"/integrations/{integration_id}%2F..%2F{other}/summary", f"/integrations/{other.upper()}/summary",
                     f"/integrations/{integration_id}/summary/../../{other}/summary", f"//integrations/{other}/summary",
                     f"/integrations/{integration_id}%2Fsummary", f"/integrations/{integration_id}/summary%2F",
                     f"/integrations/{integration_id}/SUMMARY", f"/integrations/{other}/summary?integration_id={integration_id}"):
            answer = app_client.http.get(path, headers=bearer(token))
            assert answer.status_code in (400, 403, 404), (path, answer.status_code, answer.body[:200])
            assert other not in answer.body.decode() or answer.status_code != 200
    finally:
        app_client.http.delete(f"/integrations/{other}", headers=admin_headers())


@pytest.mark.parametrize("method, path, headers", [
    ("PUT", "/integrations/{id}/status-mapping", {"Content-Type": "text/plain"}),
    ("PATCH", "/integrations/{id}/summary", {}),
    ("POST", "/integrations/{id}/summary", {}),
])
def test_chalice_own_refusals_are_json_utf8_for_a_link(app_client, integration_id, fresh_links, method, path, headers):
    make_integration(app_client, integration_id)
    token = token_of(make_link(app_client, integration_id))
    answer = app_client.http.request(method, path.format(id=integration_id),
                                     headers={**bearer(token), **headers}, body=b"{}")
    assert 400 <= answer.status_code < 500, answer.status_code
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer.headers
    json.loads(answer.body.decode("utf-8"))


# --- the page's fragment handling, in Node (no browser): api.js with stub location/history/storage ---------

NODE_HARNESS = r"""
const hash = process.argv[3];
const stored = {};
globalThis.sessionStorage = { getItem: (k) => stored[k] ?? null, setItem: (k, v) => { stored[k] = String(v); },
                              removeItem: (k) => { delete stored[k]; } };
globalThis.location = { pathname: "/api/console", search: "", hash };
globalThis.history = { replaceState: (s, t, url) => { const i = url.indexOf("#");
  location.hash = i < 0 ? "" : url.slice(i); } };
const api = await import(process.argv[2]);
const integration = api.takeLinkFromFragment();
console.log(JSON.stringify({ integration, hash: location.hash, token: api.token() }));
"""

TOKEN = "cl1.shop.0123456789abcdef." + "A" * 43


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="node not installed")
@pytest.mark.parametrize("hash, taken", [
    (f"#link={TOKEN}", True), (f"#link={TOKEN}&utm_source=telegram", True), (f"#link={TOKEN}%20", True),
    (f"#link={TOKEN}\u200b", False), ("#link=" + TOKEN.replace(".", "%2E"), True), ("#link=", False),
    ("#link=%E0%A4%A", False)])
def test_a_link_token_never_stays_in_the_address_bar(tmp_path, hash, taken):
    import subprocess
    from chalicelib.console_api import CONSOLE_DIR
    harness = tmp_path / "harness.mjs"
    harness.write_text(NODE_HARNESS)
    out = subprocess.run(["node", str(harness), (CONSOLE_DIR / "api.js").as_uri(), hash], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "link=" not in result["hash"] and TOKEN not in result["hash"], result
    assert (result["token"] == TOKEN) is taken and (result["integration"] == "shop") is taken, result


class SurrogateCrm:
    """A CRM whose stage name holds a lone surrogate (JSON `"\\ud800"` decodes to one in Python)."""

    def webhook_health(self, integration, integration_id):
        return {"registered": True, "disabled": False, "events": []}

    def default_mapping(self, integration):
        return [{"crm_status": "7001:142", "metrika_status_id": "won", "humanized": "Успешно \ud800", "type": "PAID"}]


def test_a_lone_surrogate_from_the_crm_is_still_a_utf8_json_answer(app_client, integration_id, fresh_links):
    import app
    make_integration(app_client, integration_id)
    token = token_of(make_link(app_client, integration_id))
    app._SOURCES.clear()
    app._SOURCES.update(amocrm=SurrogateCrm(), bitrix24=SurrogateCrm())
    try:
        answer = app_client.http.get(f"/integrations/{integration_id}/stages", headers=bearer(token))
    finally:
        app._SOURCES.clear()
    assert answer.status_code == 200, answer.body[:300]
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
    stage = json.loads(answer.body.decode("utf-8"))["stages"][0]
    assert stage["name"].startswith("Успешно")


# --- bounded reads for the console's stages and delivery views ------------------------------------------------

from tests.test_store_contract import NOW, clock, iid, mark, store  # noqa: E402,F401


def test_console_entities_read_at_most_their_limit_orders_first_with_only_what_is_counted(store, iid):
    assert store.console_entities(iid, limit=10) == ([], True)
    for n in range(3):
        mark(store, iid, f"o{n}", NOW - 100)
    mark(store, iid, "c1", NOW - 100, kind="contact")
    claimed = store.claim(iid, "order", "o2")
    store.mark_failed(iid, "order", "o2", event_time=claimed["event_time"],
                      error={"code": "unmapped_stage", "message": "m", "crm_status": "7001:1"})
    claimed = store.claim(iid, "order", "o0")
    store.mark_clean(iid, "order", "o0", event_time=claimed["event_time"], content_hash="h", row_hashes=None,
                     uploading_id=None, facts={"order": True, "with_phone": True})
    everything, complete = store.console_entities(iid, limit=100)
    assert complete is True and [(e["kind"], e["crm_id"]) for e in everything] == [
        ("order", "o0"), ("order", "o1"), ("order", "o2"), ("contact", "c1")]
    by_id = {e["crm_id"]: e for e in everything}
    assert by_id["o0"]["facts"] == {"order": True, "with_phone": True} and isinstance(by_id["o0"]["sent_at"], (int, float))
    assert by_id["o2"]["last_error"]["crm_status"] == "7001:1" and by_id["o2"].get("dirty") is not True
    assert set().union(*everything) <= {"kind", "crm_id", "dirty", "last_error", "facts", "sent_at"}
    assert store.console_entities(iid, limit=2) == (everything[:2], False)
    assert store.console_entities(iid, limit=4) == (everything, True)


from chalicelib.store.memory import MemoryStore  # noqa: E402


class Bounded(MemoryStore):
    """A store whose whole-integration read fails the test: the console's views read a bounded number."""

    def list_entities(self, integration_id):
        raise AssertionError("the console read every entity of the integration")


def test_stages_and_delivery_read_a_bounded_number_of_entities_and_say_when_they_stopped(monkeypatch):
    from chalicelib import console_api
    from chalicelib.crm import EntityRef
    store = Bounded(clock=lambda: 1_764_460_000.0)
    for n in range(5):
        store.mark_dirty("shop", EntityRef("order", f"{n}", 100, "update"), now=1_764_460_000, lease_seconds=60,
                         future_skew=600)
        seen = store.claim("shop", "order", f"{n}")
        store.mark_failed("shop", "order", f"{n}", event_time=seen["event_time"],
                          error={"code": "unmapped_stage", "message": "m", "crm_status": "7001:1"})
    monkeypatch.setattr(console_api, "CONSOLE_ENTITIES", 3)
    proposed = [{"crm_status": "7001:1", "metrika_status_id": "a", "type": "IN_PROGRESS", "humanized": "A"}]
    staged = console_api.stages(store, proposed, "shop")
    assert staged["held_total"] == 3 and staged["complete"] is False
    series = console_api.delivery_series(store, "shop", now=1_764_460_800)
    assert series["complete"] is False
    monkeypatch.setattr(console_api, "CONSOLE_ENTITIES", 10)
    assert console_api.stages(store, proposed, "shop")["complete"] is True
    assert console_api.delivery_series(store, "shop", now=1_764_460_800)["complete"] is True


def test_a_link_put_for_an_integration_deleted_meanwhile_is_not_kept(store, iid):
    """`create` checks the integration, then puts the link: a DELETE in between must not leave a live link
    that a later integration of the same id (an amoCRM reinstall, an admin's PUT) would inherit."""
    link = {"hash": "ab" * 32, "label": "", "created_at": 1}
    assert store.put_console_link(iid, "0123456789abcdef", link) is False
    assert store.get_console_link(iid, "0123456789abcdef") is None and store.console_links(iid) == []
    store.put_integration(iid, {"crm": "amocrm", "counter_id": 1})
    assert store.get_console_link(iid, "0123456789abcdef") is None  # not inherited by the new integration
    assert store.put_console_link(iid, "0123456789abcdef", link) is True
    assert store.get_console_link(iid, "0123456789abcdef")["hash"] == "ab" * 32
    store.delete_integration(iid)


def test_creating_a_link_for_an_integration_deleted_meanwhile_is_a_404():
    from chalicelib import console_links
    from chalicelib.errors import ApiError
    store = MemoryStore()
    store.put_integration("shop", {"crm": "amocrm"})
    real_put = store.put_console_link

    def put_after_a_delete(integration_id, link_id, link):
        store.delete_integration(integration_id)  # the DELETE lands between the check and the put
        return real_put(integration_id, link_id, link)
    store.put_console_link = put_after_a_delete
    with pytest.raises(ApiError) as refused:
        console_links.create(store, "shop", {}, "https://h")
    assert refused.value.status == 404
    store.put_integration("shop", {"crm": "amocrm"})
    assert store.console_links("shop") == []
