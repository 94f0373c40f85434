"""Webhook ingest: verify → parse → mark dirty (conditional) → one SQS message per entity → answer.
In-process Chalice app against moto_server over loopback."""
import json
from urllib.parse import urlencode

import boto3
import pytest

from chalicelib.crm import EntityRef
from chalicelib.errors import ApiError, Unavailable
from chalicelib.ingest import Ingest, newest_refs
from chalicelib.queue import EventQueue
from tests.conftest import AMO_SECRET, B24_APP_TOKEN, admin_headers, amocrm_config, bitrix24_config

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def amo(app_client, integration_id):
    app_client.http.put(f"/integrations/{integration_id}", headers=admin_headers(),
                        body=json.dumps(amocrm_config(timezone="Europe/Moscow")))
    return integration_id


@pytest.fixture
def b24(app_client, integration_id):
    iid = integration_id + "-b24"
    app_client.http.put(f"/integrations/{iid}", headers=admin_headers(), body=json.dumps(bitrix24_config(timezone="UTC")))
    return iid


def amo_body(*pairs, account="32427762"):
    return urlencode([("account[subdomain]", "shop"), ("account[id]", account), *pairs]).encode()


def lead(action, lead_id, modified, index=0, **fields):
    pairs = [(f"leads[{action}][{index}][id]", str(lead_id)), (f"leads[{action}][{index}][last_modified]", str(modified))]
    return pairs + [(f"leads[{action}][{index}][{k}]", str(v)) for k, v in fields.items()]


def post_amo(client, integration_id, body, secret=AMO_SECRET):
    query = f"?{urlencode({'secret': secret})}" if secret is not None else ""
    return client.http.post(f"/webhooks/amocrm/{integration_id}{query}", headers=FORM, body=body)


def state(integration_id, kind, crm_id):
    from app import get_store
    return get_store().get_entity(integration_id, kind, crm_id)


def test_amocrm_webhook_queues_one_message_per_entity(app_client, amo, queue):
    body = amo_body(*lead("update", 5, 1700000000, status_id=142, old_status_id=1001),
                    *lead("status", 5, 1700000000, status_id=142),
                    *lead("status", 6, 1700000005, index=1, status_id=143),
                    ("contacts[add][0][id]", "77"), ("contacts[add][0][last_modified]", "1700000001"))
    response = post_amo(app_client, amo, body)
    assert response.status_code == 200
    assert response.json_body == {"accepted": 4, "queued": 3, "ignored": 0}
    assert sorted((m["kind"], m["crm_id"]) for m in queue.bodies()) == [("contact", "77"), ("order", "5"), ("order", "6")]
    assert state(amo, "order", "5")["event_time"] == 1700000000
    assert state(amo, "order", "5")["dirty"] is True


def test_repeated_deliveries_queue_once_until_the_worker_claims(app_client, amo, queue):
    body = amo_body(*lead("status", 5, 1700000000, status_id=142))
    answers = [post_amo(app_client, amo, body).json_body["queued"] for _ in range(10)]
    assert answers == [1] + [0] * 9
    assert len(queue.bodies()) == 1
    from app import get_store
    get_store().claim(amo, "order", "5")
    assert post_amo(app_client, amo, body).json_body["queued"] == 1


def test_stale_events_never_overwrite_newer_state(app_client, amo, queue):
    post_amo(app_client, amo, amo_body(*lead("status", 5, 1700000100, status_id=143)))
    post_amo(app_client, amo, amo_body(*lead("status", 5, 1700000000, status_id=142)))
    assert state(amo, "order", "5")["event_time"] == 1700000100
    assert state(amo, "order", "5")["last_action"] == "status"


def test_unknown_event_kinds_are_acknowledged_and_counted(app_client, amo, queue):
    response = post_amo(app_client, amo, amo_body(("task[add][0][id]", "9"), ("message[add][0][id]", "x")))
    assert response.status_code == 200 and response.json_body == {"accepted": 0, "queued": 0, "ignored": 2}
    assert queue.bodies() == []


