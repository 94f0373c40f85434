"""Issue 15, item 5: confirmation and the status page with a long upload history, before and after.

"Before" is the code as it was (chalicelib/operations.py at e6ee1b9, read from git and run as it is):
it reads every upload record (`store.uploads`) — twice per confirmation, once per status page. "After"
is the current code: the pending uploads and the last UPLOADS_SHOWN final ones. Each integration has N
confirmed uploads (N = 10,000 and 50,000 by default) and 5 pending ones, which Metrika's listing (in
process here: this measures the store's side) reports PASSED.

Two measures:

* memory: the in-memory store, every store call and every upload record it hands back counted, and a
  modelled time: measured in-process seconds + CALL_S a store call + ITEM_S an upload record read.
  ITEM_S is calibrated so the before-path reproduces the issue's figure (10,000 records → 6 s: two full
  reads of 10,000 per confirmation at 0.3 ms a record, what moto's DynamoDB took per item on loopback).
* moto: DynamoStore on moto_server at a smaller scale (N = 1,000 and 5,000), DynamoDB read calls counted
  (a botocore hook) and the items they handed back. moto's wall seconds are printed but are no measure
  of DynamoDB: moto answers a Query by walking the table in Python, so its time grows with the table.

    python -m bench.upload_history                       (about 2 minutes)
    python -m bench.upload_history --memory 10000 50000 --moto 1000 5000
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.harness import table

BEFORE_COMMIT = "e6ee1b9"  # main before item 5
CALL_S = 0.002
ITEM_S = 0.0003
PENDING = 5
NOW = 1_780_000_000.0
STEPS = ("confirmation", "status page")
UPLOAD_METHODS = ("uploads", "pending_uploads", "recent_uploads", "upload_entities")


def before_operations():
    """chalicelib/operations.py as it was before item 5, imported as `chalicelib._operations_before`."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:chalicelib/operations.py"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("chalicelib._operations_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "chalicelib"
    exec(compile(source, f"{BEFORE_COMMIT}:chalicelib/operations.py", "exec"), module.__dict__)
    return module


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Counted:
    """A store whose calls and upload records read are counted."""

    def __init__(self, store) -> None:
        self._store = store
        self.calls = 0
        self.records = 0

    def __getattr__(self, name):
        method = getattr(self._store, name)

        def call(*args, **kwargs):
            self.calls += 1
            answer = method(*args, **kwargs)
            if name in UPLOAD_METHODS:
                self.records += len(answer)
            return answer
        return call


class Listing:
    """`last_uploadings` listing the pending uploads PASSED, one row each."""

    def __init__(self, ids) -> None:
        self.ids = list(ids)

    def last_uploadings(self, counter_id, *, limit, datetime_offset=None):
        return [{"uploading_id": u, "api_validation_status": "PASSED", "elements_count": 1,
                 "datetime": "2026-06-01 12:00:00"} for u in self.ids]


def no_requeue(integration_id, refs):
    raise AssertionError("nothing fails in this benchmark")


def fill_memory(store, clock, iid: str, confirmed: int) -> list[str]:
    for n in range(confirmed):
        clock.t = NOW - 20 * 86400 + n
        store.record_upload(iid, f"old-{n:06d}", kind="orders", rows=1)
        store.confirm_upload(iid, f"old-{n:06d}", "PASSED", 1)
    return pending(store, clock, iid)


def pending(store, clock, iid: str) -> list[str]:
    ids = [f"new-{n}" for n in range(PENDING)]
    clock.t = NOW - 600
    for uploading_id in ids:
        store.record_upload(iid, uploading_id, kind="orders", rows=1, entities=[("order", uploading_id)])
    clock.t = NOW
    return ids


def step(operations, store, iid: str, ids: list[str], which: str) -> float:
    """Seconds of one confirmation run or one status page on `store`."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the confirmation's log line
        if which == "confirmation":
            result = operations.confirm_uploads(store, Listing(ids), iid, {"counter_id": 1, "timezone": "UTC"},
                                                requeue=no_requeue, now=NOW)
            assert result["passed"] == PENDING, result
        else:
            status = operations.integration_status(store, iid, requests_today=0, now=NOW)
            assert status["uploads"]["SENT"] == PENDING, status["uploads"]
    return time.perf_counter() - started


def memory(sizes: list[int]) -> list[list]:
    from chalicelib import operations as after
    from chalicelib.store.memory import MemoryStore
    before = before_operations()
    rows = []
    for size in sizes:
        def measure(name: str, operations, which: str) -> tuple:
            clock = Clock(NOW)
            store = MemoryStore(clock=clock)
            ids = fill_memory(store, clock, "shop", size)
            counted = Counted(store)
            seconds = step(operations, counted, "shop", ids, which)
            return counted.calls, counted.records, seconds + counted.calls * CALL_S + counted.records * ITEM_S
        rows += compare(size, each_code(before, after, measure))
    return rows


def each_code(before, after, measure) -> dict[str, list]:
    """`measure(name, operations, which)` for the code before and after, each on a store of its own for
    each step: the figures by code, in STEPS' order."""
    return {name: [measure(name, operations, which) for which in STEPS]
            for name, operations in (("before", before), ("after", after))}


def compare(size: int, figures: dict[str, list]) -> list[list]:
    rows = []
    for index, which in enumerate(STEPS):
        b, a = figures["before"][index], figures["after"][index]
        rows.append([f"{size:,}", which, f"{b[0]} / {b[1]:,}", f"{b[2]:.2f} s", f"{a[0]} / {a[1]:,}",
                     f"{a[2]:.3f} s", f"{b[2] / a[2]:.0f}x"])
    return rows


def moto(sizes: list[int]) -> list[list]:
    import boto3

    from chalicelib import operations as after
    from chalicelib.settings import get_settings
    from chalicelib.store.dynamodb import DynamoStore
    before = before_operations()
    settings = get_settings()
    client = boto3.client("dynamodb")
    calls: Counter = Counter()
    items = [0]

    def count(model, **_):
        calls.update([model.name])

    def handed_back(parsed, model, **_):
        items[0] += len(parsed.get("Items", [])) + (1 if "Item" in parsed else 0)
    client.meta.events.register("before-call.dynamodb", count)
    client.meta.events.register("after-call.dynamodb", handed_back)
    rows = []
    for size in sizes:
        def measure(name: str, operations, which: str) -> tuple:
            clock = Clock(NOW)
            store = DynamoStore(client, settings.config_table, settings.state_table,
                                quota_table=settings.quota_table, clock=clock)
            iid = f"bench-{uuid.uuid4().hex[:8]}"
            ids = fill_moto(client, settings.state_table, store, clock, iid, size, legacy=name == "before")
            if name == "after":
                store.pending_uploads(iid)  # the one-time move of older records (none here) is not measured
            calls.clear()
            items[0] = 0
            seconds = step(operations, store, iid, ids, which)
            reads = sum(n for op, n in calls.items() if op in ("GetItem", "Query", "BatchGetItem", "Scan"))
            return reads, items[0], seconds
        figures = each_code(before, after, measure)
        for index, which in enumerate(STEPS):
            b, a = figures["before"][index], figures["after"][index]
            rows.append([f"{size:,}", which, f"{b[0]} / {b[1]:,}", f"{a[0]} / {a[1]:,}", f"{b[1] / a[1]:.0f}x",
                         f"{b[2]:.2f} s / {a[2]:.2f} s"])
    return rows


def fill_moto(client, table: str, store, clock, iid: str, confirmed: int, *, legacy: bool) -> list[str]:
    """`confirmed` final records, 25 a call: in the older form (`UPLOAD#<id>`, what the before-code
    reads) or in the time-ordered one; then the pending uploads, recorded as each code did."""
    def item(n: int) -> dict:
        sent_at = int(NOW) - 20 * 86400 + n
        sk = f"UPLOAD#old-{n:06d}" if legacy else f"UPLOAD_LOG#{sent_at:012d}#old-{n:06d}"
        return {"pk": {"S": f"INTEGRATION#{iid}"}, "sk": {"S": sk}, "kind": {"S": "orders"}, "rows": {"N": "1"},
                "status": {"S": "PASSED"}, "sent_at": {"N": str(sent_at)}, "elements_count": {"N": "1"},
                "confirmed_at": {"N": str(sent_at + 3600)}, "expires_at": {"N": str(int(NOW) + 10 * 86400)}}
    for start in range(0, confirmed, 25):
        client.batch_write_item(RequestItems={table: [{"PutRequest": {"Item": item(n)}}
                                                      for n in range(start, min(start + 25, confirmed))]})
    ids = [f"new-{n}" for n in range(PENDING)]
    for uploading_id in ids:
        if legacy:  # the before-code's record: `UPLOAD#<id>`, SENT
            client.put_item(TableName=table, Item={
                "pk": {"S": f"INTEGRATION#{iid}"}, "sk": {"S": f"UPLOAD#{uploading_id}"}, "kind": {"S": "orders"},
                "rows": {"N": "1"}, "status": {"S": "SENT"}, "sent_at": {"N": str(int(NOW) - 600)}})
        else:
            clock.t = NOW - 600
            store.record_upload(iid, uploading_id, kind="orders", rows=1)
            clock.t = NOW
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, nargs="*", default=[10_000, 50_000])
    parser.add_argument("--moto", type=int, nargs="*", default=[1_000, 5_000])
    args = parser.parse_args()
    header = ["confirmed uploads", "", "before: store calls / records read", "before: time",
              "after: store calls / records read", "after: time", "ratio"]
    if args.memory:
        table(f"Upload history, in-memory store (modelled: {CALL_S * 1000:.0f} ms a call, "
              f"{ITEM_S * 1000:.1f} ms a record read)", header, memory(args.memory))
    if args.moto:
        from bench.harness import environment
        with environment():
            # Counts, not time: moto answers a Query by walking the table in Python, so its seconds grow
            # with everything the table holds (every integration), which DynamoDB's do not.
            table("Upload history, DynamoStore on moto_server (DynamoDB read calls / items handed back)",
                  ["confirmed uploads", "", "before: reads / items", "after: reads / items", "items ratio",
                   "wall before / after (moto, not DynamoDB)"], moto(args.moto))


if __name__ == "__main__":
    sys.exit(main())
