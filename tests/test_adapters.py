"""Each I/O adapter maps its wire errors to the one taxonomy (`chalicelib.errors`), over loopback HTTP
against the sandboxes. No DynamoDB: the shared rate limiter is a `reserve_slot` that never waits.

Bitrix24 answers a failed batch sub-call inside `result_error` with HTTP 200; only "Not found" means
the entity was deleted, so an access or time-limit error must never turn a won deal into CANCELLED."""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef
from chalicelib.crm.amocrm.api import AmoCrmClient
from chalicelib.crm.amocrm.source import AmoCrmSource
from chalicelib.crm.bitrix24 import api as b24
from chalicelib.crm.bitrix24.api import Bitrix24Client, NotFound
from chalicelib.crm.bitrix24.source import Bitrix24Source
from chalicelib.errors import BridgeError, Misconfigured, Permanent, Transient, http_error
from chalicelib.metrika import cdp
from chalicelib.metrika.client import MetrikaClient
from chalicelib.metrika.governor import QuotaGovernor
from sandbox.bitrix24 import seed_demo
from tests.conftest import METRIKA_TOKEN


def no_wait(scope: str, interval: float, now: float) -> float:
    return now


@pytest.fixture(scope="module")
def html_page():
    """A host that answers every request 200 with an HTML page (a proxy's or a maintenance page)."""
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            payload = b"<html><body><h1>Service temporarily unavailable</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- Bitrix24 ------------------------------------------------------------------------------------------

@pytest.fixture
def portal(bitrix):
    bitrix.reset()
    return seed_demo(bitrix)


@pytest.fixture
def source():
    return Bitrix24Source(no_wait, attempts=2, backoff=0.01)


@pytest.fixture
def b24_integration(bitrix, portal):
    return {"crm": "bitrix24", "connection": {"webhook_url": bitrix.webhook_url}}


@pytest.fixture
def mapping(source, b24_integration):
    return source.default_mapping(b24_integration)


def deal_snapshot(source, integration, mapping, deal_id):
    return source.snapshot(integration, mapping, [EntityRef(ORDER, deal_id, 0, "update")])[(ORDER, deal_id)]


def test_b24_readable_deal_with_contact_and_lead(source, b24_integration, mapping, portal):
    entity = deal_snapshot(source, b24_integration, mapping, portal["deal_id"])
    assert not entity.gone and entity.error is None
    assert entity.orders[0]["client_uniq_id"] == portal["contact_id"]
    assert entity.contacts[0]["uniq_id"] == portal["contact_id"]


@pytest.mark.parametrize("code, description", [("ACCESS_DENIED", "Access denied"), ("", "Access denied.")])
def test_b24_deal_access_denied_is_parked_not_gone(source, b24_integration, mapping, bitrix, portal, code, description):
    bitrix.fail_method("crm.deal.get", portal["deal_id"], code, description)
    entity = deal_snapshot(source, b24_integration, mapping, portal["deal_id"])
    assert not entity.gone, "an unreadable deal is not a deleted one (it would be sent as CANCELLED)"
    assert entity.orders == [] and entity.contacts == []
    assert entity.error["kind"] == "misconfigured" and entity.error["source"] == "bitrix24"
    assert f"deal {portal['deal_id']}" in entity.error["message"] and "Access denied" in entity.error["message"]


def test_b24_deal_other_method_error_is_parked_as_permanent(source, b24_integration, mapping, bitrix, portal):
    bitrix.fail_method("crm.deal.get", portal["deal_id"], "INVALID_ARG_VALUE", "Invalid value of id")
    entity = deal_snapshot(source, b24_integration, mapping, portal["deal_id"])
    assert not entity.gone and entity.orders == []
    assert entity.error["kind"] == "permanent" and "INVALID_ARG_VALUE" in entity.error["message"]


@pytest.mark.parametrize("code", ["OPERATION_TIME_LIMIT", "INTERNAL_SERVER_ERROR", "QUERY_LIMIT_EXCEEDED",
                                  "ERROR_UNEXPECTED_ANSWER"])
