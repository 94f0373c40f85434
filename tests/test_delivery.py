"""Delivery guarantees over real HTTP (app in-process; moto_server, amoCRM and Metrika sandboxes on
loopback): nothing lost, nothing doubled, nothing stale, inside Metrika's quotas. The interleavings
and the burst run on the in-memory core (test_convergence.py)."""
import json
import random
import threading
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from chalicelib.crm import ORDER
from chalicelib.crm.amocrm.source import AmoCrmSource
from chalicelib.metrika.client import MetrikaClient
from chalicelib.metrika.governor import QuotaGovernor
from chalicelib.worker import Worker
from chalicelib.settings import get_settings
from sandbox.worker import WorkerLoop
from tests.conftest import admin_headers

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SECRET = "delivery-secret-0123456789abc"
COUNTER = 8080


@pytest.fixture
def setup(app_client, integration_id, amocrm, queue, metrika_sandbox):
    import app
    app._SOURCES.clear()
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
    config = {"crm": "amocrm", "counter_id": COUNTER, "metrika_token": "y0_delivery", "timezone": "Europe/Moscow",
              "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": SECRET}}
    assert app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                               body=json.dumps(config)).status_code == 200
    assert app_client.http.post(f"/integrations/{integration_id}/status-mapping/defaults",
                                headers=admin_headers()).status_code == 200
    metrika_sandbox.requests.clear()
    return integration_id


def make_worker(batch_size=1000, batching_window=0.2, metrika_for=None, **options):
    """The worker the Lambda runs, with test-sized backoff (retries come back at once)."""
    from app import get_metrika, get_queue, get_store
    source = AmoCrmSource(get_store().reserve_slot, backoff=0.01)
    worker = Worker(get_store(), get_queue(), metrika_for or get_metrika, {"amocrm": source}, retry_base=0, **options)
    return WorkerLoop(lambda event, _: worker.handle(r["body"] for r in event["Records"]),
                      get_settings().events_queue, batch_size=batch_size, batching_window=batching_window, wait_seconds=0)


def post(client, integration_id, body):
    response = client.http.post(f"/webhooks/amocrm/{integration_id}?secret={SECRET}", headers=FORM, body=body)
    assert response.status_code == 200, response.json_body
    return response.json_body


def expected_order(amocrm, lead_id):
    """What Metrika must hold for the lead as amoCRM holds it now."""
    lead = amocrm.leads[lead_id]
    status = {142: "won", 143: "lost"}.get(lead["status_id"], f"amo_7001_{lead['status_id']}")
    return status, lead["price"]


STAGES = [1001, 1002, 142, 143]


def orders_uploads(metrika_sandbox):
    return [r for r in metrika_sandbox.requests if r["path"].endswith("/data/orders/json")]


# --- faults -----------------------------------------------------------------------------------------

def test_metrika_and_crm_faults_lose_and_double_nothing(app_client, setup, amocrm, metrika_sandbox):
    leads = [amocrm.create_lead(f"Заказ {i}", 7001, 1001, price=1000 + i, client_id=f"17900000001234{i:05d}")
             for i in range(30)]
    for i, lead in enumerate(leads):
        amocrm.update_lead(lead["id"], status_id=random.Random(i).choice(STAGES), price=2000 + i)
    metrika_sandbox.set_faults(error_503=0.15, error_429=0.1, slow=0.05, slow_seconds=0.3, seed=5)
    amocrm.set_faults(error_5xx=0.2, seed=6)
    for _, body in amocrm.outbox:
        post(app_client, setup, body)
    amocrm.outbox.clear()
    from app import get_store
    pauses = []

    def metrika_for(integration):  # quick-retry pauses recorded, not slept (their length: test_metrika_client.py)
        governor = QuotaGovernor(get_store(), integration["metrika_token"], daily_budget=get_settings().metrika_daily_budget)
        return MetrikaClient(integration["metrika_token"], get_settings().metrika_api_url, governor=governor,
                             sleep=pauses.append)

    worker = make_worker(batch_size=10, row_limit=5, metrika_for=metrika_for)  # many small requests: the faults bite
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        worker.drain(idle_rounds=2)
        stored = metrika_sandbox.counter(COUNTER).orders
        if all(str(lead["id"]) in stored for lead in leads):
            break
    metrika_sandbox.set_faults()
    amocrm.set_faults()
    stored = metrika_sandbox.counter(COUNTER).orders
    missing = [get_store().get_entity(setup, ORDER, str(lead["id"])) for lead in leads if str(lead["id"]) not in stored]
    assert missing == [], json.dumps(missing, indent=1, default=str)[:3000]
    assert set(stored) == {str(lead["id"]) for lead in leads}  # none lost, none extra
    for lead in leads:
        assert (stored[str(lead["id"])]["order_status"], stored[str(lead["id"])]["revenue"]) == \
            expected_order(amocrm, lead["id"])
    assert any(r["status"] in (429, 503) for r in metrika_sandbox.requests)  # the faults did happen
    assert pauses  # and some were retried at once by the client


