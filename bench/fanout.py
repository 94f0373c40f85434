"""Issue 15, items 1 and 2: the schedules' fan-out and the worker's integrations side by side.

In process: the in-memory store and queue (`--store-ms`: each store call answered after that many ms,
a model of DynamoDB's latency), the real amoCRM source and Metrika client over loopback HTTP to the
sandboxes (`--metrika-ms`: each upload answered after that many ms). With `--moto`, the store is
DynamoDB on moto_server and the schedule's scan and sends go to moto too (see the note it prints:
moto's SQS recounts the whole queue on every message sent, so its send time grows with the queue).

* the schedules: the walk of issue 14 (each integration reconciled in the scheduled function, one after
  another) against the fan-out (one scan, one SendMessageBatch per ten integrations), then the queued
  jobs run by the worker, one integration at a time and eight at a time;
* a worker batch of 100 messages over 50 integrations (2 deals each, 5 Metrika tokens of ten
  integrations each), one group at a time against eight at a time.

All integrations share one amoCRM sandbox account, whose rate limit is lifted (each would be its own
account, with its own 7 requests a second). Their deals are two days old: reconciliation finds nothing.

    python -m bench.fanout [--integrations 1000] [--store-ms 0] [--metrika-ms 0] [--moto]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from typing import Any

from bench.harness import table


class SlowStore:
    """The in-memory store, each call answered after `seconds` (DynamoDB's round trip, modelled)."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self._inner, self._seconds = inner, seconds

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute) or self._seconds <= 0:
            return attribute

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(self._seconds)
            return attribute(*args, **kwargs)
        return slow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--integrations", type=int, default=1000)
    parser.add_argument("--store-ms", type=float, default=0.0)
    parser.add_argument("--metrika-ms", type=float, default=0.0)
    parser.add_argument("--moto", action="store_true")
    args = parser.parse_args()
    with ExitStack() as stack:
        from sandbox.amocrm import AmoCrmSandbox, seed_demo
        from sandbox.metrika import MetrikaSandbox
        metrika = MetrikaSandbox(daily_limit=10**9).start()
        stack.callback(metrika.stop)
        amocrm = AmoCrmSandbox(token="bench-fanout", rate_limit=10**6).start()
        stack.callback(amocrm.stop)
        seed_demo(amocrm)
        os.environ.update(METRIKA_API_URL=metrika.url, ADMIN_TOKEN="bench-fanout-admin", STAGE="dev",
                          ALLOW_LOOPBACK_CRM="1")  # the CRM sandbox listens on loopback
        if args.moto:
            from bench.harness import environment
            world = stack.enter_context(environment())
            os.environ.update(world["env"], METRIKA_API_URL=metrika.url)
        import app
        import chalicelib.crm.amocrm.source as amo_source
        from chalicelib.crm import ORDER, EntityRef
        from chalicelib.crm.amocrm.source import AmoCrmSource
        from chalicelib.ingest import Ingest
        from chalicelib.queue import MemoryQueue
        from chalicelib.schedules import fan_out
        from chalicelib.settings import get_settings
        from chalicelib.store.memory import MemoryStore
        from chalicelib.worker import Worker
        get_settings.cache_clear()
        amo_source.MIN_INTERVAL = 0.0
        if args.moto:
            store, queue = app.get_store(), app.get_queue()
        else:
            store, queue = SlowStore(MemoryStore(), args.store_ms / 1000), MemoryQueue()
            app._STORE, app._QUEUE = store, queue
        source = AmoCrmSource(lambda scope, interval, now: now, accounts=store)
        app._SOURCES.clear()
        app._SOURCES.update(amocrm=source)
        metrika.set_faults(slow=1.0 if args.metrika_ms else 0.0, slow_seconds=args.metrika_ms / 1000, paths="/data/")
        for lead in amocrm.leads.values():
            lead["updated_at"] -= 2 * 86400

        def drain(threads: int) -> tuple[int, float]:
            worker = Worker(store, queue, app.get_metrika, {"amocrm": source}, threads=threads)
            handled, started = 0, time.perf_counter()
            if args.moto:
                from sandbox.worker import WorkerLoop
                loop = WorkerLoop(lambda event, _: worker.handle(r["body"] for r in event["Records"]),
                                  get_settings().events_queue, batch_size=100, batching_window=0.2, wait_seconds=0)
                handled = loop.drain(idle_rounds=1)
            else:
                while bodies := queue.receive(100):
                    worker.handle(bodies)
                    handled += len(bodies)
            return handled, time.perf_counter() - started

        config = {"crm": "amocrm", "counter_id": 9700, "timezone": "Europe/Moscow", "currency": "RUB",
                  "phone_region": "RU",
                  "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": "s" * 20}}
        ids = [f"fan-{n:04d}" for n in range(args.integrations)]
        for integration_id in ids:
            store.put_integration(integration_id, {**config, "metrika_token": f"y0_fanout_{integration_id}"})
        rows = []
        # Before: the walk (what reconcile_all did per integration, one after another).
        started = time.perf_counter()
        for integration_id in ids:
            app._reconcile(integration_id, None)
        walk = time.perf_counter() - started
        rows.append(["walk in the schedule (issue 14)", f"{walk:.2f} s", f"{walk / len(ids) * 1000:.1f} ms", ""])
        # After: the fan-out (its scan and sends timed apart), then the jobs in the worker.
        for threads in (1, 8):
            run = str(int(time.time()) + 5)
            started = time.perf_counter()
            listed = store.list_integration_ids()
            scanned = time.perf_counter() - started
            started = time.perf_counter()
            answer = fan_out(store, queue, "reconcile_all", run=run)
            fanned = time.perf_counter() - started
            rows.append(["fan-out in the schedule: scan / whole", f"{scanned:.2f} s / {fanned:.2f} s",
                         f"{fanned / len(ids) * 1000:.2f} ms", f"{answer['queued']} messages, {len(listed)} listed"])
            handled, seconds = drain(threads)
            rows.append([f"the jobs in the worker, {threads} at a time", f"{seconds:.2f} s",
                         f"{seconds / len(ids) * 1000:.1f} ms", f"{handled} messages"])
        stack_name = "moto" if args.moto else f"in-memory store ({args.store_ms:g} ms a call)"
        table(f"Scheduled reconciliation of {len(ids)} idle integrations ({stack_name}; "
              f"Metrika {args.metrika_ms:g} ms an upload)", ["what", "time", "per integration", "note"], rows)

        # A worker batch: 100 messages over 50 integrations.
        mapping = [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"}]
        ingest = Ingest(store, queue, max_body_bytes=1 << 20)
        rows = []
        for threads in (1, 8):
            group = [f"batch-{threads}-{n:02d}" for n in range(50)]
            for n, integration_id in enumerate(group):
                counter = 9800 + n + 100 * threads
                store.put_integration(integration_id, {**config, "counter_id": counter,
                                                       "metrika_token": f"y0_batch_{threads}_{n // 10}"})
                store.put_status_mapping(integration_id, mapping, 0)
                metrika.counter(counter).order_statuses.update({"new": {"id": "new", "type": "IN_PROGRESS"}})
                refs = []
                for d in range(2):
                    person = amocrm.create_contact(f"Клиент {n}-{d}", phones=[f"+7 916 {n:03d}{d:04d}"], notify=False)
                    lead = amocrm.create_lead(f"Сделка {n}-{d}", 7001, 1001, price=1000 + n, contacts=[person["id"]],
                                              notify=False)
                    refs.append(EntityRef(ORDER, str(lead["id"]), int(time.time()), "add"))
                ingest.record(integration_id, refs, origin="amocrm")
            metrika.requests.clear()
            crm_before = len(amocrm.requests)
            with metrika._lock:
                metrika.max_in_flight = 0
            handled, seconds = drain(threads)
            delivered = sum(len(metrika.counter(9800 + n + 100 * threads).orders) for n in range(50))
            rows.append([threads, handled, delivered, f"{seconds:.2f} s", len(amocrm.requests) - crm_before,
                         len(metrika.requests), metrika.max_in_flight])
        table(f"A worker batch: 100 messages over 50 integrations, 5 Metrika tokens ({stack_name}; "
              f"Metrika {args.metrika_ms:g} ms an upload)",
              ["integrations at once", "messages", "orders delivered", "time", "CRM requests", "Metrika requests",
               "most in flight per token"], rows)
        print(json.dumps({"note": "moto's SendMessageBatch recounts the queue per message sent (moto 5.2.5, "
                                  "sqs/models.py send_message → Queue.attributes): its time grows with the queue"}
                         if args.moto else {}))


if __name__ == "__main__":
    main()