def test_b24_transient_deal_sub_error_fails_the_whole_snapshot(source, b24_integration, mapping, bitrix, portal, code):
    other = bitrix.create_deal("Заказ #2", stage_id="C2:NEW", category_id=2, notify=False)
    bitrix.fail_method("crm.deal.get", portal["deal_id"], code, "try later")
    refs = [EntityRef(ORDER, other["ID"], 0, "update"), EntityRef(ORDER, portal["deal_id"], 0, "update")]
    with pytest.raises(Transient) as info:
        source.snapshot(b24_integration, mapping, refs)
    assert info.value.source == "bitrix24" and code in info.value.message


def test_b24_not_found_deal_is_gone(source, b24_integration, mapping, bitrix, portal):
    bitrix.delete_deal(portal["deal_id"], notify=False)
    assert deal_snapshot(source, b24_integration, mapping, portal["deal_id"]).gone


def test_b24_injected_not_found_is_gone(source, b24_integration, mapping, bitrix, portal):
    bitrix.fail_method("crm.deal.get", portal["deal_id"], "", "Not found")
    assert deal_snapshot(source, b24_integration, mapping, portal["deal_id"]).gone


def test_b24_unreadable_contact_parks_the_deal_instead_of_a_synthetic_customer(source, b24_integration, mapping,
                                                                              bitrix, portal):
    bitrix.fail_method("crm.contact.get", portal["contact_id"], "ACCESS_DENIED", "Access denied")
    entity = deal_snapshot(source, b24_integration, mapping, portal["deal_id"])
    assert not entity.gone and entity.orders == [] and entity.contacts == []
    assert entity.error["kind"] == "misconfigured"
    assert f"contact {portal['contact_id']} of deal {portal['deal_id']}" in entity.error["message"]


def test_b24_unreadable_source_lead_parks_the_deal(source, b24_integration, mapping, bitrix, portal):
    bitrix.fail_method("crm.lead.get", portal["lead_id"], "", "Access denied.")
    entity = deal_snapshot(source, b24_integration, mapping, portal["deal_id"])
    assert entity.orders == [] and entity.error["kind"] == "misconfigured"
    assert f"source lead {portal['lead_id']}" in entity.error["message"]


def test_b24_transient_contact_sub_error_fails_the_snapshot(source, b24_integration, mapping, bitrix, portal):
    bitrix.fail_method("crm.contact.get", portal["contact_id"], "OPERATION_TIME_LIMIT", "Method is blocked")
    with pytest.raises(Transient):
        deal_snapshot(source, b24_integration, mapping, portal["deal_id"])


def test_b24_deleted_contact_leaves_the_deal_with_a_synthetic_customer(source, b24_integration, mapping, bitrix, portal):
    bitrix.fail_method("crm.contact.get", portal["contact_id"], "", "Not found")
    entity = deal_snapshot(source, b24_integration, mapping, portal["deal_id"])
    assert entity.error is None and entity.orders[0]["client_uniq_id"] == f"deal-{portal['deal_id']}"


@pytest.mark.parametrize("no_contact", [None, "", "0"])
def test_b24_deal_without_contact_gets_a_synthetic_customer(source, b24_integration, mapping, bitrix, portal, no_contact):
    deal = bitrix.create_deal("Без контакта", stage_id="C2:NEW", category_id=2, opportunity="100.00",
                              contact_id=no_contact, notify=False)
    entity = deal_snapshot(source, b24_integration, mapping, deal["ID"])
    assert entity.error is None and not entity.gone
    assert entity.orders[0]["client_uniq_id"] == f"deal-{deal['ID']}"
    assert entity.contacts[0]["uniq_id"] == f"deal-{deal['ID']}"


def test_b24_contact_snapshot(source, b24_integration, mapping, bitrix, portal):
    other = bitrix.create_contact("Олег", phones=["+7 916 000-00-01"], notify=False)
    gone = bitrix.create_contact("Удалён", notify=False)
    bitrix.contacts.pop(gone["ID"])
    bitrix.fail_method("crm.contact.get", portal["contact_id"], "ACCESS_DENIED", "Access denied")
    rows = source.snapshot(b24_integration, mapping, [EntityRef(CONTACT, c, 0, "update")
                                                      for c in (portal["contact_id"], other["ID"], gone["ID"])])
    assert rows[(CONTACT, portal["contact_id"])].error["kind"] == "misconfigured"
    assert not rows[(CONTACT, portal["contact_id"])].gone
    assert rows[(CONTACT, other["ID"])].contacts[0]["uniq_id"] == other["ID"]
    assert rows[(CONTACT, gone["ID"])].gone
    bitrix.fail_method("crm.contact.get", other["ID"], "INTERNAL_SERVER_ERROR", "Internal server error")
    with pytest.raises(Transient):
        source.snapshot(b24_integration, mapping, [EntityRef(CONTACT, other["ID"], 0, "update")])


