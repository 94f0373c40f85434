"""Queue → worker → Metrika: the local worker loop feeds the Lambda handler, which claims entities,
asks the CRM source for rows, validates and uploads them to the Metrika sandbox, and records the result.

The CRM side here is a small in-test source (a dict of rows); the amoCRM and Bitrix24 sources with
their own sandboxes plug in through the same `CrmSource` interface."""
import json
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urlencode

import pytest

from chalicelib.metrika.schemas import md5_hex
from chalicelib.crm import EntityRows
from tests.conftest import AMO_SECRET, admin_headers, amocrm_config

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class StaticSource:
    """Answers snapshots from a dict keyed by (kind, crm id); records what it was asked."""

    def __init__(self, rows=None, on_snapshot=None):
        self.rows = rows or {}
        self.calls = []
        self.on_snapshot = on_snapshot

    def snapshot(self, integration, mapping, refs, attributes=()):
        self.calls.append(sorted((r.kind, r.crm_id) for r in refs))
        if self.on_snapshot:
            self.on_snapshot(refs)
        return {(r.kind, r.crm_id): self.rows[(r.kind, r.crm_id)] for r in refs if (r.kind, r.crm_id) in self.rows}


def deal_rows(deal_id, status="PAID", revenue=15990, contact="c-1", **order_fields):
    return EntityRows(
        contacts=[{"uniq_id": contact, "name": "Иван", "phones": ["+7 (916) 123-45-67"], "emails": ["Ivan@Example.com"],
                   "client_ids": ["1714651234567890123"]}],
        orders=[{"id": deal_id, "client_uniq_id": contact, "order_status": status, "revenue": revenue,
                 "create_date_time": datetime(2026, 11, 1, 7, 0, tzinfo=timezone.utc), **order_fields}])


@pytest.fixture
def amo(app_client, integration_id, queue):
    response = app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                                   body=json.dumps(amocrm_config(timezone="Europe/Moscow", counter_id=5150)))
    assert response.status_code == 200
    return integration_id


@pytest.fixture
def source():
    import app
    source = StaticSource()
    app._SOURCES["amocrm"] = source
    return source


def webhook(client, integration_id, *lead_ids, modified=1790000000):
    pairs = [("account[id]", "32427762"), ("account[subdomain]", "shop")]
    for index, lead_id in enumerate(lead_ids):
        pairs += [(f"leads[status][{index}][id]", str(lead_id)), (f"leads[status][{index}][last_modified]", str(modified))]
    response = client.http.post(f"/webhooks/amocrm/{integration_id}?secret={AMO_SECRET}", headers=FORM,
                                body=urlencode(pairs).encode())
    assert response.status_code == 200
    return response.json_body


def entity(integration_id, crm_id, kind="order"):
    from app import get_store
    return get_store().get_entity(integration_id, kind, crm_id)


def test_webhook_to_metrika_contacts_first(app_client, amo, source, metrika_sandbox):
    from app import on_events_message
    from chalicelib.settings import get_settings
    from sandbox.worker import WorkerLoop
    # A batching window, as the deployed event source has one: a loaded moto_server may hand out the two
    # messages on two receives, which would make two batches (and two orders uploads) of one webhook.
    worker = WorkerLoop(on_events_message, get_settings().events_queue, wait_seconds=0, batching_window=0.5)
    source.rows = {("order", "5"): deal_rows("5"), ("order", "6"): deal_rows("6", status="IN_PROGRESS", revenue=0)}
    webhook(app_client, amo, 5, 6)
    assert worker.drain() == 2
    counter = metrika_sandbox.counter(5150)
    assert counter.contacts == {"c-1": {"uniq_id": "c-1", "name": "Иван", "client_ids": ["1714651234567890123"],
                                        "emails": ["ivan@example.com"], "phones": ["79161234567"]}}
    assert counter.orders["5"] == {"id": "5", "client_uniq_id": "c-1", "client_type": "CONTACT",
                                   "create_date_time": "2026-11-01 10:00:00", "order_status": "PAID", "revenue": 15990}
    assert counter.orders["6"]["order_status"] == "IN_PROGRESS"
    paths = [r["path"].rsplit("/", 2)[-2] for r in metrika_sandbox.requests]
    assert paths == ["contacts", "orders"]  # one upload each, contacts first
    assert counter.orders_before_contact == []
    state = entity(amo, "5")
    assert state["dirty"] is False and state["uploading_id"] == counter.uploadings[-1]["uploading_id"]
    assert source.calls == [[("order", "5"), ("order", "6")]]


