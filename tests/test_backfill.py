"""History import over real HTTP: the admin API starts it, the worker runs its steps from the events
queue (moto_server), the amoCRM and Bitrix24 sandboxes are paged within their rate limits, and the
Metrika sandbox must end up with every contact and order exactly once — across a stop and resume,
webhooks arriving meanwhile, and Metrika failures."""
import json
import math
import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from chalicelib.settings import get_settings
from tests.conftest import admin_headers

AMO_COUNTER, B24_COUNTER = 8181, 8282
AMO_SECRET = "backfill-amocrm-secret-0123456789"
B24_APP_TOKEN = "bf8w3e7r2t6y1u5i9o4p0a3s8d2f7g1h"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
# Small steps (see `small_steps`) and the smallest accounts that still give two or more steps per phase
# (amoCRM three of deals, two of contacts; Bitrix24, whose list pages are 50, two of deals, the last
# one short) so that stops, retries and webhooks land between them; `bench/backfill.py` runs the full
# 5,000 / 3,000 at the production step sizes. Each entity costs several DynamoDB writes on moto_server:
# the volume is what these tests spend their time on, and not what they check.
AMO_PAGE, STEP_ROWS, BITRIX_STEP_DEALS = 10, 20, 100
DEALS, CONTACTS = int(os.environ.get("BACKFILL_DEALS", "50")), int(os.environ.get("BACKFILL_CONTACTS", "30"))
B24_DEALS = int(os.environ.get("BACKFILL_B24_DEALS", "120"))


@pytest.fixture(autouse=True)
def small_steps(monkeypatch):
    """Steps of 20 entities (the default is 1,000) read as two amoCRM pages of 10 (any `limit` up to 250
    is a valid request: "Сделки", "Список сделок", https://www.amocrm.ru/developers/content/crm_platform/leads-api),
    and Bitrix24 steps of 100 deals, two list pages in one batch (800, 16 pages): more steps, each of
    more than one page, so stops, retries and webhooks land between steps even in small imports."""
    import chalicelib.backfill as backfill
    import chalicelib.crm.amocrm.api as amocrm_api
    import chalicelib.crm.bitrix24.source as bitrix24_source
    monkeypatch.setattr(backfill, "STEP_ROWS", STEP_ROWS)
    monkeypatch.setattr(amocrm_api, "PAGE_LIMIT", AMO_PAGE)
    monkeypatch.setattr(bitrix24_source, "BACKFILL_DEALS", BITRIX_STEP_DEALS)


def seed_amocrm(amocrm, deals=DEALS, contacts=CONTACTS, old=0):
    """`contacts` contacts with phones and ClientIDs; `deals` leads, most with a contact and a product,
    every tenth without a contact (a synthesised customer); the first `old` created 40 days ago."""
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
    products = [amocrm.add_catalog_element(4521, f"Товар {n}", 100 + n)["id"] for n in range(20)]
    people = [amocrm.create_contact(f"Клиент {n}", phones=[f"+7 916 {n:07d}"], notify=False,
                                    custom_fields=[{"field_id": 752013, "field_name": "_ym_uid", "field_code": "_YM_UID",
                                                    "values": [{"value": str(1717000000000000000 + n)}]}])["id"]
              for n in range(contacts)]
    for n in range(deals):
        lead = amocrm.create_lead(f"Сделка {n}", 7001, (1001, 1002, 142, 143)[n % 4], price=1000 + n,
                                  contacts=[] if n % 10 == 9 else [people[n % contacts]],
                                  products=[(products[n % 20], 1 + n % 3)], notify=False)
        if n < old:
            lead["created_at"] -= 40 * 86400
    return people


def seed_bitrix(bitrix, deals=DEALS, contacts=CONTACTS):
    bitrix.reset()
    bitrix.add_funnel(0, "Общая", [("NEW", "Новая", None), ("PREPARATION", "Подготовка", None),
                                   ("WON", "Сделка успешна", "S"), ("LOSE", "Сделка провалена", "F")])
    people = [bitrix.create_contact(f"Клиент {n}", phones=[f"+7 916 {n:07d}"], notify=False,
                                    fields={"UF_CRM_YM_CLIENT_ID": str(1714000000000000000 + n)})["ID"]
              for n in range(contacts)]
    for n in range(deals):
        bitrix.create_deal(f"Сделка {n}", stage_id=("NEW", "PREPARATION", "WON", "LOSE")[n % 4],
                           opportunity=f"{1000 + n}.00", contact_id=None if n % 10 == 9 else people[n % contacts],
                           products=[(500 + n % 20, f"Товар {n % 20}", "100.00", str(1 + n % 3))], notify=False)
    return people