def test_b24_backfill_parks_a_deal_whose_contact_is_not_visible(source, b24_integration, mapping, bitrix, portal):
    """Lists leave out what the webhook's user may not see: the deal is read again, and parked."""
    bitrix.fail_method("crm.contact.get", portal["contact_id"], "ACCESS_DENIED", "Access denied")
    page = source.backfill_page(b24_integration, mapping, [], "orders", 0, None)
    entity = page.rows[(ORDER, portal["deal_id"])]
    assert entity.orders == [] and entity.error["kind"] == "misconfigured"
    assert page.requests == 3  # list pages, relations, the deal read again


def test_b24_backfill_sends_a_deal_whose_contact_was_deleted_with_a_synthetic_customer(
        source, b24_integration, mapping, bitrix, portal):
    bitrix.contacts.pop(portal["contact_id"])
    entity = source.backfill_page(b24_integration, mapping, [], "orders", 0, None).rows[(ORDER, portal["deal_id"])]
    assert entity.error is None and entity.orders[0]["client_uniq_id"] == f"deal-{portal['deal_id']}"


def test_b24_backfill_failed_list_sub_call_fails_the_page(source, b24_integration, mapping, bitrix, portal):
    bitrix.fail_method("crm.item.productrow.list", "", "OPERATION_TIME_LIMIT", "Method is blocked")
    with pytest.raises(Transient):
        source.backfill_page(b24_integration, mapping, [], "orders", 0, None)


def test_b24_client_errors(bitrix, portal, html_page):
    client = Bitrix24Client(bitrix.webhook_url, attempts=1)
    assert client.deal("999999") is None  # does not exist
    assert client.deal(portal["deal_id"])["ID"] == portal["deal_id"]
    with pytest.raises(Misconfigured, match="NO_AUTH_FOUND") as info:
        Bitrix24Client(bitrix.webhook_url.replace(bitrix.code, "wrong"), attempts=1).deal("1")
    assert info.value.status == 401 and "incoming webhook" in info.value.message
    with pytest.raises(Permanent, match="ERROR_METHOD_NOT_FOUND"):
        client.call("crm.no.such.method")
    with pytest.raises(Transient, match="not JSON") as info:
        Bitrix24Client(html_page + "/rest/1/x/", attempts=2, backoff=0.01).deal("1")
    assert info.value.status == 200


def test_b24_batch_returns_classified_sub_errors(bitrix, portal):
    bitrix.fail_method("crm.deal.get", portal["deal_id"], "ACCESS_DENIED", "Access denied")
    bitrix.fail_method("crm.lead.get", portal["lead_id"], "OPERATION_TIME_LIMIT", "Method is blocked")
    results, errors = Bitrix24Client(bitrix.webhook_url).batch({
        "a": ("crm.deal.get", {"id": portal["deal_id"]}), "b": ("crm.deal.get", {"id": "999999"}),
        "c": ("crm.lead.get", {"id": portal["lead_id"]}), "d": ("crm.contact.get", {"id": portal["contact_id"]})})
    assert set(results) == {"d"}
    assert isinstance(errors["a"], Misconfigured) and isinstance(errors["b"], NotFound)
    assert isinstance(errors["c"], Transient)


@pytest.mark.parametrize("code, description, status, kind", [
    ("QUERY_LIMIT_EXCEEDED", "Too many requests", 503, Transient),
    ("OPERATION_TIME_LIMIT", "Method is blocked", 429, Transient),
    ("INTERNAL_SERVER_ERROR", "Internal server error", 500, Transient),
    ("ERROR_UNEXPECTED_ANSWER", "", None, Transient),
    ("", "", 502, Transient),
    ("NO_AUTH_FOUND", "Wrong authorization data", 401, Misconfigured),
    ("expired_token", "The access token provided has expired", 401, Misconfigured),
    ("insufficient_scope", "", 403, Misconfigured),
    ("INVALID_CREDENTIALS", "Invalid request credentials", 403, Misconfigured),
    ("ACCESS_DENIED", "REST API is available only on commercial plans", 403, Misconfigured),
    ("", "Access denied.", None, Misconfigured),
    ("OVERLOAD_LIMIT", "REST API is blocked due to overload.", 503, Misconfigured),
    ("INVALID_REQUEST", "Https required.", 400, Permanent),
    ("ERROR_CORE", "Parameter 'fields' must be array", None, Permanent),
])
def test_b24_classify(code, description, status, kind):
    error = b24.classify(code, description, status, "crm.deal.get")
    assert type(error) is kind and error.source == "bitrix24" and error.status == status


