"""amoCRM end to end over real HTTP: webhook (as the amoCRM sandbox fires it) → app → SQS (moto_server)
→ worker → amoCRM sandbox API → Metrika sandbox, which must hold exactly the expected contact and order."""
import json
import random
import threading
import time

import pytest

from chalicelib.crm import ORDER, EntityRef
from chalicelib.crm.amocrm.api import AmoCrmClient
from chalicelib.crm.amocrm.source import AmoCrmSource
from tests.conftest import admin_headers

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SECRET = "e2e-amocrm-secret-0123456789"
COUNTER = 6060


@pytest.fixture
def account(amocrm):
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
    kettle = amocrm.add_catalog_element(4521, "Чайник синий", 2490)
    contact = amocrm.create_contact("Иван Петров", phones=["+7 (916) 123-45-67"], emails=["Ivan@Example.com"], notify=False)
    lead = amocrm.create_lead("Заказ #1042", 7001, 1001, price=4980, contacts=[contact["id"]],
                              products=[(kettle["id"], 2)], client_id="1717171717123456789", notify=False)
    return {"contact": contact, "lead": lead, "kettle": kettle}


def configure(client, integration_id, amocrm, timezone="Europe/Moscow", **extra):
    config = {"crm": "amocrm", "counter_id": COUNTER, "metrika_token": "y0_e2e", "timezone": timezone,
              "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "account_id": str(amocrm.account_id),
                             "webhook_secret": SECRET}, **extra}
    response = client.http.put(f"/integrations/{integration_id}", headers=admin_headers(), body=json.dumps(config))
    assert response.status_code == 200, response.json_body


@pytest.fixture
def integration(app_client, integration_id, amocrm, account, queue):
    import app
    app._SOURCES.clear()  # the real amoCRM source
    configure(app_client, integration_id, amocrm)
    response = app_client.http.post(f"/integrations/{integration_id}/status-mapping/defaults", headers=admin_headers())
    assert response.status_code == 200, response.json_body
    return integration_id


def deliver(client, integration_id, amocrm, times=1, shuffle=False):
    """Post what the sandbox fired, as amoCRM would (possibly repeated and reordered)."""
    bodies = [body for _, body in amocrm.outbox] * times
    amocrm.outbox.clear()
    if shuffle:
        random.Random(4).shuffle(bodies)
    for body in bodies:
        response = client.http.post(f"/webhooks/amocrm/{integration_id}?secret={SECRET}", headers=FORM, body=body)
        assert response.status_code == 200, response.json_body


def orders_uploads(metrika_sandbox):
    return [r for r in metrika_sandbox.requests if r["path"].endswith("/data/orders/json")]


def test_won_deal_reaches_metrika_exactly(app_client, integration, amocrm, account, worker, metrika_sandbox):
    lead_id = account["lead"]["id"]
    amocrm.update_lead(lead_id, status_id=142)
    assert [event for event, _ in amocrm.outbox] == ["update_lead", "status_lead"]
    deliver(app_client, integration, amocrm)
    worker.drain()
    counter = metrika_sandbox.counter(COUNTER)
    lead = amocrm.leads[lead_id]
    contact_id = str(account["contact"]["id"])
    from datetime import datetime
    from zoneinfo import ZoneInfo

    def moscow(ts):
        return datetime.fromtimestamp(ts, ZoneInfo("Europe/Moscow")).strftime("%Y-%m-%d %H:%M:%S")

    assert counter.contacts == {contact_id: {
        "uniq_id": contact_id, "name": "Иван Петров", "create_date_time": moscow(account["contact"]["created_at"]),
        "update_date_time": moscow(account["contact"]["updated_at"]), "phones": ["79161234567"],
        "emails": ["ivan@example.com"], "client_ids": ["1717171717123456789"]}}
    assert counter.orders == {str(lead_id): {
        "id": str(lead_id), "client_uniq_id": contact_id, "client_type": "CONTACT", "order_status": "won",
        "create_date_time": moscow(lead["created_at"]), "update_date_time": moscow(lead["updated_at"]),
        "finish_date_time": moscow(lead["closed_at"]), "revenue": 4980, "currency": "RUB",  # the account's
        "products": {str(account["kettle"]["id"]): 2}}}
    assert counter.orders_before_contact == []
    assert {s["id"]: s["type"] for s in counter.order_statuses.values()}["won"] == "PAID"