@pytest.mark.parametrize("secret", [None, "", "wrong", AMO_SECRET + "x", AMO_SECRET[:-1]])
def test_wrong_or_missing_secret_is_403_and_records_nothing(app_client, amo, queue, secret):
    response = post_amo(app_client, amo, amo_body(*lead("status", 5, 1700000000)), secret=secret)
    assert response.status_code == 403 and response.json_body["error"] == "forbidden"
    assert state(amo, "order", "5") is None and queue.bodies() == []


def test_foreign_account_is_403(app_client, amo, queue):
    response = post_amo(app_client, amo, amo_body(*lead("status", 5, 1700000000), account="1"))
    assert response.status_code == 403 and "account 1" in response.json_body["message"]


def exist(*integration_ids):
    from app import get_store
    return all(get_store().get_integration(iid) is not None for iid in integration_ids)


def test_unknown_integration_wrong_secret_and_the_other_crms_integration_answer_alike(app_client, amo, b24, queue):
    """An outsider cannot tell which integrations exist: an unknown id, a known one with a wrong secret
    and the other CRM's integration get the same 403, body and all."""
    assert exist(amo, b24)
    body = amo_body(*lead("status", 5, 1700000000))
    answers = [post_amo(app_client, "nope-" + amo, body, secret="guess-0123456789abcdef"),
               post_amo(app_client, amo, body, secret="guess-0123456789abcdef"),
               post_amo(app_client, b24, body, secret="guess-0123456789abcdef"),
               post_amo(app_client, b24, body, secret=B24_APP_TOKEN),  # the other CRM's secret, on this route
               post_amo(app_client, "nope-" + amo, body, secret=None)]
    assert {(a.status_code, a.body) for a in answers} == {(403, answers[0].body)}
    assert answers[0].json_body == {"error": "forbidden", "message": "this webhook URL does not accept these credentials"}
    assert queue.bodies() == []


def test_bitrix24_route_answers_alike_for_unknown_ids_wrong_tokens_and_amocrm_integrations(app_client, amo, b24, queue):
    assert exist(amo, b24)
    answers = [app_client.http.post(f"/webhooks/bitrix24/{iid}", headers=FORM, body=b24_body(token=token))
               for iid, token in (("nope-" + b24, "guessed-token"), (b24, "guessed-token"), (amo, "guessed-token"),
                                  (amo, AMO_SECRET), ("nope-" + b24, B24_APP_TOKEN))]
    assert {(a.status_code, a.body) for a in answers} == {(403, answers[0].body)}
    unauthenticated = [app_client.http.post(f"/webhooks/bitrix24/{iid}", headers=FORM, body=b"event=ONCRMDEALADD")
                       for iid in ("nope-" + b24, b24, amo)]
    assert {(a.status_code, a.body) for a in unauthenticated} == {(401, unauthenticated[0].body)}
    assert queue.bodies() == []


def test_a_webhook_with_its_own_secret_on_the_other_route_is_told_where_to_go(app_client, amo, b24, queue):
    """Only a caller that holds the integration's own secret learns that it exists and which route it
    has: a misconfigured CRM, not an outsider."""
    assert exist(amo, b24)
    bitrix_on_amo_route = post_amo(app_client, b24, b24_body(), secret="anything")
    assert bitrix_on_amo_route.status_code == 400
    assert f"/webhooks/bitrix24/{b24}" in bitrix_on_amo_route.json_body["message"]
    amo_on_bitrix_route = app_client.http.post(f"/webhooks/bitrix24/{amo}?{urlencode({'secret': AMO_SECRET})}",
                                               headers=FORM, body=amo_body(*lead("status", 5, 1700000000)))
    assert amo_on_bitrix_route.status_code == 400
    assert f"/webhooks/amocrm/{amo}" in amo_on_bitrix_route.json_body["message"]
    wrong = app_client.http.post(f"/webhooks/bitrix24/{amo}?secret=wrong-secret-0123456789",
                                 headers=FORM, body=amo_body(*lead("status", 5, 1700000000)))
    assert wrong.status_code == 401
    assert queue.bodies() == []


