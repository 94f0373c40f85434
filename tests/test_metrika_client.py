"""The CDP client over real HTTP against the sandbox, and how `cdp` maps answers to the error taxonomy."""
from datetime import datetime, timezone

import pytest

from chalicelib.errors import BridgeError, Misconfigured, Permanent, Transient
from chalicelib.metrika import cdp
from chalicelib.metrika.client import MetrikaClient
from sandbox.local_stack import free_port
from tests.conftest import METRIKA_TOKEN

ORDER = {"id": "d-1", "client_uniq_id": "c-1", "client_type": "CONTACT", "create_date_time": "2026-01-10 10:00:00",
         "order_status": "PAID", "revenue": 1500}


@pytest.fixture
def client(metrika_sandbox):
    return MetrikaClient(METRIKA_TOKEN, metrika_sandbox.url, timeout=(1.0, 1.0))


def test_sends_the_oauth_header_and_uploads(client, metrika_sandbox):
    uploading = client.upload_contacts(7, [{"uniq_id": "c-1", "phones": ["79161234567"]}])
    assert uploading["api_validation_status"] == "PASSED" and uploading["elements_count"] == 1
    client.upload_orders(7, [ORDER])
    counter = metrika_sandbox.counter(7)
    assert counter.orders["d-1"]["revenue"] == 1500
    assert [r["query"]["merge_mode"] for r in metrika_sandbox.requests] == ["SAVE", "SAVE"]


def test_reads_counter_time_zone_statuses_and_last_uploadings(client, metrika_sandbox):
    metrika_sandbox.add_counter(8, "Asia/Yekaterinburg")
    assert client.counter_time_zone(8) == "Asia/Yekaterinburg"
    client.save_order_statuses(8, [{"id": "won", "type": "PAID", "humanized": "Won"}])
    assert [s["id"] for s in client.get_order_statuses(8)] == ["won"]
    first = client.upload_orders(8, [ORDER])
    second = client.upload_orders(8, [dict(ORDER, id="d-2")])
    listed = client.last_uploadings(8, limit=10)
    assert [u["uploading_id"] for u in listed] == [second["uploading_id"], first["uploading_id"]]


def test_validation_errors_are_permanent_with_metrika_location(client):
    with pytest.raises(Permanent) as info:
        client.upload_orders(7, [dict(ORDER, create_date_time="2026-01-10T10:00:00Z")])
    error = info.value
    assert error.status == 400 and not error.retryable and error.source == "metrika"
    assert error.errors[0]["location"] == "orders[0].createDateTime"
    assert error.locations == ["orders[0].createDateTime"]
    assert "orders[0].createDateTime" in error.message


def test_missing_token_is_misconfigured_401(metrika_sandbox):
    with pytest.raises(Misconfigured) as info:
        MetrikaClient("", metrika_sandbox.url).upload_orders(7, [ORDER])
    assert info.value.status == 401 and not info.value.retryable


def test_token_without_access_is_misconfigured_403(metrika_sandbox):
    metrika_sandbox.tokens = {"other": {99}}
    try:
        with pytest.raises(Misconfigured) as info:
            MetrikaClient("other", metrika_sandbox.url).upload_orders(7, [ORDER])
        assert info.value.status == 403 and info.value.errors[0]["error_type"] == "access_denied"
    finally:
        metrika_sandbox.tokens = None


@pytest.mark.parametrize("fault, status", [({"error_503": 1.0}, 503), ({"error_429": 1.0}, 429)])
def test_backend_errors_and_throttling_are_retryable(metrika_sandbox, fault, status):
    pauses = []  # recorded, not slept
    client = MetrikaClient(METRIKA_TOKEN, metrika_sandbox.url, timeout=(1.0, 1.0), sleep=pauses.append)
    metrika_sandbox.set_faults(**fault)
    with pytest.raises(Transient) as info:
        client.upload_orders(7, [ORDER])
    assert info.value.status == status and info.value.retryable
    assert len(metrika_sandbox.requests) == 2 and len(pauses) == 1  # one quick retry, after a pause
    if status == 429:
        assert info.value.retry_after == 1.0 and pauses == [1.0]  # the pause is the Retry-After
    else:
        assert 0 < pauses[0] <= 0.5


def test_daily_quota_waits_until_midnight_utc(client, metrika_sandbox):
    metrika_sandbox.daily_limit = 1
    try:
        client.upload_orders(7, [ORDER])
        with pytest.raises(Transient) as info:
            client.upload_orders(7, [ORDER])
        assert info.value.errors[0]["error_type"] == "quota_requests_by_uid"
        assert info.value.retry_after > 0 and info.value.daily_quota
    finally:
        metrika_sandbox.daily_limit = 5000


