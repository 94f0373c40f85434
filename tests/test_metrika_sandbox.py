"""The Metrika sandbox itself: documented validation, merge modes, quotas and fault injection.
Requests are sent raw with `requests`, so the sandbox is checked apart from our client."""
import threading
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import requests

from sandbox.metrika import fingerprint

TOKEN = "sandbox-test-token"


def post(sandbox, path, body, token=TOKEN, **params):
    return requests.post(sandbox.url + path, json=body, params=params,
                         headers={"Authorization": f"OAuth {token}"} if token else {}, timeout=10)


def contacts(sandbox, rows, mode="SAVE", counter=1):
    return post(sandbox, f"/cdp/api/v1/counter/{counter}/data/contacts/json", {"contacts": rows}, merge_mode=mode)


def orders(sandbox, rows, mode="SAVE", counter=1):
    return post(sandbox, f"/cdp/api/v1/counter/{counter}/data/orders/json", {"orders": rows}, merge_mode=mode)


def order(**fields):
    row = {"id": "o1", "client_uniq_id": "c1", "client_type": "CONTACT", "create_date_time": "2026-01-01 10:00:00",
           "order_status": "PAID"}
    row.update(fields)
    return row


def locations(response):
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 400 and body["message"]
    return {e["location"] for e in body["errors"]}


def test_error_body_has_the_documented_shape(metrika_sandbox):
    response = orders(metrika_sandbox, [order(create_date_time="2026-01-01T10:00:00Z")])
    body = response.json()
    assert body["errors"][0] == {"error_type": "invalid_parameter", "message": "date-time must be yyyy-MM-dd HH:mm:ss",
                                 "location": "orders[0].createDateTime"}


def test_contact_rules(metrika_sandbox):
    assert contacts(metrika_sandbox, [{"uniq_id": "c1", "client_ids": ["1714651234567890123"], "emails": ["a@b.ru"],
                                       "phones": ["79161234567"]}]).status_code == 200
    bad = contacts(metrika_sandbox, [{"uniq_id": " ", "client_ids": ["0"], "emails": ["A@B.ru"], "phones": ["+7916"],
                                      "emails_md5": ["xyz"], "create_date_time": "1969-12-31 00:00:00"}])
    assert locations(bad) == {"contacts[0].uniqId", "contacts[0].clientIds[0]", "contacts[0].emails[0]",
                              "contacts[0].phones[0]", "contacts[0].emailsMd5[0]", "contacts[0].createDateTime"}


def test_empty_uploads_and_bad_merge_mode_are_refused(metrika_sandbox):
    assert locations(contacts(metrika_sandbox, [])) == {"contacts"}
    assert orders(metrika_sandbox, [order()], mode="MERGE").status_code == 400


def test_order_rules(metrika_sandbox):
    now = datetime.now(ZoneInfo("Europe/Moscow"))
    future = (now + timedelta(minutes=30)).strftime("%Y-%m-%d %H:%M:%S")
    bad = orders(metrika_sandbox, [order(update_date_time="2025-12-31 10:00:00", finish_date_time=future, revenue=-1,
                                         order_status="unknown_status", client_type="COMPANY", products={"p": -1},
                                         purchase_id="x")])
    assert locations(bad) == {"orders[0].updateDateTime", "orders[0].finishDateTime", "orders[0].revenue",
                              "orders[0].orderStatus", "orders[0].clientType", "orders[0].products",
                              "orders[0].purchaseId"}


def test_mapped_statuses_become_valid_order_statuses(metrika_sandbox):
    assert orders(metrika_sandbox, [order(order_status="won")]).status_code == 400
    statuses = post(metrika_sandbox, "/cdp/api/v1/counter/1/schema/order_statuses",
                    {"order_statuses": [{"id": "won", "type": "PAID", "humanized": "Won"}]})
    assert statuses.json() == {"success": True}
    assert orders(metrika_sandbox, [order(order_status="won")]).status_code == 200


def test_order_status_rules(metrika_sandbox):
    bad = post(metrika_sandbox, "/cdp/api/v1/counter/1/schema/order_statuses",
               {"order_statuses": [{"id": "в работе", "type": "PAID"}, {"id": "lost", "type": "CANCELED"}]})
    assert locations(bad) == {"orderStatuses[0].id", "orderStatuses[1].type"}