def test_utc_counter_gets_utc_times(app_client, integration, amocrm, account, worker, metrika_sandbox):
    configure(app_client, integration, amocrm, timezone="UTC")
    amocrm.update_lead(account["lead"]["id"], status_id=142)
    deliver(app_client, integration, amocrm)
    worker.drain()
    from datetime import datetime, timezone
    order = metrika_sandbox.counter(COUNTER).orders[str(account["lead"]["id"])]
    expected = datetime.fromtimestamp(account["lead"]["created_at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    assert order["create_date_time"] == expected


def test_update_and_status_hooks_delivered_many_times_give_one_state(app_client, integration, amocrm, account,
                                                                      worker, metrika_sandbox):
    lead_id = account["lead"]["id"]
    amocrm.update_lead(lead_id, status_id=1002)
    amocrm.update_lead(lead_id, status_id=142, price=5200)
    fired = list(amocrm.outbox)
    deliver(app_client, integration, amocrm, times=4, shuffle=True)  # 16 deliveries, stale ones among them
    worker.drain()
    order = metrika_sandbox.counter(COUNTER).orders[str(lead_id)]
    assert (order["order_status"], order["revenue"]) == ("won", 5200)
    assert len(orders_uploads(metrika_sandbox)) == 1
    amocrm.outbox[:] = fired  # amoCRM's retries, minutes later
    deliver(app_client, integration, amocrm)
    worker.drain()
    assert len(orders_uploads(metrika_sandbox)) == 1


def test_lead_without_contact_counts_through_its_client_id(app_client, integration, amocrm, account, worker,
                                                          metrika_sandbox):
    lead = amocrm.create_lead("Звонок", 7001, 1001, client_id="1790000000999999999")
    deliver(app_client, integration, amocrm)
    worker.drain()
    counter = metrika_sandbox.counter(COUNTER)
    assert counter.contacts[f"lead-{lead['id']}"]["client_ids"] == ["1790000000999999999"]
    assert counter.orders[str(lead["id"])]["client_uniq_id"] == f"lead-{lead['id']}"


def test_unmapped_stage_is_held_until_mapped(app_client, integration, amocrm, account, worker, metrika_sandbox):
    entries = app_client.http.get(f"/integrations/{integration}/status-mapping", headers=admin_headers()).json_body["entries"]
    without = [e for e in entries if e["crm_status"] != "7001:1002"]
    assert app_client.http.put(f"/integrations/{integration}/status-mapping", headers=admin_headers(),
                               body=json.dumps({"entries": without})).status_code == 200
    lead_id = account["lead"]["id"]
    amocrm.update_lead(lead_id, status_id=1002)
    deliver(app_client, integration, amocrm)
    worker.drain()
    from app import get_store
    held = get_store().get_entity(integration, ORDER, str(lead_id))
    assert held["last_error"]["code"] == "unmapped_stage" and "Переговоры" in held["last_error"]["message"]
    assert str(lead_id) not in metrika_sandbox.counter(COUNTER).orders
    remapped = app_client.http.put(f"/integrations/{integration}/status-mapping", headers=admin_headers(),
                                   body=json.dumps({"entries": entries}))
    assert remapped.json_body["requeued"] == 1
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(lead_id)]["order_status"] == "amo_7001_1002"


@pytest.mark.parametrize("setting, expected", [({}, "CANCELLED"), ({"deleted_deal_status": "SPAM"}, "SPAM"),
                                               ({"deleted_deal_status": None}, "amo_7001_1001")])
def test_deleted_deal(app_client, integration, amocrm, account, worker, metrika_sandbox, setting, expected):
    configure(app_client, integration, amocrm, **setting)
    lead_id = account["lead"]["id"]
    amocrm.update_lead(lead_id, name="Заказ #1042 (изменён)")
    deliver(app_client, integration, amocrm)
    worker.drain()
    amocrm.delete_lead(lead_id)
    deliver(app_client, integration, amocrm, times=3)
    worker.drain()
    order = metrika_sandbox.counter(COUNTER).orders[str(lead_id)]
    assert order["order_status"] == expected
    assert len(orders_uploads(metrika_sandbox)) == (1 if expected == "amo_7001_1001" else 2)


def test_contact_update_reaches_metrika(app_client, integration, amocrm, account, worker, metrika_sandbox):
    amocrm.update_lead(account["lead"]["id"], status_id=142)
    deliver(app_client, integration, amocrm)
    worker.drain()
    contact = amocrm.contacts[account["contact"]["id"]]
    contact["custom_fields_values"][0]["values"].append({"value": "+7 999 555-11-11"})
    amocrm.update_contact(contact["id"])
    deliver(app_client, integration, amocrm)
    worker.drain()
    stored = metrika_sandbox.counter(COUNTER).contacts[str(contact["id"])]
    assert stored["phones"] == ["79161234567", "79995551111"]
    assert len(orders_uploads(metrika_sandbox)) == 1  # the linked lead was re-read, nothing new to send


def test_amocrm_faults_are_retried_until_delivered(app_client, integration, amocrm, account, worker, metrika_sandbox):
    amocrm.set_faults(error_5xx=0.3, error_429=0.1, seed=11)
    leads = [amocrm.create_lead(f"Заказ {i}", 7001, 1001, price=100 * i, client_id=f"17900000001234567{i:02d}")
             for i in range(1, 6)]
    deliver(app_client, integration, amocrm)
    for _ in range(10):  # retries come back after their backoff
        worker.drain()
        if all(str(lead["id"]) in metrika_sandbox.counter(COUNTER).orders for lead in leads):
            break
        import time
        time.sleep(1)
    assert {str(lead["id"]) for lead in leads} <= set(metrika_sandbox.counter(COUNTER).orders)
    amocrm.set_faults()


def test_revoked_token_parks_with_amocrm_reason(app_client, integration, amocrm, account, worker, metrika_sandbox):
    from app import get_store
    config = get_store().get_integration(integration)
    config["connection"]["access_token"] = "revoked"
    get_store().put_integration(integration, config)
    amocrm.update_lead(account["lead"]["id"], status_id=142)
    deliver(app_client, integration, amocrm)
    worker.drain()
    error = get_store().get_entity(integration, ORDER, str(account["lead"]["id"]))["last_error"]
    assert "401" in error["message"] and metrika_sandbox.counter(COUNTER).orders == {}


def test_never_more_than_seven_requests_a_second(service_env, integration, amocrm, account):
    from app import get_store
    config = get_store().get_integration(integration)
    # The limiter on the in-memory store, whose slots are atomic as DynamoDB's conditional writes are;
    # moto_server's are not across threads (two callers could get one slot). The race itself is a
    # contract test on a serialised moto (test_concurrent_callers_share_limits).
    from chalicelib.store.memory import MemoryStore
    source = AmoCrmSource(MemoryStore().reserve_slot)
    ref = [EntityRef(ORDER, str(account["lead"]["id"]), 1, "update")]
    amocrm.requests.clear()

    def burst():
        for _ in range(2):
            source.snapshot(config, [], ref)

    threads = [threading.Thread(target=burst) for _ in range(3)]  # three workers at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The account (read by each worker that finds it unread), then lead + contact + pipelines (unmapped)
    # per snapshot: 19 to 21 requests, near three times the limit, so the spacing must hold across
    # several one-second windows (unspaced, they would all fall into the first).
    assert len(amocrm.requests) >= 19
    assert amocrm.rate_violations == 0 and amocrm.max_per_second() <= 7


def test_status_mapping_defaults_are_proposed_and_applied(app_client, integration_id, amocrm, account, metrika_sandbox):
    import app
    app._SOURCES.clear()
    configure(app_client, integration_id, amocrm)
    proposed = app_client.http.get(f"/integrations/{integration_id}/status-mapping/defaults", headers=admin_headers())
    entries = {e["crm_status"]: e for e in proposed.json_body["entries"]}
    assert entries["7001:142"]["type"] == "PAID" and entries["7001:143"]["type"] == "CANCELLED"
    assert entries["7001:1002"]["humanized"] == "Продажи: Переговоры"
    custom = {"crm_status": "7001:1002", "metrika_status_id": "talks", "type": "IN_PROGRESS", "humanized": "Talks"}
    app_client.http.put(f"/integrations/{integration_id}/status-mapping", headers=admin_headers(),
                        body=json.dumps({"entries": [custom]}))
    applied = app_client.http.post(f"/integrations/{integration_id}/status-mapping/defaults", headers=admin_headers())
    mapped = {e["crm_status"]: e["metrika_status_id"] for e in applied.json_body["entries"]}
    assert mapped["7001:1002"] == "talks" and mapped["7001:142"] == "won"  # the user's choice stays
    assert set(metrika_sandbox.counter(COUNTER).order_statuses) >= {"talks", "won", "lost"}


def test_defaults_with_a_bad_token_say_so(app_client, integration_id, amocrm, account):
    import app
    app._SOURCES.clear()
    configure(app_client, integration_id, amocrm)
    from app import get_store
    config = get_store().get_integration(integration_id)
    config["connection"]["access_token"] = "wrong"
    get_store().put_integration(integration_id, config)
    response = app_client.http.get(f"/integrations/{integration_id}/status-mapping/defaults", headers=admin_headers())
    assert response.status_code == 422 and "401" in response.json_body["message"]


def test_api_client_reads_pages_catalog_and_webhooks(amocrm, account):
    for i in range(260):
        amocrm.create_lead(f"L{i}", 7001, 1001, notify=False)
    client = AmoCrmClient(amocrm.url, amocrm.token)
    since = account["lead"]["updated_at"]
    assert len(list(client.leads_updated_since(since))) == 261
    assert len(client.leads([str(account["lead"]["id"]), "999999"])) == 1
    [element] = client.catalog_elements(4521, [str(account["kettle"]["id"])])
    assert element["name"] == "Чайник синий" and element["custom_fields_values"][0]["values"][0]["value"] == 2490
    assert client.contacts(["424242"]) == []
    assert client.webhooks() == []
    assert amocrm.token not in repr(client)


def test_account_currency_and_country_and_a_dropped_phone_on_the_status_page(app_client, integration, amocrm,
                                                                              account, worker, metrika_sandbox):
    """A Belarusian account in US dollars (`GET /api/v4/account`), no `currency` or `phone_region` set:
    the order goes in USD, the Belarusian phone with 375, and the phone that is no number is counted,
    masked, on `GET …/status`; the account is kept in the store (DynamoDB), read once. (Another base URL
    for the same sandbox: the earlier tests' account, RUB, is kept for a day under the usual one.)"""
    shown = app_client.http.get(f"/integrations/{integration}", headers=admin_headers()).json_body
    # another endpoint: its secrets must come again (a masked one does not follow a new base_url)
    shown["connection"].update(base_url=amocrm.url.replace("127.0.0.1", "localhost"), access_token=amocrm.token,
                               webhook_secret=SECRET)
    assert app_client.http.put(f"/integrations/{integration}", headers=admin_headers(),
                               body=json.dumps(shown)).status_code == 200
    amocrm.set_account(country="BY", currency="USD")
    try:
        contact = amocrm.create_contact("Алесь", phones=["8 029 123-45-67", "8 029 123-45"], notify=False)
        lead = amocrm.create_lead("Заказ BY", 7001, 142, price=250, contacts=[contact["id"]])
        amocrm.update_lead(account["lead"]["id"], status_id=142)
        deliver(app_client, integration, amocrm)
        worker.drain()
    finally:
        amocrm.set_account(country="RU", currency="RUB")
    counter = metrika_sandbox.counter(COUNTER)
    assert counter.orders[str(lead["id"])]["currency"] == "USD"
    assert counter.orders[str(account["lead"]["id"])]["currency"] == "USD"
    assert counter.contacts[str(contact["id"])]["phones"] == ["375291234567"]
    assert sum(1 for r in amocrm.requests if r["path"] == "/api/v4/account") == 1
    status = app_client.http.get(f"/integrations/{integration}/status", headers=admin_headers())
    assert status.status_code == 200
    assert status.json_body["phones_dropped"] == {
        "count": 1, "contacts": 1, "example": {"contact": str(contact["id"]), "phone": "8 02* ***-45"}}
    assert status.json_body["costs_dropped"] == {"count": 0, "example": None}
    assert "123-45" not in json.dumps(status.json_body)  # no dropped number in the clear


def test_a_put_makes_the_kept_account_stale_and_a_garbled_read_is_not_kept(app_client, integration, amocrm,
                                                                          account, worker, metrika_sandbox):
    """The account kept in DynamoDB from before `PUT /integrations/{id}` is read again on the next
    delivery (a currency changed in amoCRM shows once the admin saves). A 200 from `GET /api/v4/account`
    that is not the account is a failed read: the copy from before serves, and the answer is not kept,
    so the next delivery asks again."""
    reads = lambda: sum(1 for r in amocrm.requests if r["path"] == "/api/v4/account")  # noqa: E731
    amocrm.update_lead(account["lead"]["id"], status_id=1002)
    deliver(app_client, integration, amocrm)
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(account["lead"]["id"])]["currency"] == "RUB"
    before = reads()
    try:
        amocrm.set_account(currency="EUR")
        configure(app_client, integration, amocrm)  # the same config, saved again
        amocrm.set_faults(account_answer=[])
        lead = amocrm.create_lead("Заказ EUR", 7001, 142, price=99, contacts=[account["contact"]["id"]])
        deliver(app_client, integration, amocrm)
        worker.drain()
        assert metrika_sandbox.counter(COUNTER).orders[str(lead["id"])]["currency"] == "RUB"  # the copy
        assert reads() == before + 1
        amocrm.set_faults()
        amocrm.update_lead(lead["id"], price=100)
        deliver(app_client, integration, amocrm)
        worker.drain()
        assert metrika_sandbox.counter(COUNTER).orders[str(lead["id"])]["currency"] == "EUR"
        assert reads() == before + 2
        amocrm.update_lead(lead["id"], price=101)
        deliver(app_client, integration, amocrm)
        worker.drain()
        assert reads() == before + 2  # kept: read once
    finally:
        amocrm.set_faults()
        amocrm.set_account(currency="RUB")
        configure(app_client, integration, amocrm)  # and the next test reads RUB again