def test_unchanged_content_is_not_uploaded_again(app_client, amo, source, worker, metrika_sandbox):
    source.rows = {("order", "5"): deal_rows("5")}
    webhook(app_client, amo, 5)
    worker.drain()
    webhook(app_client, amo, 5, modified=1790000060)
    worker.drain()
    assert len(source.calls) == 2  # re-read from the CRM…
    assert len(metrika_sandbox.requests) == 2  # …but the same rows are not sent twice
    source.rows = {("order", "5"): deal_rows("5", status="CANCELLED")}
    webhook(app_client, amo, 5, modified=1790000120)
    worker.drain()
    assert metrika_sandbox.counter(5150).orders["5"]["order_status"] == "CANCELLED"


def test_hash_pii_sends_only_md5(app_client, amo, source, worker, metrika_sandbox):
    config = amocrm_config(timezone="Europe/Moscow", counter_id=5150, hash_pii=True)
    app_client.http.put(f"/integrations/{amo}", headers=admin_headers(), body=json.dumps(config))
    source.rows = {("order", "5"): deal_rows("5")}
    webhook(app_client, amo, 5)
    worker.drain()
    contact = metrika_sandbox.counter(5150).contacts["c-1"]
    assert "phones" not in contact and "emails" not in contact
    assert contact["phones_md5"] == [md5_hex("79161234567")] and contact["emails_md5"] == [md5_hex("ivan@example.com")]
    assert contact["client_ids"] == ["1714651234567890123"]


def test_a_bad_row_parks_only_its_entity(app_client, amo, source, worker, metrika_sandbox):
    future = datetime.now(timezone.utc) + timedelta(days=2)
    source.rows = {("order", "5"): deal_rows("5"), ("order", "6"): deal_rows("6", create_date_time=future)}
    webhook(app_client, amo, 5, 6)
    worker.drain()
    assert set(metrika_sandbox.counter(5150).orders) == {"5"}
    parked = entity(amo, "6")
    assert parked["dirty"] is False and parked["last_error"]["message"] == "row failed validation"
    assert "create_date_time" in json.dumps(parked["last_error"]["fields"])


def test_entity_the_crm_cannot_translate_is_parked_with_the_reason(app_client, amo, source, worker, metrika_sandbox):
    source.rows = {("order", "5"): EntityRows(error={"message": "stage 7001:1003 is not mapped"})}
    webhook(app_client, amo, 5)
    worker.drain()
    assert entity(amo, "5")["last_error"] == {"message": "stage 7001:1003 is not mapped"}
    assert metrika_sandbox.requests == []


def test_metrika_refusal_parks_with_metrika_location(app_client, amo, source, worker, metrika_sandbox):
    source.rows = {("order", "5"): deal_rows("5", status="won")}  # "won" was never pushed to Metrika
    webhook(app_client, amo, 5)
    worker.drain()
    error = entity(amo, "5")["last_error"]
    assert error["status"] == 400 and error["errors"][0]["location"] == "orders[0].orderStatus"


def test_metrika_outage_keeps_the_entity_dirty_and_retries_later(app_client, amo, source, worker, metrika_sandbox, queue):
    source.rows = {("order", "5"): deal_rows("5")}
    metrika_sandbox.set_faults(error_503=1.0)
    webhook(app_client, amo, 5)
    worker.drain()
    state = entity(amo, "5")
    assert state["dirty"] is True and state["attempts"] == 1 and state["last_error"]["status"] == 503
    assert queue.delayed() == 1  # the retry waits out its backoff
    # A new event meanwhile does not add a second message: the retry is already queued.
    assert webhook(app_client, amo, 5, modified=1790000060)["queued"] == 0