def test_merge_modes(metrika_sandbox):
    contacts(metrika_sandbox, [{"uniq_id": "c1", "name": "A", "phones": ["71"], "create_date_time": "2026-01-01 10:00:00"}])
    contacts(metrika_sandbox, [{"uniq_id": "c1", "phones": ["72"], "create_date_time": "2026-01-02 10:00:00"}], "APPEND")
    stored = metrika_sandbox.counter(1).contacts["c1"]
    assert stored["phones"] == ["71", "72"] and stored["name"] == "A"
    assert stored["create_date_time"] == "2026-01-01 10:00:00"  # creation dates never change
    contacts(metrika_sandbox, [{"uniq_id": "c1", "phones": ["73"]}], "UPDATE")
    stored = metrika_sandbox.counter(1).contacts["c1"]
    assert stored["phones"] == ["73"] and stored["name"] == "A"
    contacts(metrika_sandbox, [{"uniq_id": "c1", "phones": ["74"]}], "SAVE")
    assert "name" not in metrika_sandbox.counter(1).contacts["c1"]


def test_orders_arriving_before_their_contact_are_recorded(metrika_sandbox):
    orders(metrika_sandbox, [order(client_uniq_id="nobody")])
    assert metrika_sandbox.counter(1).orders_before_contact == ["o1"]


def test_auth_header_required(metrika_sandbox):
    assert orders(metrika_sandbox, [order()], ) .status_code == 200
    response = post(metrika_sandbox, "/cdp/api/v1/counter/1/data/orders/json", {"orders": [order()]}, token=None,
                    merge_mode="SAVE")
    assert response.status_code == 401 and response.json()["errors"][0]["error_type"] == "unauthorized"


def test_more_than_three_requests_in_flight_get_429(metrika_sandbox):
    metrika_sandbox.set_faults(slow=1.0, slow_seconds=0.5)
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(orders(metrika_sandbox, [order()]).status_code))
               for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 200, 200, 429, 429]
    assert metrika_sandbox.max_in_flight == 3


def test_daily_limit_counts_per_token(metrika_sandbox):
    metrika_sandbox.daily_limit = 2
    try:
        assert [orders(metrika_sandbox, [order()]).status_code for _ in range(3)] == [200, 200, 429]
        assert post(metrika_sandbox, "/cdp/api/v1/counter/1/data/orders/json", {"orders": [order()]},
                    token="another", merge_mode="SAVE").status_code == 200
        assert metrika_sandbox.used_today[fingerprint(TOKEN)] == 2
        assert TOKEN not in str(metrika_sandbox.state())
    finally:
        metrika_sandbox.daily_limit = 5000


def test_fault_injection_shares(metrika_sandbox):
    metrika_sandbox.set_faults(error_503=0.3, error_429=0.2, seed=7)
    codes = [orders(metrika_sandbox, [order()]).status_code for _ in range(200)]
    assert 40 <= codes.count(503) <= 80 and 20 <= codes.count(429) <= 60
    assert codes.count(200) == 200 - codes.count(503) - codes.count(429)


def test_control_endpoints_configure_and_reset(metrika_sandbox):
    requests.post(metrika_sandbox.url + "/_sandbox/config", json={"counters": {"55": "UTC"}, "faults": {"error_503": 1}})
    assert orders(metrika_sandbox, [order()], counter=55).status_code == 503
    requests.post(metrika_sandbox.url + "/_sandbox/reset")
    assert orders(metrika_sandbox, [order()], counter=55).status_code == 200
    state = requests.get(metrika_sandbox.url + "/_sandbox/state").json()
    assert state["counters"]["55"]["orders"]["o1"]["order_status"] == "PAID"


def test_an_uploading_can_be_reported_failed_over_http(metrika_sandbox):
    """The local stack runs the sandbox in its own process: `POST /_sandbox/config` with
    `fail_uploadings` makes `last_uploadings` report those uploads FAILED, as Metrika may after the 200."""
    accepted = orders(metrika_sandbox, [order()], counter=56)
    assert accepted.status_code == 200
    uploading_id = accepted.json()["uploading"]["uploading_id"]
    listed = lambda: requests.get(metrika_sandbox.url + "/cdp/api/v1/counter/56/last_uploadings",  # noqa: E731
                                  headers={"Authorization": f"OAuth {TOKEN}"}, timeout=10).json()["uploadings"]
    assert [u["api_validation_status"] for u in listed()] == ["PASSED"]
    assert requests.post(metrika_sandbox.url + "/_sandbox/config", json={"fail_uploadings": [uploading_id]},
                         timeout=10).status_code == 200
    assert [(u["uploading_id"], u["api_validation_status"]) for u in listed()] == [(uploading_id, "FAILED")]