@pytest.mark.parametrize("code, description", [("", "Not found"), ("NOT_FOUND", "Item not found"), ("", "Not found.")])
def test_b24_classify_not_found(code, description):
    assert isinstance(b24.classify(code, description, 400, "crm.deal.get"), NotFound)


# --- amoCRM --------------------------------------------------------------------------------------------

@pytest.fixture
def account(amocrm):
    amocrm.reset()
    pipeline = amocrm.add_pipeline(3001, "Продажи", [(3002, "Новая")], is_main=True)
    contact = amocrm.create_contact("Анна", phones=["+79165550102"], notify=False)
    lead = amocrm.create_lead("Заказ", pipeline["id"], 3002, price=1500, contacts=[contact["id"]], notify=False)
    yield {"lead_id": str(lead["id"]), "contact_id": str(contact["id"])}
    amocrm.set_faults()


def test_amo_maintenance_page_is_transient_not_a_json_error(amocrm, account):
    amocrm.set_faults(maintenance=True)
    client = AmoCrmClient(amocrm.url, amocrm.token, attempts=2, backoff=0.01)
    with pytest.raises(Transient) as info:
        client.leads([account["lead_id"]])
    assert info.value.status == 200 and info.value.source == "amocrm"
    assert "not JSON" in info.value.message and "технические работы" in info.value.message
    assert sum(1 for r in amocrm.requests if r.get("maintenance")) == 2  # retried in the client, then raised


def test_amo_maintenance_page_fails_a_snapshot_as_transient(amocrm, account):
    amocrm.set_faults(maintenance=True)
    source = AmoCrmSource(no_wait, attempts=1)
    integration = {"crm": "amocrm", "connection": {"base_url": amocrm.url, "access_token": amocrm.token}}
    with pytest.raises(Transient):
        source.snapshot(integration, [], [EntityRef(ORDER, account["lead_id"], 0, "update")])
    amocrm.set_faults()
    rows = source.snapshot(integration, [], [EntityRef(ORDER, account["lead_id"], 0, "update")])
    assert not rows[(ORDER, account["lead_id"])].gone


def test_amo_revoked_token_is_misconfigured_and_says_what_to_do(amocrm, account):
    with pytest.raises(Misconfigured) as info:
        AmoCrmClient(amocrm.url, "revoked-token", attempts=3, backoff=0.01).leads([account["lead_id"]])
    error = info.value
    assert error.status == 401 and error.source == "amocrm" and not error.retryable
    assert "long-lived token" in error.message and "access_token" in error.message
    assert "revoked-token" not in str(error.describe())
    assert len(amocrm.requests) == 0  # refused before counting, and not retried


def test_amo_throttling_and_server_errors_are_transient_after_retries(amocrm, account):
    amocrm.set_faults(error_5xx=1.0)
    client = AmoCrmClient(amocrm.url, amocrm.token, attempts=3, backoff=0.01)
    with pytest.raises(Transient) as info:
        client.contacts([account["contact_id"]])
    assert info.value.status == 503 and len(amocrm.requests) == 3
    amocrm.set_faults(error_429=1.0)
    with pytest.raises(Transient) as info:
        client.contacts([account["contact_id"]])
    assert info.value.status == 429


def test_amo_network_error_is_transient():
    from sandbox.local_stack import free_port
    with pytest.raises(Transient, match="unreachable"):
        AmoCrmClient(f"http://127.0.0.1:{free_port()}", "t", attempts=1).leads(["1"])


def test_amo_other_4xx_is_permanent(amocrm, account):
    with pytest.raises(Permanent) as info:
        AmoCrmClient(amocrm.url, amocrm.token, attempts=3).get("/api/v4/no-such-thing")
    assert info.value.status == 404 and type(info.value) is Permanent


# --- Metrika -------------------------------------------------------------------------------------------

ORDER_ROW = {"id": "d-1", "client_uniq_id": "c-1", "client_type": "CONTACT", "create_date_time": "2026-01-10 10:00:00",
             "order_status": "PAID", "revenue": 1500}