# --- quotas and economy -----------------------------------------------------------------------------

def test_never_more_than_three_requests_in_flight(metrika_sandbox):
    # The in-memory store: its leases are atomic, as DynamoDB's conditional writes are. moto_server's are
    # not across threads (two owners could take one slot: a 4th request, a 429, a quick retry counted as a
    # 9th request); the lease race itself is a contract test on a serialised moto (test_store_contract.py).
    from chalicelib.store.memory import MemoryStore
    metrika_sandbox.set_faults(slow=1.0, slow_seconds=0.3)
    governor = QuotaGovernor(MemoryStore(), "y0_parallel", daily_budget=100)
    client = MetrikaClient("y0_parallel", metrika_sandbox.url, governor=governor)
    errors = []

    def upload():
        try:
            client.upload_contacts(COUNTER, [{"uniq_id": "c"}])
        except Exception as exc:  # noqa: BLE001 — the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    metrika_sandbox.set_faults()
    assert errors == [] and metrika_sandbox.max_in_flight == 3
    assert governor.used_today() == 8 and governor.remaining() == 92


def test_daily_budget_is_counted_and_waits_for_midnight(service_env, metrika_sandbox):
    from app import get_store
    from chalicelib.errors import Transient
    governor = QuotaGovernor(get_store(), "y0_budget", daily_budget=2,
                             clock=lambda: datetime(2026, 11, 28, 23, 0, tzinfo=timezone.utc).timestamp())
    client = MetrikaClient("y0_budget", metrika_sandbox.url, governor=governor)
    client.upload_contacts(COUNTER, [{"uniq_id": "c"}])
    client.upload_contacts(COUNTER, [{"uniq_id": "c"}])
    with pytest.raises(Transient) as info:
        client.upload_contacts(COUNTER, [{"uniq_id": "c"}])
    assert info.value.daily_quota and info.value.retry_after == 3600
    assert len(metrika_sandbox.requests) == 2  # the third never left


def test_low_budget_batches_harder(app_client, setup, amocrm, metrika_sandbox):
    from app import get_metrika, get_store

    def small_budget(integration):
        client = get_metrika(integration)
        client.governor.daily_budget = 100  # below LOW_BUDGET: wait for fuller chunks
        return client

    lead = amocrm.create_lead("Заказ", 7001, 142, price=500)
    for _, body in amocrm.outbox:
        post(app_client, setup, body)
    make_worker(metrika_for=small_budget, batch_harder_seconds=1).drain()
    state = get_store().get_entity(setup, ORDER, str(lead["id"]))
    assert state["dirty"] is True and "batching harder" in state["last_error"]["message"]
    assert int(state.get("attempts") or 0) == 0 and orders_uploads(metrika_sandbox) == []


# --- parking, replay, reconciliation, confirmation, status ------------------------------------------