def test_timeouts_are_retryable(metrika_sandbox):
    client = MetrikaClient(METRIKA_TOKEN, metrika_sandbox.url, timeout=(1.0, 0.2))
    metrika_sandbox.set_faults(slow=1.0, slow_seconds=0.5)
    with pytest.raises(Transient) as info:
        client.upload_orders(7, [ORDER])
    assert info.value.status is None and "in time" in info.value.message


def test_network_errors_are_retryable():
    with pytest.raises(Transient) as info:
        MetrikaClient("t", f"http://127.0.0.1:{free_port()}").upload_orders(7, [ORDER])
    assert "unreachable" in info.value.message


def test_token_never_shows_in_repr_or_errors(client):
    assert METRIKA_TOKEN not in repr(client)
    with pytest.raises(BridgeError) as info:
        client.upload_orders(7, [{"id": ""}])
    assert METRIKA_TOKEN not in str(info.value.describe())


# --- decipher_response without HTTP ------------------------------------------------------------------

def test_420_is_throttling_like_429():
    with pytest.raises(Transient):
        cdp.decipher_response(420, {}, b'{"errors":[{"error_type":"quota_requests_by_ip","message":"slow down"}]}')


@pytest.mark.parametrize("status", [400, 404, 406, 409])
def test_other_4xx_are_permanent(status):
    with pytest.raises(Permanent) as info:
        cdp.decipher_response(status, {}, b'{"errors":[],"code":%d,"message":"no"}' % status)
    assert type(info.value) is Permanent


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_misconfigured(status):
    with pytest.raises(Misconfigured) as info:
        cdp.decipher_response(status, {}, b'{"errors":[],"code":%d,"message":"no"}' % status)
    assert not info.value.retryable


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_are_retryable(status):
    with pytest.raises(Transient):
        cdp.decipher_response(status, {}, b"")


def test_non_json_error_bodies_are_summarised():
    with pytest.raises(Transient) as info:
        cdp.decipher_response(502, {}, b"<html>Bad gateway</html>")
    assert "Bad gateway" in info.value.message


def test_daily_quota_reset_is_next_utc_midnight():
    now = datetime(2026, 11, 28, 23, 0, tzinfo=timezone.utc)
    with pytest.raises(Transient) as info:
        cdp.decipher_response(429, {"Retry-After": "5"},
                              b'{"errors":[{"error_type":"quota_requests_by_uid","message":"daily"}]}', now)
    assert info.value.retry_after == 3600 and info.value.daily_quota


def test_success_returns_the_decoded_body():
    assert cdp.decipher_response(200, {}, b'{"success": true}') == {"success": True}


def test_success_that_is_not_json_is_transient():
    with pytest.raises(Transient) as info:
        cdp.decipher_response(200, {}, b"<html><title>Proxy</title></html>")
    assert info.value.status == 200 and "Proxy" in info.value.message


def test_requests_are_built_for_the_documented_paths():
    request = cdp.upload_orders(5, [ORDER])
    assert (request.method, request.path, request.params) == (
        "POST", "/cdp/api/v1/counter/5/data/orders/json", {"merge_mode": "SAVE"})
    assert cdp.upload_contacts(5, []).params == {"merge_mode": "SAVE"}
    assert cdp.get_counter(5).path == "/management/v1/counter/5"
    assert cdp.last_uploadings(5, 50, "2026-01-01 00:00:00").params == {"limit": "50", "datetime_offset": "2026-01-01 00:00:00"}


def test_an_answered_503_is_tried_once_more_after_a_short_pause(metrika_sandbox):
    pauses = []

    def pause(seconds):  # Metrika recovers while we wait
        pauses.append(seconds)
        metrika_sandbox.set_faults()

    metrika_sandbox.set_faults(error_503=1.0)
    uploading = MetrikaClient(METRIKA_TOKEN, metrika_sandbox.url, sleep=pause).upload_orders(7, [ORDER])
    assert uploading["uploading_id"] and len(pauses) == 1 and 0 < pauses[0] <= 0.5
    assert [r["status"] for r in metrika_sandbox.requests] == [503, 200]


def test_quick_retry_gives_up_after_one_and_leaves_timeouts_and_quotas_to_the_caller(metrika_sandbox):
    pauses = []
    client = MetrikaClient(METRIKA_TOKEN, metrika_sandbox.url, sleep=pauses.append, timeout=(1, 0.3))
    metrika_sandbox.set_faults(error_503=1.0)
    with pytest.raises(Transient):
        client.upload_orders(7, [ORDER])
    assert len(metrika_sandbox.requests) == 2 and len(pauses) == 1
    metrika_sandbox.set_faults(slow=1.0, slow_seconds=0.6)
    with pytest.raises(Transient):
        client.upload_orders(7, [ORDER])
    assert len(pauses) == 1  # a timeout already took its time: no quick retry
    metrika_sandbox.set_faults()