@pytest.fixture
def metrika(metrika_sandbox):
    return MetrikaClient(METRIKA_TOKEN, metrika_sandbox.url, timeout=(1.0, 2.0))


def test_metrika_400_is_permanent_with_locations(metrika):
    with pytest.raises(Permanent) as info:
        metrika.upload_orders(7, [dict(ORDER_ROW, create_date_time="2026-01-10T10:00:00Z")])
    error = info.value
    assert type(error) is Permanent and error.status == 400 and error.source == "metrika"
    assert error.locations == ["orders[0].createDateTime"]
    assert error.describe()["kind"] == "permanent"


@pytest.mark.parametrize("token, status", [("", 401), ("other", 403)])
def test_metrika_refused_token_is_misconfigured(metrika_sandbox, token, status):
    metrika_sandbox.tokens = {"other": {99}}
    try:
        with pytest.raises(Misconfigured) as info:
            MetrikaClient(token, metrika_sandbox.url).upload_orders(7, [ORDER_ROW])
    finally:
        metrika_sandbox.tokens = None
    assert info.value.status == status and "token" in info.value.message
    assert http_error("upload", info.value).status == 422


def test_metrika_429_honours_retry_after(metrika_sandbox):
    pauses = []  # recorded, not slept
    metrika = MetrikaClient(METRIKA_TOKEN, metrika_sandbox.url, timeout=(1.0, 2.0), sleep=pauses.append)
    metrika_sandbox.set_faults(error_429=1.0)
    with pytest.raises(Transient) as info:
        metrika.upload_orders(7, [ORDER_ROW])
    assert info.value.status == 429 and info.value.retry_after == 1.0 and not info.value.daily_quota
    assert pauses == [1.0]  # the one quick retry waited the Retry-After
    assert http_error("upload", info.value).error == "metrika_unavailable"


def test_metrika_daily_quota(metrika, metrika_sandbox):
    metrika_sandbox.daily_limit = 0
    try:
        with pytest.raises(Transient) as info:
            metrika.upload_orders(7, [ORDER_ROW])
    finally:
        metrika_sandbox.daily_limit = 5000
    error = info.value
    assert error.daily_quota and error.retry_after > 0
    assert abs(error.retry_after - cdp.seconds_until_quota_reset()) < 60


def test_metrika_daily_quota_reset_is_next_utc_midnight_without_http():
    now = datetime(2026, 11, 28, 23, 0, tzinfo=timezone.utc)
    with pytest.raises(Transient) as info:
        cdp.decipher_response(429, {"Retry-After": "5"},
                              b'{"errors":[{"error_type":"quota_requests_by_counter_id","message":"daily"}]}', now)
    assert info.value.daily_quota and info.value.retry_after == 3600


def test_metrika_html_200_is_transient(html_page):
    pauses = []  # the quick retry's pause, recorded, not slept
    with pytest.raises(Transient) as info:
        MetrikaClient("t", html_page, sleep=pauses.append).upload_orders(7, [ORDER_ROW])
    assert info.value.status == 200 and "not JSON" in info.value.message and len(pauses) == 1
    with pytest.raises(Transient):
        cdp.decipher_response(200, {}, b"<html>maintenance</html>")
    assert cdp.decipher_response(200, {}, b"") == {}


def test_metrika_governor_refusals_are_transient():
    class Store:
        def __init__(self, slot, counted):
            self.slot, self.counted = slot, counted

        def acquire_lease(self, *args):
            return self.slot

        def count_request(self, *args):
            return self.counted

        def release_lease(self, *args):
            pass

    busy = QuotaGovernor(Store(None, 1), "t", max_wait=0.0, clock=lambda: 1_800_000_000.0, sleep=lambda s: None)
    with pytest.raises(Transient) as info, busy.request():
        pass
    assert info.value.source == "metrika" and info.value.retry_after == 5 and not info.value.daily_quota
    spent = QuotaGovernor(Store(0, None), "t", clock=lambda: 1_800_000_000.0)
    with pytest.raises(Transient) as info, spent.request():
        pass
    assert info.value.daily_quota and info.value.retry_after > 0


def test_every_adapter_error_is_a_bridge_error():
    for kind in (Transient, Permanent, Misconfigured):
        assert issubclass(kind, BridgeError)