def test_reconciliation_finds_a_lead_changed_without_a_webhook_while_amocrm_clock_lags(app_client, integration,
                                                                                      amocrm, account, worker,
                                                                                      metrika_sandbox):
    """The sandbox's clock runs four hours behind ours. The window is kept in amoCRM's own clock (the
    newest `updated_at` it listed), so a change it dates four hours "ago" is still inside the next one;
    with the window kept in our clock, it never was."""
    lead = account["lead"]
    assert lead["updated_at"] < time.time() - 3 * 3600  # the CRM clock lags ours by hours
    first = app_client.http.post(f"/integrations/{integration}/reconcile", headers=admin_headers(), body=b"{}")
    assert first.status_code == 200 and first.json_body["found"] == 1  # the seeded lead, never announced
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(lead["id"])]["order_status"] == "amo_7001_1001"
    amocrm.update_lead(lead["id"], status_id=1002, notify=False)  # no webhook at all
    second = app_client.http.post(f"/integrations/{integration}/reconcile", headers=admin_headers(), body=b"{}")
    assert second.json_body["queued"] == 1
    worker.drain()
    assert metrika_sandbox.counter(COUNTER).orders[str(lead["id"])]["order_status"] == "amo_7001_1002"
    uploads = len(orders_uploads(metrika_sandbox))
    third = app_client.http.post(f"/integrations/{integration}/reconcile", headers=admin_headers(), body=b"{}")
    assert (third.json_body["found"], third.json_body["queued"]) == (1, 0)  # the overlap re-reads it, sends nothing
    worker.drain()
    assert len(orders_uploads(metrika_sandbox)) == uploads
