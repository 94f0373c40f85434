"""Bounded upload history (issue 15, item 5): confirmation and the status page read the pending uploads
and the last few final ones, never the whole history, so what they read is the same with 10 confirmed
records as with thousands; records written by the older code (`UPLOAD#<id>`) are still confirmed; and a
process dying between any two writes of recording or confirming leaves nothing stuck."""
from __future__ import annotations

import uuid

import boto3

from chalicelib.crm import EntityRef
from chalicelib.operations import UPLOADS_SHOWN, confirm_uploads, integration_status
from chalicelib.store import PENDING_UPLOAD_TTL, UPLOAD_RECORD_TTL
from chalicelib.store import dynamodb
from chalicelib.store.memory import MemoryStore
from tests.test_store_contract import NOW, Clock, _dynamo_store

UPLOAD_METHODS = ("uploads", "pending_uploads", "recent_uploads", "upload_entities")
WRITES = frozenset({"put_item", "update_item", "delete_item", "batch_write_item"})


class Crash(Exception):
    """The process dies here."""


class CountingStore:
    """A store whose calls are counted, with the upload records each read handed back."""

    def __init__(self, store):
        self._store = store
        self.calls: list[str] = []
        self.records_read = 0

    def __getattr__(self, name):
        method = getattr(self._store, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            answer = method(*args, **kwargs)
            if name in UPLOAD_METHODS:
                self.records_read += len(answer)
            return answer
        return call


class CountingClient:
    """A DynamoDB client whose calls (and items handed back) are counted; `crash_at` = n makes the n-th
    write die before it reaches DynamoDB."""

    def __init__(self, client, crash_at: int | None = None):
        self._client = client
        self.crash_at = crash_at
        self.calls: list[str] = []
        self.items_read = 0
        self.writes = 0

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(**kwargs):
            self.calls.append(name)
            if name in WRITES:
                self.writes += 1
                if self.writes == self.crash_at:
                    raise Crash(f"died before write {self.writes} ({name})")
            answer = method(**kwargs)
            self.items_read += len(answer.get("Items", [])) + (1 if "Item" in answer else 0)
            return answer
        return call


class Listing:
    """Metrika's `last_uploadings`, as given: every upload of `passed` PASSED with one row."""

    def __init__(self, passed=()):
        self.passed = list(passed)

    def last_uploadings(self, counter_id, *, limit, datetime_offset=None):
        return [{"uploading_id": u, "api_validation_status": "PASSED", "elements_count": 1,
                 "datetime": "2025-06-15 12:00:00"} for u in self.passed]


def no_requeue(integration_id, refs):
    raise AssertionError("nothing should be sent again")


def history(store, iid, confirmed: int, clock) -> None:
    """`confirmed` final uploads, then three pending ones."""
    for n in range(confirmed):
        clock.t = NOW - 10 * 86400 + n
        store.record_upload(iid, f"old-{n:05d}", kind="orders", rows=1)
        store.confirm_upload(iid, f"old-{n:05d}", "PASSED", 1)
    clock.t = NOW - 3600
    for n in range(3):
        store.record_upload(iid, f"new-{n}", kind="orders", rows=1, entities=[("order", str(n))])
    clock.t = NOW


def confirm_and_show(store, iid):
    integration = {"counter_id": 1, "timezone": "UTC"}
    result = confirm_uploads(store, Listing(["new-0"]), iid, integration, requeue=no_requeue, now=NOW)
    status = integration_status(store, iid, requests_today=0, now=NOW)
    return result, status


# --- the same reads with 10 and with 5,000 confirmed records -------------------------------------------------

def test_memory_confirmation_and_status_read_the_same_with_10_and_5000_confirmed():
    seen = []
    for confirmed in (10, 5000):
        clock = Clock()
        store = MemoryStore(clock=clock)
        history(store, "shop", confirmed, clock)
        counting = CountingStore(store)
        result, status = confirm_and_show(counting, "shop")
        assert result["passed"] == 1 and result["checked"] == 3
        assert status["uploads"] == {"SENT": 2, "PASSED": UPLOADS_SHOWN if confirmed > UPLOADS_SHOWN else confirmed + 1,
                                     "FAILED": 0, "UNCONFIRMED": 0}
        assert len(status["recent_uploads"]) == UPLOADS_SHOWN if confirmed > UPLOADS_SHOWN else confirmed + 3
        assert status["recent_uploads"][0]["uploading_id"] == "new-2"  # newest first
        seen.append((sorted(c for c in counting.calls if c in UPLOAD_METHODS), counting.records_read))
    # 10 confirmed: every record fits the window; 5,000: the window is full, and no more is read.
    assert seen[0][0] == seen[1][0] and "uploads" not in seen[0][0]
    assert seen[1][1] <= 3 + 2 * UPLOADS_SHOWN + 3  # pending, the last 50 (twice), pending left


def confirmed_directly(client, table, iid, count):
    """`count` final records in the store's time-ordered form, written 25 at a time (moto is slow one by one)."""
    items = [{"PutRequest": {"Item": {
        "pk": {"S": f"INTEGRATION#{iid}"}, "sk": {"S": f"UPLOAD_LOG#{int(NOW) - 86400 - n:012d}#old-{n:05d}"},
        "kind": {"S": "orders"}, "rows": {"N": "1"}, "status": {"S": "PASSED"}, "sent_at": {"N": str(int(NOW) - 86400 - n)},
        "elements_count": {"N": "1"}, "confirmed_at": {"N": str(int(NOW))},
        "expires_at": {"N": str(int(NOW) + UPLOAD_RECORD_TTL)}}}} for n in range(count)]
    for start in range(0, len(items), 25):
        client.batch_write_item(RequestItems={table: items[start:start + 25]})


def test_dynamo_confirmation_and_status_make_the_same_calls_with_10_and_120_confirmed(request):
    seen = []
    request.getfixturevalue("service_env")
    raw = boto3.client("dynamodb")
    for confirmed in (10, 120):
        clock = Clock()
        iid = "history-" + uuid.uuid4().hex[:10]
        store = _dynamo_store(request, clock, raw)
        confirmed_directly(raw, store._state, iid, confirmed)
        history(store, iid, 0, clock)
        counting = CountingClient(raw)
        measured = _dynamo_store(request, clock, counting)
        result, status = confirm_and_show(measured, iid)
        assert result["passed"] == 1 and status["uploads"]["SENT"] == 2
        assert status["uploads"]["PASSED"] == min(confirmed + 1, UPLOADS_SHOWN)
        reads = [c for c in counting.calls if c not in WRITES]
        seen.append((reads, counting.items_read))
    assert seen[0][0] == seen[1][0]  # the same calls, one by one
    assert seen[1][1] == seen[0][1] + (UPLOADS_SHOWN - 11) * 2  # the window filled (read twice), nothing more


# --- records written by the older code ----------------------------------------------------------------------

def legacy(client, table, iid, uploading_id, **attributes):
    item = {"pk": {"S": f"INTEGRATION#{iid}"}, "sk": {"S": f"UPLOAD#{uploading_id}"}}
    for name, value in attributes.items():
        item[name] = {"N": str(value)} if isinstance(value, int) else {"S": value}
    client.put_item(TableName=table, Item=item)


def test_older_records_are_still_confirmed_and_shown(request):
    clock = Clock()
    iid = "legacy-" + uuid.uuid4().hex[:10]
    store = _dynamo_store(request, clock)
    raw = boto3.client("dynamodb")
    # What the older code left: a SENT upload with its entities, and final ones (30-day TTL).
    legacy(raw, store._state, iid, "old-sent", kind="orders", rows=2, status="SENT", sent_at=int(NOW) - 3600)
    raw.put_item(TableName=store._state, Item={"pk": {"S": f"INTEGRATION#{iid}"}, "sk": {"S": "CARRIED#old-sent#0"},
                                              "entities": {"L": [{"S": "order:5"}, {"S": "order:6"}]}})
    for n in range(3):
        legacy(raw, store._state, iid, f"old-done-{n}", kind="orders", rows=1, status="PASSED",
               sent_at=int(NOW) - 7200 + n, elements_count=1, confirmed_at=int(NOW) - 60, expires_at=int(NOW) + 86400)
    pending = store.pending_uploads(iid)
    assert [(u["uploading_id"], u["status"], u["sent_at"]) for u in pending] == [("old-sent", "SENT", int(NOW) - 3600)]
    assert pending[0]["expires_at"] == int(NOW) + PENDING_UPLOAD_TTL  # it expires now, as every record does
    assert [u["uploading_id"] for u in store.recent_uploads(iid, limit=10)] == ["old-done-2", "old-done-1", "old-done-0"]
    assert store.upload_entities(iid, "old-sent") == [("order", "5"), ("order", "6")]
    # the old SENT record is gone (moved), the old final ones stay until their TTL
    old = raw.query(TableName=store._state, KeyConditionExpression="pk = :pk AND begins_with(sk, :p)",
                    ExpressionAttributeValues={":pk": {"S": f"INTEGRATION#{iid}"}, ":p": {"S": "UPLOAD#"}})["Items"]
    assert sorted(i["sk"]["S"] for i in old) == ["UPLOAD#old-done-0", "UPLOAD#old-done-1", "UPLOAD#old-done-2"]
    # Confirmation finds it FAILED and sends its entities again, like any other.
    sent_again = []

    class Failed:
        def last_uploadings(self, counter_id, *, limit, datetime_offset=None):
            return [{"uploading_id": "old-sent", "api_validation_status": "FAILED", "elements_count": 0}]
    for crm_id in ("5", "6"):
        store.mark_dirty(iid, EntityRef("order", crm_id, 1, "add"), now=NOW, lease_seconds=1, future_skew=600)
    result = confirm_uploads(store, Failed(), iid, {"counter_id": 1}, now=NOW,
                             requeue=lambda i, refs: sent_again.extend(refs) or {"queued": len(refs)})
    assert result["failed"] == 1 and result["resent"] == 2 and sorted(r.crm_id for r in sent_again) == ["5", "6"]
    assert store.pending_uploads(iid) == [] and store.upload_entities(iid, "old-sent") == []
    assert [(u["uploading_id"], u["status"]) for u in store.recent_uploads(iid, limit=1)] == [("old-sent", "FAILED")]
    # `uploads` lists each upload once, in its latest form
    assert [u["uploading_id"] for u in store.uploads(iid)] == ["old-done-0", "old-done-1", "old-done-2", "old-sent"]


def test_older_code_still_running_after_the_move_is_caught_within_the_grace(request):
    clock = Clock()
    iid = "legacy-" + uuid.uuid4().hex[:10]
    store = _dynamo_store(request, clock)
    raw = boto3.client("dynamodb")
    assert store.pending_uploads(iid) == []  # the first read: nothing older, the move is marked
    # a worker invocation that started before the deploy records an upload the old way
    legacy(raw, store._state, iid, "late", kind="orders", rows=1, status="SENT", sent_at=int(NOW) + 60)
    clock.t = NOW + dynamodb.LEGACY_UPLOAD_GRACE - 1
    assert [u["uploading_id"] for u in store.pending_uploads(iid)] == ["late"]
    # after the grace the older form is never read again: one query of the pending ones (the marker's
    # read once, then remembered)
    clock.t = NOW + dynamodb.LEGACY_UPLOAD_GRACE + 1
    counting = CountingClient(boto3.client("dynamodb"))
    later = _dynamo_store(request, clock, counting)
    for _ in range(3):
        assert [u["uploading_id"] for u in later.pending_uploads(iid)] == ["late"]
    assert counting.calls == ["get_item", "query", "query", "query"]


# --- a process dying between any two writes ---------------------------------------------------------------

def items_under(raw, table, iid):
    return raw.query(
        TableName=table, KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": f"INTEGRATION#{iid}"}}, ConsistentRead=True)["Items"]


def test_dying_between_any_two_writes_of_record_or_confirm_leaves_nothing_stuck(request, monkeypatch):
    """Two entity parts (CARRIED_PER_ITEM made 3): recording is three writes, confirming four. Dying
    before each in turn: a pending upload always has its whole entity list, every item left expires, and
    the next run (recording again, as the worker's retry does; confirming again, as the next run does)
    ends with one final record and nothing else."""
    request.getfixturevalue("service_env")
    raw = boto3.client("dynamodb")  # one client: making one costs more than the calls here
    monkeypatch.setattr(dynamodb, "CARRIED_PER_ITEM", 3)
    carried = [("order", str(n)) for n in range(5)]
    clock = Clock()
    for phase, writes in (("record", 3), ("confirm", 4)):
        for crash_at in range(1, writes + 2):  # the last round does not die: it proves the count
            iid = "crash-" + uuid.uuid4().hex[:10]
            client = CountingClient(raw)
            store = _dynamo_store(request, clock, client)
            if phase == "confirm":
                store.record_upload(iid, "u1", kind="orders", rows=5, entities=carried)
            client.writes, client.crash_at = 0, crash_at
            try:
                if phase == "record":
                    store.record_upload(iid, "u1", kind="orders", rows=5, entities=carried)
                else:
                    store.confirm_upload(iid, "u1", "FAILED", 0, resent=5)
                died = False
            except Crash:
                died = True
            client.crash_at = None
            assert died == (crash_at <= writes), (phase, crash_at)
            left = items_under(raw, store._state, iid)
            assert all("expires_at" in i for i in left), (phase, crash_at, left)  # nothing kept for ever
            if store.pending_uploads(iid):
                assert store.upload_entities(iid, "u1") == sorted(carried), (phase, crash_at)
            assert len(store.recent_uploads(iid, limit=10)) <= 1
            if phase == "record" and not store.pending_uploads(iid):
                store.record_upload(iid, "u1", kind="orders", rows=5, entities=carried)
            assert store.upload_entities(iid, "u1") == sorted(carried) or not store.pending_uploads(iid)
            for _ in range(2):  # the next run, and one more: confirming again changes nothing
                for upload in store.pending_uploads(iid):
                    store.confirm_upload(iid, upload["uploading_id"], "FAILED", 0, resent=5)
            final = store.recent_uploads(iid, limit=10)
            assert [(u["uploading_id"], u["status"], u["resent"]) for u in final] == [("u1", "FAILED", 5)]
            assert store.pending_uploads(iid) == []
            # Left: the final record, the move's marker, and only where the process died after the upload
            # stopped being pending, entity lists nobody reads again (they expire, asserted above).
            kinds = {i["sk"]["S"].split("#")[0] for i in items_under(raw, store._state, iid)}
            died_with_lists = phase == "confirm" and crash_at > 2 and died
            assert kinds == {"UPLOAD_LOG", "UPLOADS_MOVED"} | ({"CARRIED"} if died_with_lists else set()), (phase, crash_at)


def test_confirmation_that_dies_after_sending_again_resends_and_settles_on_the_next_run():
    """Through `confirm_uploads` on the memory store: dying at each store write of a FAILED upload's
    confirmation (the entities' marks, the final status) leaves it pending with its list; the next run
    sends again what was not yet sent, and the upload ends FAILED once."""
    for crash_at in range(1, 5):
        clock = Clock()
        store = MemoryStore(clock=clock)
        for crm_id in ("5", "6"):
            store.mark_dirty("shop", EntityRef("order", crm_id, 1, "add"), now=NOW, lease_seconds=1, future_skew=600)
        store.record_upload("shop", "u1", kind="orders", rows=2, entities=[("order", "5"), ("order", "6")])

        class Dying(CountingStore):
            def __getattr__(self, name):
                if name in ("mark_resend", "confirm_upload"):
                    self.calls.append(name)
                    if len(self.calls) == crash_at:
                        raise Crash(name)
                return getattr(self._store, name)

        class FailedListing:
            def last_uploadings(self, counter_id, *, limit, datetime_offset=None):
                return [{"uploading_id": "u1", "api_validation_status": "FAILED", "elements_count": 0}]
        sent = []
        requeue = lambda i, refs: sent.extend(r.crm_id for r in refs) or {"queued": len(refs)}  # noqa: E731
        dying = Dying(store)
        try:
            confirm_uploads(dying, FailedListing(), "shop", {"counter_id": 1}, requeue=requeue, now=NOW)
        except Crash:
            pass
        if store.pending_uploads("shop"):
            assert store.upload_entities("shop", "u1") == [("order", "5"), ("order", "6")]
            confirm_uploads(store, FailedListing(), "shop", {"counter_id": 1}, requeue=requeue, now=NOW)
        assert {"5", "6"} <= set(sent), crash_at
        assert [(u["status"], u["resent"]) for u in store.uploads("shop")] == [("FAILED", 2)]
        assert store.pending_uploads("shop") == []


def test_the_status_summary_counts_every_pending_upload_and_lists_the_last_50():
    from chalicelib.operations import UNCONFIRMED_AFTER, upload_summary
    pending = [{"uploading_id": f"p{n:02d}", "kind": "orders", "rows": 1, "status": "SENT",
                "sent_at": int(NOW) - UNCONFIRMED_AFTER - 100 + n * 10, "expires_at": 0} for n in range(60)]
    recent = [{"uploading_id": f"f{n:02d}", "kind": "orders", "rows": 1, "status": status, "resent": resent,
               "sent_at": int(NOW) - 86400 - n, "confirmed_at": int(NOW) - 60, "elements_count": 1, "expires_at": 0}
              for n, (status, resent) in enumerate([("FAILED", 3), ("UNCONFIRMED", None)] + [("PASSED", None)] * 48)]
    summary = upload_summary(pending, recent, NOW)
    assert summary["uploads"] == {"SENT": 60, "PASSED": 48, "FAILED": 1, "UNCONFIRMED": 1}
    assert summary["uploads_window"] == UPLOADS_SHOWN == 50
    assert [u["uploading_id"] for u in summary["recent_uploads"]] == [f"p{n:02d}" for n in range(59, 9, -1)]
    assert "expires_at" not in summary["recent_uploads"][0]
    assert summary["resent_after_failed_uploads"] == 3
    # pending for over 6 h: the first ten (sent 100 s before the 6 h mark, 10 s apart), and the one given up
    assert summary["unconfirmed_over_6h"] == 10 + 1 and summary["oldest_unconfirmed"] == int(NOW) - 86400 - 1