def configure(client, integration_id, crm, sandbox, counter):
    if crm == "amocrm":
        connection = {"base_url": sandbox.url, "access_token": sandbox.token, "account_id": str(sandbox.account_id),
                      "webhook_secret": AMO_SECRET}
    else:
        connection = {"webhook_url": sandbox.webhook_url, "application_token": B24_APP_TOKEN,
                      "member_id": sandbox.member_id, "domain": sandbox.domain}
    config = {"crm": crm, "counter_id": counter, "metrika_token": f"y0_backfill_{crm}", "timezone": "Europe/Moscow",
              "connection": connection}
    assert client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                           body=json.dumps(config)).status_code == 200
    applied = client.http.post(f"/integrations/{integration_id}/status-mapping/defaults", headers=admin_headers())
    assert applied.status_code == 200, applied.json_body


def start(client, integration_id, **body):
    body.setdefault("since", (datetime.now(timezone.utc) - timedelta(days=90)).date().isoformat())
    return client.http.post(f"/integrations/{integration_id}/backfill", headers=admin_headers(), body=json.dumps(body))


def job(client, integration_id):
    response = client.http.get(f"/integrations/{integration_id}/backfill", headers=admin_headers())
    assert response.status_code == 200
    return response.json_body["backfill"]


def run_until(worker, client, integration_id, condition, rounds=200):
    for _ in range(rounds):
        if condition(job(client, integration_id)):
            return
        if not worker.run_once():
            time.sleep(0.25)  # a retried step waits out its delay on the queue
    raise AssertionError(f"import did not get there: {job(client, integration_id)}")


def assert_each_once(counter, contacts, orders, contacts_once=True):
    uploaded = counter.times_uploaded
    assert {k for k in uploaded if k.startswith("orders:")} == {f"orders:{i}" for i in orders}
    assert {k: n for k, n in uploaded.items() if n != 1 and (contacts_once or k.startswith("orders:"))} == {}
    assert {f"contacts:{c}" for c in contacts} <= set(uploaded)


@pytest.fixture
def amo_integration(app_client, integration_id, amocrm, queue):
    import app
    app._SOURCES.clear()
    seed_amocrm(amocrm, deals=0, contacts=0)  # the pipelines, for the default status mapping
    configure(app_client, integration_id, "amocrm", amocrm, AMO_COUNTER)
    return integration_id


@pytest.fixture
def b24_integration(app_client, integration_id, bitrix, queue):
    import app
    app._SOURCES.clear()
    seed_bitrix(bitrix, deals=0, contacts=0)
    configure(app_client, integration_id, "bitrix24", bitrix, B24_COUNTER)
    return integration_id