def test_an_oversized_body_is_413_for_any_id(app_client, amo, b24):
    assert exist(amo, b24)
    from chalicelib.settings import get_settings
    body = amo_body(("leads[status][0][name]", "x" * get_settings().max_webhook_bytes))
    for path in (f"/webhooks/amocrm/nope-{amo}?secret=x", f"/webhooks/amocrm/{amo}?secret=x",
                 f"/webhooks/bitrix24/nope-{b24}", f"/webhooks/bitrix24/{b24}"):
        assert app_client.http.post(path, headers=FORM, body=body).status_code == 413, path


@pytest.mark.parametrize("body, words", [
    (b"leads[status][0][id]=5", "account"),
    (amo_body(("leads[status][0][id]", "abc")), "numeric id"),
    (b"\xff\xfe", "UTF-8"),
    (b"a=1&&=&%%%", "form-encoded"),
])
def test_malformed_bodies_are_400_with_a_reason(app_client, amo, body, words):
    response = post_amo(app_client, amo, body)
    assert response.status_code == 400 and words in response.json_body["message"]


def test_oversized_body_is_413(app_client, amo, queue):
    from chalicelib.settings import get_settings
    limit = get_settings().max_webhook_bytes
    body = amo_body(*lead("status", 5, 1700000000), ("leads[status][0][name]", "x"))
    body += b"y" * (limit + 1 - len(body))
    response = post_amo(app_client, amo, body)
    assert response.status_code == 413 and f"is {limit + 1} bytes; the limit is {limit}" in response.json_body["message"]
    assert state(amo, "order", "5") is None and queue.bodies() == []
    # one byte less is parsed (and recorded): the limit is the body's size, nothing else
    assert post_amo(app_client, amo, body[:-1]).status_code == 200
    assert state(amo, "order", "5")["event_time"] == 1700000000


def test_json_is_not_a_webhook_content_type(app_client, amo):
    response = app_client.http.post(f"/webhooks/amocrm/{amo}?secret={AMO_SECRET}",
                                     headers={"Content-Type": "application/json"}, body=b"{}")
    assert response.status_code == 415


def b24_body(event="ONCRMDEALUPDATE", deal_id="4821", token=B24_APP_TOKEN, member="7f3c2a9be1d04c5a8e6b0d2f4a1c9e37",
             ts="1714546800"):
    return urlencode({"event": event, "event_handler_id": "1187", "data[FIELDS][ID]": deal_id, "ts": ts,
                      "auth[domain]": "acme-shop.bitrix24.ru", "auth[member_id]": member,
                      "auth[application_token]": token}).encode()


def test_bitrix24_event_is_verified_and_queued(app_client, b24, queue):
    response = app_client.http.post(f"/webhooks/bitrix24/{b24}", headers=FORM, body=b24_body())
    assert response.status_code == 200 and response.json_body == {"accepted": 1, "queued": 1, "ignored": 0}
    assert queue.bodies() == [{"integration_id": b24, "kind": "order", "crm_id": "4821"}]
    assert state(b24, "order", "4821")["event_time"] == 1714546800


@pytest.mark.parametrize("kwargs", [{"token": "wrong"}, {"token": B24_APP_TOKEN[:-1]},
                                    {"member": "another-portal"}])
def test_bitrix24_wrong_token_or_portal_is_403(app_client, b24, queue, kwargs):
    response = app_client.http.post(f"/webhooks/bitrix24/{b24}", headers=FORM, body=b24_body(**kwargs))
    assert response.status_code == 403
    assert state(b24, "order", "4821") is None and queue.bodies() == []


def test_bitrix24_other_events_are_acknowledged(app_client, b24, queue):
    response = app_client.http.post(f"/webhooks/bitrix24/{b24}", headers=FORM, body=b24_body(event="ONCRMCOMPANYADD"))
    assert response.json_body == {"accepted": 0, "queued": 0, "ignored": 1}


