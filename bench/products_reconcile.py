"""Issue 15, items 3 and 4: the product check and reconciliation of delivered deals, on the local stack.

DynamoDB is moto_server (DynamoStore, every call counted by operation through a botocore hook), the CRM
is the amoCRM sandbox and Metrika the Metrika sandbox, both over loopback HTTP; the queue is the
in-memory one (its messages counted). Three measures:

* products: one worker batch of 8 deals naming N distinct products between them (N = 8 … 800), then
  the same deals again: seconds, the store's product-list calls, DynamoDB calls of the batch, a
  deal's state item size;
* reconcile: 100 deals delivered by their webhooks, then a reconciliation run listing them all, then
  the worker draining what it queued: messages, DynamoDB writes, CRM and Metrika requests, seconds;
* import: a history import of 1,000 deals over a 1,000-product catalogue (and over 20 products), in
  process (in-memory store) and on moto: entities a second.

    python -m bench.products_reconcile            (about 4 minutes)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
import uuid
from collections import Counter

from bench.harness import table

WRITES = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}


def _dynamo_store(clock) -> tuple:
    """DynamoStore on the emulator, and a Counter of its DynamoDB calls by operation."""
    import boto3

    from chalicelib.settings import get_settings
    from chalicelib.store.dynamodb import DynamoStore
    settings = get_settings()
    client = boto3.client("dynamodb")
    calls: Counter = Counter()
    client.meta.events.register("before-call.dynamodb", lambda model, **_: calls.update([model.name]))
    return DynamoStore(client, settings.config_table, settings.state_table, quota_table=settings.quota_table,
                       clock=clock), calls


def _core(metrika_url: str, *, moto: bool, sources: dict | None = None, clock=None) -> tuple:
    """The in-process core of the tests (tests/core.py) on moto's DynamoDB or on the in-memory store;
    with the Counter of DynamoDB calls (empty in memory)."""
    import tests.core as harness
    real, calls = harness.MemoryStore, Counter()
    if moto:
        def on_moto(clock):
            store, counted = _dynamo_store(clock)
            calls.update(counted)
            store_calls.append(counted)
            return store
        store_calls: list[Counter] = []
        harness.MemoryStore = on_moto
    try:
        core = harness.Core(metrika_url, counter_id=int(time.time_ns() % 10**6), clock=clock, sources=sources)
    finally:
        harness.MemoryStore = real
    return core, (store_calls[0] if moto else calls)


def _wrap_products(store) -> Counter:
    """Count the store's product-list calls (the object's own methods wrapped)."""
    counted: Counter = Counter()
    for name in [n for n in dir(store) if "product" in n and not n.startswith("_")] + ["integrations_on_counter"]:
        real = getattr(store, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            counted.update([_name])
            return _real(*args, **kwargs)

        setattr(store, name, wrapped)
    return counted


def products(metrika, sizes: list[int], moto: bool) -> list[list]:
    from chalicelib.crm import ORDER, EntityRef
    from tests.core import deal_rows
    rows = []
    for size in sizes:
        core, calls = _core(metrika.url, moto=moto)
        shop = core.integration(f"bench-products-{uuid.uuid4().hex[:8]}")
        per_deal = max(1, size // 8)
        store_calls = _wrap_products(core.store)
        timings, product_calls, dynamo = [], [], []
        for version in (0, 1):
            core.source.rows = {(ORDER, str(d)): deal_rows(str(d), contact=str(100 + d), revenue=1000 + version,
                                                           products={f"sku-{d}-{i}": 1 for i in range(per_deal)})
                                for d in range(8)}
            core.ingest.record(shop, [EntityRef(ORDER, str(d), 1789990000 + version, "update") for d in range(8)],
                               origin="replay")
            store_calls.clear()
            calls.clear()
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                core.drain()
            timings.append(time.perf_counter() - started)
            product_calls.append(dict(store_calls))
            dynamo.append(sum(calls.values()))
        state = core.store.get_entity(shop, ORDER, "0")
        rows.append(["moto" if moto else "memory", size, f"{timings[0]:.2f} s", f"{timings[1]:.2f} s",
                     json.dumps(product_calls[0]), json.dumps(product_calls[1]),
                     f"{dynamo[0]} / {dynamo[1]}" if moto else "—",
                     f"{len(json.dumps(state, ensure_ascii=False).encode())} B"])
    return rows


def reconcile(stack: dict, deals: int) -> list:
    """`deals` amoCRM leads delivered by their webhooks (DynamoStore on moto), then one reconciliation
    and the worker's drain of what it queued."""
    from chalicelib.crm.amocrm.source import AmoCrmSource
    from tests.core import Clock
    amocrm, metrika = stack["amocrm"], stack["metrika"]
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    people = [amocrm.create_contact(f"Клиент {n}", phones=[f"+7 916 {n:07d}"], notify=False)["id"] for n in range(deals)]
    for n in range(deals):
        amocrm.create_lead(f"Сделка {n}", 7001, 1001, price=1000 + n, contacts=[people[n]])
    core, calls = _core(metrika.url, moto=True, sources={}, clock=Clock(time.time()))
    core.sources["amocrm"] = source = AmoCrmSource(core.store.reserve_slot, backoff=0.01)
    shop = core.integration(f"bench-rec-{uuid.uuid4().hex[:8]}",
                            connection={"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": "s" * 20})
    core.store.put_status_mapping(shop, [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"}], 0)
    metrika.counter(core.counter_id).order_statuses["new"] = {"id": "new", "type": "IN_PROGRESS"}
    with contextlib.redirect_stdout(io.StringIO()):
        for _, body in amocrm.outbox:
            core.ingest.amocrm(shop, body, {"secret": "s" * 20})
        amocrm.outbox.clear()
        core.drain()
    uploads_before = len([r for r in metrika.requests if "/data/" in r["path"]])
    crm_before = len(amocrm.requests)
    calls.clear()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = core.ingest.reconcile(shop, source, since=0)
        run = time.perf_counter() - started
        queued = len(core.queue)
        run_calls, crm_run = Counter(calls), len(amocrm.requests) - crm_before
        calls.clear()
        started = time.perf_counter()
        core.drain()
        drain = time.perf_counter() - started
    writes_run = sum(n for op, n in run_calls.items() if op in WRITES)
    writes_drain = sum(n for op, n in calls.items() if op in WRITES)
    crm_drain = len(amocrm.requests) - crm_before - crm_run
    uploads = len([r for r in metrika.requests if "/data/" in r["path"]]) - uploads_before
    return [deals, result["found"], result.get("delivered", "—"), queued, writes_run, writes_drain,
            json.dumps(dict(sorted(run_calls.items()))), json.dumps(dict(sorted(calls.items()))),
            f"{crm_run} + {crm_drain}", uploads, f"{run:.2f} s", f"{drain:.2f} s"]


def history_import(stack: dict | None, catalogue: int, deals: int) -> list:
    """The history import of `deals` leads (each naming one product of a `catalogue`-product catalogue),
    in process on the in-memory store with its own sandboxes (`stack` None), or on moto."""
    from chalicelib.crm.amocrm.source import AmoCrmSource
    from sandbox.amocrm import AmoCrmSandbox
    from sandbox.metrika import MetrikaSandbox
    from tests.core import Clock
    own = stack is None
    metrika = MetrikaSandbox(daily_limit=10**9).start() if own else stack["metrika"]
    amocrm = AmoCrmSandbox(token="bench-import").start() if own else stack["amocrm"]
    try:
        amocrm.reset()
        amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
        ids = [amocrm.add_catalog_element(4521, f"Товар {n}", 100 + n)["id"] for n in range(catalogue)]
        people = [amocrm.create_contact(f"Клиент {n}", phones=[f"+7 916 {n:07d}"], notify=False)["id"] for n in range(200)]
        for n in range(deals):
            amocrm.create_lead(f"Сделка {n}", 7001, 1001, price=1000 + n, contacts=[people[n % 200]],
                               products=[(ids[n % catalogue], 1)], notify=False)
        core, _ = _core(metrika.url, moto=not own, sources={}, clock=Clock(time.time()))
        core.sources["amocrm"] = AmoCrmSource(core.store.reserve_slot, backoff=0.01)
        shop = core.integration(f"bench-import-{uuid.uuid4().hex[:8]}", connection={
            "base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": "s" * 20})
        core.store.put_status_mapping(shop, [{"crm_status": "7001:1001", "metrika_status_id": "new",
                                              "type": "IN_PROGRESS"}], 0)
        metrika.counter(core.counter_id).order_statuses["new"] = {"id": "new", "type": "IN_PROGRESS"}
        started = time.perf_counter()
        core.backfill.start(shop, {"since": int(time.time()) - 86400})
        with contextlib.redirect_stdout(io.StringIO()):
            core.drain()
        elapsed = time.perf_counter() - started
        job = core.backfill.status(shop)["backfill"]
        floor = job["crm_requests"] / 7.0
        return ["memory" if own else "moto", catalogue, job["counts"]["read"], job["state"], job["crm_requests"],
                f"{elapsed:.1f} s", f"{floor:.1f} s", f"{job['counts']['read'] / elapsed:.0f}/s"]
    finally:
        if own:
            metrika.stop()
            amocrm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deals", type=int, default=100)
    parser.add_argument("--import-deals", type=int, default=1000)
    parser.add_argument("--only", choices=("products", "reconcile", "import"))
    args = parser.parse_args()
    os.environ["ALLOW_LOOPBACK_CRM"] = "1"
    from bench.harness import environment
    with environment() as stack:
        if args.only in (None, "products"):
            table("Product check: one batch of 8 deals naming N distinct products, then the same deals again",
                  ["store", "products", "first batch", "again", "product calls (first)", "product calls (again)",
                   "DynamoDB calls (first / again)", "a deal's state item"],
                  products(stack["metrika"], [8, 100, 400, 800], moto=False)
                  + products(stack["metrika"], [8, 100, 400, 800], moto=True))
        if args.only in (None, "reconcile"):
            table("Reconciliation of deals the webhooks delivered (moto DynamoDB, amoCRM sandbox)",
                  ["deals", "found", "delivered", "queued", "writes (run)", "writes (worker)", "DynamoDB (run)",
                   "DynamoDB (worker)", "CRM requests", "uploads", "run", "worker"],
                  [reconcile(stack, args.deals)])
        if args.only in (None, "import"):
            rows = []
            for catalogue in (1000, 20):
                rows.append(history_import(None, catalogue, args.import_deals))
                rows.append(history_import(stack, catalogue, args.import_deals))
            table("History import over a product catalogue (amoCRM sandbox at 7 requests/s)",
                  ["store", "catalogue", "entities", "state", "CRM requests", "elapsed", "CRM floor", "entities/s"],
                  rows)


if __name__ == "__main__":
    main()