def test_amocrm_backfill_survives_stop_and_resume(app_client, amo_integration, amocrm, worker,
                                                                 metrika_sandbox):
    people = seed_amocrm(amocrm, old=DEALS // 10)
    started = start(app_client, amo_integration)
    assert started.status_code == 200, started.json_body
    assert started.json_body["backfill"]["state"] == "running"
    # Stop half way through the deals, then start again: it resumes from the stored cursor.
    run_until(worker, app_client, amo_integration, lambda j: j["counts"]["orders_sent"] >= DEALS // 3)
    stopped = app_client.http.post(f"/integrations/{amo_integration}/backfill/stop", headers=admin_headers())
    assert stopped.json_body["backfill"]["state"] == "stopped"
    worker.drain()  # the step message left on the queue must do nothing now
    halfway = job(app_client, amo_integration)
    assert halfway["state"] == "stopped" and halfway["phase"] == "orders"
    assert DEALS > halfway["counts"]["orders_sent"] >= DEALS // 3
    resumed = start(app_client, amo_integration)
    assert resumed.json_body["started"] is True and resumed.json_body["backfill"]["counts"] == halfway["counts"]
    run_until(worker, app_client, amo_integration, lambda j: j["state"] == "done")
    final = job(app_client, amo_integration)
    counter = metrika_sandbox.counter(AMO_COUNTER)
    assert_each_once(counter, people, [lead_id for lead_id in amocrm.leads])
    assert final["counts"]["orders_sent"] == DEALS and final["counts"]["failed"] == 0
    # The premise of the sizes above: several steps per phase, each of whole pages.
    assert final["steps"] == math.ceil(CONTACTS / STEP_ROWS) + math.ceil(DEALS / STEP_ROWS) >= 4, final
    assert final["counts"]["contacts_sent"] == CONTACTS + DEALS // 10  # plus one synthesised per contactless deal
    assert final["counts"]["older_than_21_days"] == DEALS // 10
    assert amocrm.rate_violations == 0 and amocrm.max_per_second() <= 7
    # Large batches: at most a contacts and an orders upload per step, plus the product list once.
    assert final["metrika_requests"] <= 2 * final["steps"] + 1, final
    assert not counter.orders_before_contact
    assert set(counter.products) == {str(e) for e in amocrm.catalogs[4521]}
    lead = next(iter(amocrm.leads.values()))
    assert counter.orders[str(lead["id"])]["client_uniq_id"] == str(lead["_embedded"]["contacts"][0]["id"])
    status = app_client.http.get(f"/integrations/{amo_integration}/status", headers=admin_headers()).json_body
    assert status["backfill"]["state"] == "done" and status["orders_sent"] == DEALS
    # Afterwards the live path sees the same content: a repeated webhook for an unchanged deal (amoCRM
    # retries) is re-read and not sent again.
    body = amocrm.webhook_body("leads", "update", amocrm._lead_form(lead))
    app_client.http.post(f"/webhooks/amocrm/{amo_integration}?secret={AMO_SECRET}", headers=FORM, body=body)
    worker.drain()
    assert counter.times_uploaded[f"orders:{lead['id']}"] == 1


def test_bitrix24_backfill_within_the_bucket(app_client, b24_integration, bitrix, worker, metrika_sandbox):
    people = seed_bitrix(bitrix, deals=B24_DEALS)
    assert start(app_client, b24_integration).status_code == 200
    run_until(worker, app_client, b24_integration, lambda j: j["counts"]["orders_sent"] >= B24_DEALS // 3)
    app_client.http.post(f"/integrations/{b24_integration}/backfill/stop", headers=admin_headers())
    worker.drain()
    assert job(app_client, b24_integration)["state"] == "stopped"
    assert start(app_client, b24_integration).json_body["started"] is True
    run_until(worker, app_client, b24_integration, lambda j: j["state"] == "done")
    final = job(app_client, b24_integration)
    counter = metrika_sandbox.counter(B24_COUNTER)
    assert_each_once(counter, people, list(bitrix.deals))
    assert final["counts"]["orders_sent"] == B24_DEALS and final["counts"]["failed"] == 0
    assert final["totals"] == {"contacts": CONTACTS, "orders": B24_DEALS}
    # Contacts in one step, deals in full steps and a short last one.
    assert final["steps"] == 1 + B24_DEALS // BITRIX_STEP_DEALS + 1 >= 3, final
    assert bitrix.limit_hits == 0
    # List pages, and relations in batches of 50 calls: about three requests per step of deals.
    assert final["crm_requests"] <= 4 + 3 * math.ceil(B24_DEALS / BITRIX_STEP_DEALS) + math.ceil(CONTACTS / 2500) + 4, \
        final
    assert set(counter.products) == {str(500 + n) for n in range(20)}
    assert counter.products["517"] == "Товар 17"
    deal = bitrix.deals[next(iter(bitrix.deals))]
    order = counter.orders[deal["ID"]]
    assert order["products"] == {"500": 1.0} and order["revenue"] == 1000
    assert counter.contacts[deal["CONTACT_ID"]]["client_ids"] == ["1714000000000000000"]


def test_webhooks_during_the_import_are_not_sent_twice_and_newest_wins(app_client, amo_integration, amocrm, worker,
                                                                        metrika_sandbox):
    seed_amocrm(amocrm, deals=50, contacts=10)
    leads = list(amocrm.leads.values())
    unchanged, changed = leads[5], leads[45]  # in the first step of deals, and in the last (the third)
    assert start(app_client, amo_integration).status_code == 200
    # Webhooks arrive before the import reaches the deals: one for a deal that did not change, one for a
    # deal that did. The live path delivers both; the import must skip them.
    amocrm.update_lead(changed["id"], price=777)
    amocrm.update_lead(unchanged["id"], name=unchanged["name"])
    for _, body in amocrm.outbox:
        app_client.http.post(f"/webhooks/amocrm/{amo_integration}?secret={AMO_SECRET}", headers=FORM, body=body)
    amocrm.outbox.clear()
    run_until(worker, app_client, amo_integration, lambda j: j["state"] == "done")
    worker.drain()
    counter = metrika_sandbox.counter(AMO_COUNTER)
    assert counter.times_uploaded[f"orders:{unchanged['id']}"] == 1
    assert counter.times_uploaded[f"orders:{changed['id']}"] == 1
    assert counter.orders[str(changed["id"])]["revenue"] == 777
    assert job(app_client, amo_integration)["counts"]["skipped"] >= 2
    # The two deals' customers went up with the live deliveries, which noted them: the contacts phase
    # does not send them again.
    assert_each_once(counter, [], list(amocrm.leads))


def test_metrika_failures_are_retried_without_double_uploads(app_client, amo_integration, amocrm, worker,
                                                            metrika_sandbox, monkeypatch):
    import chalicelib.backfill as backfill
    import chalicelib.metrika.client as metrika_client
    monkeypatch.setattr(backfill, "MAX_DELAY", 1)
    monkeypatch.setattr(metrika_client, "QUICK_RETRY_PAUSE", 0)  # its length is test_metrika_client's
    deals, contacts = 40, 20  # two steps of deals and one of contacts: enough retries to land between them
    people = seed_amocrm(amocrm, deals=deals, contacts=contacts)
    metrika_sandbox.set_faults(error_503=0.4, seed=3)
    assert start(app_client, amo_integration).status_code == 200
    run_until(worker, app_client, amo_integration, lambda j: j["state"] == "done", rounds=400)
    counter = metrika_sandbox.counter(AMO_COUNTER)
    # Everything exactly once: a retried step knows which deals and customers its failed attempt sent.
    assert_each_once(counter, people, list(amocrm.leads))
    assert any(r["status"] == 503 for r in metrika_sandbox.requests)
    final = job(app_client, amo_integration)
    assert final["counts"]["read"] == deals + contacts and final["counts"]["skipped"] == 0, final
    assert final["counts"]["orders_sent"] == deals and final["counts"]["contacts_sent"] == contacts + deals // 10, final


def test_the_import_leaves_the_live_path_its_reserve_of_metrika_requests(app_client, amo_integration, amocrm, worker,
                                                                          metrika_sandbox, monkeypatch):
    import chalicelib.backfill as backfill
    monkeypatch.setattr(backfill, "MAX_DELAY", 1)
    seed_amocrm(amocrm, deals=20, contacts=10)
    # Fewer requests left today than the import keeps for the live path.
    monkeypatch.setenv("METRIKA_DAILY_BUDGET", str(backfill.BUDGET_RESERVE - 1))
    try:
        assert start(app_client, amo_integration).status_code == 200
        for round_ in range(2):  # the step runs, waits on the queue (1 s), runs and waits again
            if round_:
                time.sleep(1.1)
            get_settings.cache_clear()  # the test client's requests load the stage's config (5,000)
            assert worker.run_once() == 1
        waiting = job(app_client, amo_integration)
        assert waiting["state"] == "running" and waiting["counts"]["read"] == 0, waiting
        assert "waiting for Metrika quota" in waiting["error"] and "kept for live deliveries" in waiting["error"]
        assert metrika_sandbox.counter(AMO_COUNTER).times_uploaded == {}
        monkeypatch.setenv("METRIKA_DAILY_BUDGET", "5000")  # the next day
        get_settings.cache_clear()
        run_until(worker, app_client, amo_integration, lambda j: j["state"] == "done")
    finally:
        monkeypatch.delenv("METRIKA_DAILY_BUDGET")
        get_settings.cache_clear()
    final = job(app_client, amo_integration)
    assert final["counts"]["orders_sent"] == 20 and final["error"] is None
    assert_each_once(metrika_sandbox.counter(AMO_COUNTER), [], list(amocrm.leads))


def test_unmapped_stages_are_held_and_counted(app_client, amo_integration, amocrm, worker, metrika_sandbox):
    seed_amocrm(amocrm, deals=40, contacts=10)
    amocrm.add_pipeline(7002, "Опт", [(2001, "Новая")])
    for lead in list(amocrm.leads.values())[:5]:
        amocrm.update_lead(lead["id"], pipeline_id=7002, status_id=2001, notify=False)
    start(app_client, amo_integration)
    run_until(worker, app_client, amo_integration, lambda j: j["state"] == "done")
    final = job(app_client, amo_integration)
    assert final["counts"]["failed"] == 5 and final["counts"]["orders_sent"] == 35
    status = app_client.http.get(f"/integrations/{amo_integration}/status", headers=admin_headers()).json_body
    assert {f["error"]["code"] for f in status["failed"]} == {"unmapped_stage"}


@pytest.mark.parametrize("body, message", [
    ({}, "since is required"),
    ({"since": "yesterday"}, "YYYY-MM-DD"),
    ({"since": "2999-01-01"}, "future"),
    ([1], "JSON object"),
])
def test_bad_start_requests_are_clear_400s(app_client, amo_integration, body, message):
    response = app_client.http.post(f"/integrations/{amo_integration}/backfill", headers=admin_headers(),
                                    body=json.dumps(body))
    assert response.status_code == 400 and message in response.json_body["message"]


def test_backfill_routes_need_the_admin_token_and_an_integration(app_client):
    assert app_client.http.post("/integrations/x/backfill", body="{}").status_code == 401
    missing = app_client.http.post("/integrations/nope/backfill", headers=admin_headers(), body='{"since": "2026-01-01"}')
    assert missing.status_code == 404
    assert app_client.http.post("/integrations/nope/backfill/stop", headers=admin_headers()).status_code == 404