def test_validation_error_parks_only_the_bad_deal_then_replay_sends_it(app_client, setup, amocrm, metrika_sandbox):
    good = amocrm.create_lead("Хорошая", 7001, 1001, price=10)
    bad = amocrm.create_lead("Плохая", 7001, 1002, price=20)
    metrika_sandbox.counter(COUNTER).order_statuses.pop("amo_7001_1002")  # Metrika lost that status
    for _, body in amocrm.outbox:
        post(app_client, setup, body)
    make_worker().drain()
    stored = metrika_sandbox.counter(COUNTER).orders
    assert str(good["id"]) in stored and str(bad["id"]) not in stored
    status = app_client.http.get(f"/integrations/{setup}/status", headers=admin_headers()).json_body
    assert [f["crm_id"] for f in status["failed"]] == [str(bad["id"])]
    assert status["failed"][0]["error"]["errors"][0]["location"].endswith(".orderStatus")
    mapping = app_client.http.get(f"/integrations/{setup}/status-mapping", headers=admin_headers()).json_body
    app_client.http.put(f"/integrations/{setup}/status-mapping", headers=admin_headers(),
                        body=json.dumps({"entries": mapping["entries"]}))  # fix: push the mapping again
    replay = app_client.http.post(f"/integrations/{setup}/replay", headers=admin_headers(), body=b"{}")
    assert replay.json_body == {"replayed": 1, "queued": 1}
    make_worker().drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(bad["id"])]["order_status"] == "amo_7001_1002"
    one = app_client.http.post(f"/integrations/{setup}/replay", headers=admin_headers(),
                               body=json.dumps({"crm_id": str(good["id"])}))
    assert one.json_body == {"replayed": 1, "queued": 1}
    before = len(orders_uploads(metrika_sandbox))
    make_worker().drain()
    assert len(orders_uploads(metrika_sandbox)) == before + 1  # re-sent even though unchanged
    unknown = app_client.http.post(f"/integrations/{setup}/replay", headers=admin_headers(),
                                   body=json.dumps({"crm_id": "424242"}))
    assert unknown.status_code == 400 and "reconciliation" in unknown.json_body["message"]


def test_amocrm_lead_changed_while_its_webhook_was_lost(app_client, setup, amocrm, metrika_sandbox):
    lead = amocrm.create_lead("Заказ", 7001, 1001, price=700)
    for _, body in amocrm.outbox:
        post(app_client, setup, body)
    amocrm.outbox.clear()
    make_worker().drain()
    amocrm.update_lead(lead["id"], status_id=142)
    amocrm.outbox.clear()  # lost
    since = lead["created_at"]
    answer = app_client.http.post(f"/integrations/{setup}/reconcile", headers=admin_headers(),
                                  body=json.dumps({"since": since}))
    assert answer.status_code == 200 and answer.json_body["queued"] == 1
    make_worker().drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(lead["id"])]["order_status"] == "won"