def test_bitrix24_event_without_id_is_400(app_client, b24):
    body = urlencode({"event": "ONCRMDEALADD", "auth[application_token]": B24_APP_TOKEN}).encode()
    response = app_client.http.post(f"/webhooks/bitrix24/{b24}", headers=FORM, body=body)
    assert response.status_code == 400 and "data[FIELDS][ID]" in response.json_body["message"]


def test_queue_failure_is_503_and_the_retry_queues_the_entity(app_client, amo, queue):
    from app import get_store
    broken = Ingest(get_store(), EventQueue(boto3.client("sqs"), "no-such-queue"), max_body_bytes=10_000)
    body = amo_body(*lead("status", 5, 1700000000, status_id=142))
    with pytest.raises(Unavailable):  # the app answers 503 for it (test_storage_failure_is_a_json_503_not_a_500)
        broken.amocrm(amo, body, {"secret": AMO_SECRET})
    assert "queued_until" not in state(amo, "order", "5")  # the lease was given back
    # amoCRM retries the delivery: this time the message is queued, nothing was lost.
    assert post_amo(app_client, amo, body).json_body["queued"] == 1
    assert len(queue.bodies()) == 1


def test_refs_for_one_entity_in_one_body_collapse_to_the_newest():
    refs = [EntityRef("order", "1", 10, "update"), EntityRef("order", "1", 12, "status"), EntityRef("contact", "1", 5, "add")]
    assert sorted(newest_refs(refs), key=lambda r: r.kind) == [refs[2], refs[1]]


def test_storage_failure_is_a_json_503_not_a_500(app_client, amo, monkeypatch):
    import app

    def unreachable(*args, **kwargs):  # what DynamoStore raises for EndpointConnectionError & co.
        raise Unavailable("store", "EndpointConnectionError")

    monkeypatch.setattr(app.get_store(), "get_integration", unreachable)
    response = post_amo(app_client, amo, amo_body(*lead("status", 5, 1700000000)))
    assert response.status_code == 503 and response.json_body["error"] == "unavailable"


class CountingDynamoDB:
    """boto3's DynamoDB client, counting the GetItem calls that reach the emulator."""

    def __init__(self):
        self._client, self.get_items = boto3.client("dynamodb"), 0

    def get_item(self, **kwargs):
        self.get_items += 1
        return self._client.get_item(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_warm_webhooks_reuse_the_integration_and_a_rotated_secret_works_at_once(app_client, amo, queue):
    """Two Lambdas: one answers webhooks from its recent copy of the integration, the other (the admin
    API) rotates the secret. The new secret is accepted at once, the old one refused from then on."""
    from chalicelib.settings import get_settings
    from chalicelib.store.dynamodb import DynamoStore
    settings = get_settings()
    db = CountingDynamoDB()
    webhooks = Ingest(DynamoStore(db, settings.config_table, settings.state_table, quota_table=settings.quota_table),
                      EventQueue(boto3.client("sqs"), settings.events_queue), max_body_bytes=settings.max_webhook_bytes)
    for i in range(3):
        webhooks.amocrm(amo, amo_body(*lead("status", 5, 1700000000 + i)), {"secret": AMO_SECRET})
    assert db.get_items == 1  # the config was read once for three webhooks
    rotated = "rotated-secret-0123456789abcdef"
    config = amocrm_config(timezone="Europe/Moscow")
    config["connection"]["webhook_secret"] = rotated
    assert app_client.http.put(f"/integrations/{amo}", headers=admin_headers(), body=json.dumps(config)).status_code == 200
    assert webhooks.amocrm(amo, amo_body(*lead("status", 5, 1700000010)), {"secret": rotated})["accepted"] == 1
    with pytest.raises(ApiError) as refused:
        webhooks.amocrm(amo, amo_body(*lead("status", 5, 1700000011)), {"secret": AMO_SECRET})
    assert refused.value.status == 403
    assert state(amo, "order", "5")["event_time"] == 1700000010
    assert len(queue.bodies()) == 1
