"""Issue 13 (local stack): after a 250-lead mass action and two reconciliations during its delivery, two
deals stayed dirty with a live queue lease and no message anywhere, until the lease ran out 35 minutes
later.

The cause is the emulator, not the protocol: moto_server applies each request on its own thread with no
lock, so a conditional UpdateItem can pass its condition, then another write to the same item lands,
then the first one applies what it computed. The reconciliation's `mark_dirty` (the API process) and the
worker's close (`mark_clean` with the `seq` it read) met on one deal that way: the close passed its
`seq` condition and ended the lease, then `mark_dirty` — which had already seen the delivery's live
lease (its old image) and so queued nothing — wrote `dirty` and a lease back. Both callers had done
their part: the close succeeded (no re-queue), the event was "covered" (no message). DynamoDB applies
writes to one item one at a time, which is what the store's conditions rely on; the stack's emulator
must do the same.

The race is made deterministic here: the emulator (as `sandbox.local_stack.start_moto` serves it) runs
in this process, and a hook holds the reconciliation's `mark_dirty` after its condition passed until the
worker's close has had its chance to run."""
from __future__ import annotations

import threading
import uuid

import boto3
import pytest

from chalicelib.crm import ORDER, EntityRef
from chalicelib.ingest import FUTURE_SKEW_SECONDS, QUEUE_LEASE_SECONDS
from chalicelib.store.dynamodb import DynamoStore

T = 1_789_990_000
NOW = 1_790_000_000.0


@pytest.fixture
def emulator():
    """The stack's emulator application, served in this process on a free port (werkzeug, a thread per
    request, as `python -m sandbox.moto_server` serves it)."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    from sandbox.moto_server import application
    server = make_server("127.0.0.1", 0, application(), threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture
def store(emulator):
    client = boto3.client("dynamodb", endpoint_url=emulator, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    table = "atomicity-" + uuid.uuid4().hex[:8]
    client.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                              {"AttributeName": "sk", "AttributeType": "S"}],
                        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                   {"AttributeName": "sk", "KeyType": "RANGE"}])
    return DynamoStore(client, table, table, quota_table=table, clock=lambda: NOW)


@pytest.fixture
def held_mark_dirty(monkeypatch):
    """Arm it, and the next `mark_dirty` the emulator applies stops after its condition has passed
    (before its update is evaluated) until `go` is set, or 3 s have passed."""
    import moto.dynamodb.models as models

    real = models.UpdateExpressionValidator
    hook = {"armed": False, "held": threading.Event(), "go": threading.Event()}

    class Held(real):
        def validate(self, *args, **kwargs):
            if hook["armed"] and ":future" in (self.expression_attribute_values or {}):
                hook["armed"] = False
                hook["held"].set()
                hook["go"].wait(3)
            return super().validate(*args, **kwargs)

    monkeypatch.setattr(models, "UpdateExpressionValidator", Held)
    return hook


def test_a_reconciliation_meeting_the_close_leaves_no_entity_dirty_with_a_lease_and_no_message(store,
                                                                                              held_mark_dirty):
    shop, ref = "shop", EntityRef(ORDER, "5", T, "update")

    def mark():
        return store.mark_dirty(shop, ref, now=NOW, lease_seconds=QUEUE_LEASE_SECONDS, future_skew=FUTURE_SKEW_SECONDS)

    assert mark() is True  # the inbox expansion: lease taken, message sent
    state = store.delivery_states(shop, [(ORDER, "5")])[(ORDER, "5")]  # the worker's read
    assert state["seq"] == 1 and state["queued_until"] == NOW + QUEUE_LEASE_SECONDS

    outcome = {}
    held_mark_dirty["armed"] = True
    reconciliation = threading.Thread(target=lambda: outcome.update(queued=mark()))
    reconciliation.start()
    assert held_mark_dirty["held"].wait(5)
    close = threading.Thread(target=lambda: outcome.update(closed=store.mark_clean(
        shop, ORDER, "5", event_time=T, content_hash="h", row_hashes={}, uploading_id="u", version=state["seq"])))
    close.start()
    close.join(1)  # the close runs now, unless the emulator applies the held write first
    held_mark_dirty["go"].set()
    reconciliation.join(10)
    close.join(10)

    # What the worker does when its close fails: renew the lease it read and queue the entity.
    requeued = not outcome["closed"] and store.renew_queue_lease(
        shop, ORDER, "5", seen=state["queued_until"], until=NOW + QUEUE_LEASE_SECONDS + 60)
    after = store.get_entity(shop, ORDER, "5")
    on_the_way = outcome["queued"] or requeued
    assert after["dirty"] is False or on_the_way, (
        f"dirty with a live lease ({after.get('queued_until')}) and no message: the close answered "
        f"{outcome['closed']}, the reconciliation's mark_dirty {outcome['queued']}")
    # and the reconciliation's event is never absorbed by a close that read the state before it
    assert after["seq"] == 2 and (after["dirty"] is True or not outcome["closed"])