def test_confirm_job_marks_uploads_passed_or_failed(app_client, setup, amocrm, metrika_sandbox, queue):
    import app
    from chalice.test import Client
    from app import get_metrika, get_queue, get_store
    amocrm.create_lead("Заказ", 7001, 142, price=900)
    for _, body in amocrm.outbox:
        post(app_client, setup, body)
    make_worker().drain()
    uploadings = metrika_sandbox.counter(COUNTER).uploadings
    metrika_sandbox.fail_uploading(uploadings[-1]["uploading_id"])
    with Client(app.app) as client:
        from unittest import mock
        with mock.patch.object(app.get_store(), "list_integration_ids", lambda: [setup]):
            event = client.events.generate_cw_event(source="aws.events", detail_type="Scheduled Event", detail={},
                                                    resources=[], region="eu-central-1")
            event["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            assert client.lambda_.invoke("confirm_uploads", event).payload["queued"] == 1
    jobs = queue.bodies()  # the schedule queued the job; the worker runs it (and only it, here)
    assert [(m["integration_id"], m["kind"]) for m in jobs] == [(setup, "confirm")]
    worker = Worker(get_store(), get_queue(), get_metrika, {"amocrm": AmoCrmSource(get_store().reserve_slot)})
    assert worker.handle(json.dumps(m) for m in jobs).jobs == 1
    status = app_client.http.get(f"/integrations/{setup}/status", headers=admin_headers()).json_body
    assert status["uploads"] == {"SENT": 0, "PASSED": 1, "FAILED": 1, "UNCONFIRMED": 0}
    assert status["resent_after_failed_uploads"] == 1 and status["backlog"] == 1
    # The failed order goes up again (its contact, which Metrika holds, does too: the entity is re-sent
    # whole), and POST …/confirm confirms the new uploads at once.
    make_worker().drain()
    counter = metrika_sandbox.counter(COUNTER)
    assert [v for k, v in counter.times_uploaded.items() if k.startswith("orders:")] == [2]
    confirmed = app_client.http.post(f"/integrations/{setup}/confirm", headers=admin_headers())
    assert confirmed.status_code == 200
    assert {k: confirmed.json_body[k] for k in ("checked", "passed", "failed", "resent")} == \
        {"checked": 2, "passed": 2, "failed": 0, "resent": 0}


def test_the_confirm_route_answers_with_a_failed_upload_and_queues_it_again(app_client, setup, amocrm,
                                                                             metrika_sandbox):
    """POST …/confirm runs the confirmation at once: its answer names what it found (one upload FAILED,
    its deal queued again), and GET …/status counts it; the deal then goes up again."""
    amocrm.create_lead("Заказ", 7001, 142, price=900)
    for _, body in amocrm.outbox:
        post(app_client, setup, body)
    make_worker().drain()
    metrika_sandbox.fail_uploading(metrika_sandbox.counter(COUNTER).uploadings[-1]["uploading_id"])  # the orders
    answer = app_client.http.post(f"/integrations/{setup}/confirm", headers=admin_headers(), body=b"{}")
    assert answer.status_code == 200
    assert {k: answer.json_body[k] for k in ("checked", "passed", "failed", "resent", "unconfirmed_over_6h")} == \
        {"checked": 2, "passed": 1, "failed": 1, "resent": 1, "unconfirmed_over_6h": 0}
    status = app_client.http.get(f"/integrations/{setup}/status", headers=admin_headers()).json_body
    assert status["uploads"]["FAILED"] == 1 and status["resent_after_failed_uploads"] == 1 and status["backlog"] == 1
    make_worker().drain()
    assert [v for k, v in metrika_sandbox.counter(COUNTER).times_uploaded.items() if k.startswith("orders:")] == [2]


def test_status_reports_backlog_shares_quota_and_webhook(app_client, setup, amocrm, metrika_sandbox):
    amocrm.webhooks.append({"id": 1, "destination": f"https://x/api/webhooks/amocrm/{setup}?secret={SECRET}",
                            "settings": ["status_lead"], "disabled": True})
    with_id = amocrm.create_lead("С ClientID", 7001, 142, price=1, client_id="1790000000123456789")
    contact = amocrm.create_contact("Пётр", phones=["+7 900 000 00 00"], notify=False)
    amocrm.create_lead("С телефоном", 7001, 142, price=1, contacts=[contact["id"]])
    old = amocrm.create_lead("Старая", 7001, 142, price=1)
    old["created_at"] = int(datetime(2026, 10, 1, tzinfo=ZoneInfo("UTC")).timestamp())
    for _, body in amocrm.outbox:
        post(app_client, setup, body)
    amocrm.outbox.clear()
    make_worker().drain()
    amocrm.update_lead(with_id["id"], price=2)  # recorded, not yet delivered: backlog
    for _, body in amocrm.outbox:
        post(app_client, setup, body)
    status = app_client.http.get(f"/integrations/{setup}/status", headers=admin_headers()).json_body
    assert status["backlog"] == 1 and status["failed_count"] == 0
    assert status["orders_sent"] == 3
    assert status["share_with_client_id"] == round(1 / 3, 3) and status["share_with_phone"] == round(1 / 3, 3)
    assert status["orders_older_than_21_days"] == 1
    assert status["metrika_requests_today"] >= 3  # the mapping push and two uploads
    assert status["last_successful_upload"] is not None
    assert status["webhook"] == {"registered": True, "disabled": True, "events": ["status_lead"]}
    assert SECRET not in json.dumps(status)