def test_retries_stop_at_the_limit_and_park(service_env, amo, source, metrika_sandbox, queue):
    from app import get_metrika, get_queue, get_store
    from chalicelib.crm import EntityRef
    from chalicelib.worker import Worker
    source.rows = {("order", "5"): deal_rows("5")}
    get_store().mark_dirty(amo, EntityRef("order", "5", 1790000000, "status"), now=time.time(), lease_seconds=900, future_skew=300)
    metrika_sandbox.set_faults(error_503=1.0)
    worker = Worker(get_store(), get_queue(), get_metrika, {"amocrm": source}, retry_limit=2)
    message = json.dumps({"integration_id": amo, "kind": "order", "crm_id": "5"})
    outcomes = [worker.handle([message]) for _ in range(3)]
    assert [o.retried for o in outcomes] == [1, 1, 0] and outcomes[-1].parked == 1
    assert entity(amo, "5")["last_error"]["message"].startswith("gave up after 2 retries")


def test_newer_event_during_delivery_keeps_the_entity_dirty(app_client, amo, source, worker, metrika_sandbox):
    def change_meanwhile(refs):
        if len(source.calls) == 1:
            source.rows[("order", "5")] = deal_rows("5", status="CANCELLED")
            webhook(app_client, amo, 5, modified=1790000999)

    source.rows = {("order", "5"): deal_rows("5")}
    source.on_snapshot = change_meanwhile
    webhook(app_client, amo, 5)
    worker.drain()
    assert len(source.calls) == 2
    assert metrika_sandbox.counter(5150).orders["5"]["order_status"] == "CANCELLED"
    assert entity(amo, "5")["dirty"] is False and entity(amo, "5")["event_time"] == 1790000999


def test_uploads_are_chunked_without_duplicate_ids(service_env, amo, source, metrika_sandbox, queue):
    from app import get_metrika, get_queue, get_store
    from chalicelib.crm import EntityRef
    from chalicelib.worker import Worker
    source.rows = {("order", str(i)): deal_rows(str(i), contact=f"c-{i % 2}") for i in range(5)}
    for i in range(5):
        get_store().mark_dirty(amo, EntityRef("order", str(i), 1790000000, "status"), now=time.time(), lease_seconds=900, future_skew=300)
    worker = Worker(get_store(), get_queue(), get_metrika, {"amocrm": source}, row_limit=2)
    messages = [json.dumps({"integration_id": amo, "kind": "order", "crm_id": str(i)}) for i in range(5)]
    assert worker.handle(messages).uploaded == 5
    sizes = [(r["path"].rsplit("/", 2)[-2]) for r in metrika_sandbox.requests]
    assert sizes == ["contacts", "orders", "orders", "orders"]  # 2 distinct contacts; 5 orders in chunks of 2
    assert [u["elements_count"] for u in metrika_sandbox.counter(5150).uploadings] == [2, 2, 2, 1]


def test_crm_without_a_source_parks_with_a_clear_reason(service_env, amo, metrika_sandbox):
    from app import get_metrika, get_queue, get_store
    from chalicelib.crm import EntityRef
    from chalicelib.worker import Worker
    get_store().mark_dirty(amo, EntityRef("order", "9", 1790000000, "add"), now=time.time(), lease_seconds=900, future_skew=300)
    worker = Worker(get_store(), get_queue(), get_metrika, sources={})
    assert worker.handle([json.dumps({"integration_id": amo, "kind": "order", "crm_id": "9"})]).parked == 1
    assert "not available" in entity(amo, "9")["last_error"]["message"]


def test_deleted_integration_drops_its_messages(app_client, amo, source, worker, metrika_sandbox):
    webhook(app_client, amo, 5)
    app_client.http.delete(f"/integrations/{amo}", headers=admin_headers())
    assert worker.drain() == 1
    assert source.calls == [] and metrika_sandbox.requests == []
