"""Issue 15, item 7: the deployment at scale — N integrations × M deals (amoCRM and Bitrix24 mixed).

In process: the in-memory store and queue (tests/core.py's pieces), the real ingest (webhook bodies as
the CRMs send them, verified and recorded), the real worker (batches of `WORKER_BATCH_SIZE` messages,
`WORKER_THREADS` integrations at once, as app.py configures it), the real CRM sources and Metrika client,
with ALL CRM and Metrika traffic over loopback HTTP to the sandboxes: one amoCRM sandbox and one Bitrix24
sandbox (each serves ONE account / portal, so every integration's deals are its own leads / deals in that
account, read by id), one Metrika sandbox with one counter per integration and, by default, one OAuth token
per integration (`--integrations-per-token` to share tokens as an agency might).

Phases, each counted apart: the webhooks (one per deal, through `Ingest`, as the API handler runs it),
the worker draining them, then the schedules: `reconcile_all` and `confirm_uploads` fan out one job per
integration, and the worker runs the jobs.

Counted: store calls by method name (a wrapper: nothing here knows the store's internals), queue
messages and `SendMessageBatch` requests (`Queue.send` sends ten a request), CRM requests (each sandbox's
request log), Metrika requests by path, log bytes (the app's logger and stdout, as CloudWatch gets them).
DynamoDB calls: `--moto-slice K` runs the same phases for K integrations with `DynamoStore` on
moto_server and counts the real DynamoDB operations (a botocore hook), attributing each to the store
method that made it, with request units estimated from item sizes (moto answers no real capacity).

Pacing: all integrations share one sandbox account, so the sandboxes' per-account limits are lifted and
the sources' per-account pacing (`MIN_INTERVAL`: amoCRM 7/s, Bitrix24 2/s) is set to 0; the limiter is
still called (and counted) on every CRM request. Each real account has its own limit: BENCHMARKS.md's
projection applies it on paper. Deals/s here is the in-process ceiling at loopback latency.

    python -m bench.scale                              (1,000 × 10 and a moto slice of 100 × 2: ~10 minutes on
                                                        the shared 2-core box, ~5 of them the moto slice)
    python -m bench.scale --moto-slice 0               (the in-memory run alone)
    python -m bench.scale --quick                      (50 × 2, slice of 4 × 2: a smoke run, ~15 s)
    python -m bench.scale --integrations 200 --deals 1 --aws-ms 8 --crm-ms 250 --metrika-ms 400 --moto-slice 0
                                                       (modelled latency: the worker's seconds a deal)
    python -m bench.scale --integrations 200 --deals 5 --batch-size 10 --moto-slice 0
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.harness import table

AMO_SECRET = "scale-bench-amo-secret-0123"
B24_TOKEN = "scale-bench-b24-application-token"
AMO_MAPPING = [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"}]
B24_MAPPING = [{"crm_status": "NEW", "metrika_status_id": "new", "type": "IN_PROGRESS"}]
COUNTER_BASE = 50_000
# CloudWatch Logs stores each event with its Lambda prefix ("[INFO]\t<time>\t<request id>\t"): ~70 bytes
LOG_PREFIX_BYTES = 70
WRITES = ("PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems")


class CountedStore:
    """The store, each public method call counted by name (thread-safe). `method()` names the outermost
    counted call running on this thread, so DynamoDB operations can be put down to it."""

    def __init__(self, inner: Any, seconds: float = 0.0) -> None:
        self._inner, self.calls, self._lock, self._local = inner, Counter(), threading.Lock(), threading.local()
        self._seconds = seconds  # each call answered after this long: DynamoDB's round trip, modelled

    def method(self) -> str | None:
        return getattr(self._local, "method", None)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute) or name.startswith("_"):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            outer = self.method()
            if outer is None:
                self._local.method = name
            try:
                if self._seconds and outer is None:
                    time.sleep(self._seconds)
                return attribute(*args, **kwargs)
            finally:
                if outer is None:
                    self._local.method = None
        return counted


class CountedQueue:
    """The queue, its sends counted: messages, and SQS requests as `EventQueue.send` makes them (ten
    messages a SendMessageBatch)."""

    def __init__(self, inner: Any, seconds: float = 0.0) -> None:
        self._inner, self._lock, self._seconds = inner, threading.Lock(), seconds
        self.messages = self.requests = 0

    def send(self, messages: list[dict], delay_seconds: int = 0) -> None:
        with self._lock:
            self.messages += len(messages)
            self.requests += math.ceil(len(messages) / 10)
        if self._seconds:
            time.sleep(self._seconds * math.ceil(len(messages) / 10))
        return self._inner.send(messages, delay_seconds)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class LogBytes(logging.Handler):
    """Bytes the app logs (its logger's lines plus what it prints), each line with Lambda's prefix."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self.bytes = self.lines = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        self._add(len(record.getMessage().encode()) + 1)

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._add(len(line.encode()) + 1)
        return len(text)

    def flush(self) -> None:  # a stream's flush (stdout) and a handler's
        pass

    def _add(self, size: int) -> None:
        with self._guard:
            self.bytes += size + LOG_PREFIX_BYTES
            self.lines += 1


class DynamoCalls:
    """DynamoDB operations of a botocore client, counted (by operation and by the store method that made
    them) with request units estimated from item sizes: a write 1 per KB of the item written (a
    transaction twice), a read 1 per 4 KB (strongly consistent) or half that (eventually consistent)."""

    def __init__(self, store: CountedStore) -> None:
        self.store, self._lock = store, threading.Lock()
        self.operations: Counter = Counter()
        self.by_method: dict[str, Counter] = {}
        self.read_units = self.write_units = 0.0
        self.items_written: Counter = Counter()
        self.units_by_method: dict[str, list[float]] = {}  # method → [read units, write units]
        self._pending = threading.local()  # the request's parameters, from before the call to after it

    def attach(self, client: Any) -> None:
        # the API's parameters (`before-call` has them serialized already); after the call, its answer
        client.meta.events.register("before-parameter-build.dynamodb", self._before)
        client.meta.events.register("after-call.dynamodb", self._after)

    def clear(self) -> None:
        with self._lock:
            self.operations.clear()
            self.by_method.clear()
            self.read_units = self.write_units = 0.0
            self.items_written.clear()
            self.units_by_method.clear()

    def _units(self, read: float, write: float) -> None:
        units = self.units_by_method.setdefault(self.store.method() or "(another thread)", [0.0, 0.0])
        units[0] += read
        units[1] += write

    def _before(self, model: Any, params: dict, **_: Any) -> None:
        self._pending.params = params
        name, units, items = model.name, 0.0, 0
        if name in ("PutItem", "UpdateItem", "DeleteItem"):
            items, units = 1, _kb(params.get("Item") or params.get("Key"), 1024)
        elif name == "BatchWriteItem":
            writes = [w for rows in params.get("RequestItems", {}).values() for w in rows]
            items = len(writes)
            units = sum(_kb((w.get("PutRequest") or {}).get("Item") or (w.get("DeleteRequest") or {}).get("Key"), 1024)
                        for w in writes)
        elif name == "TransactWriteItems":
            items = len(params.get("TransactItems", []))
            units = 2.0 * items
        with self._lock:
            self.operations[name] += 1
            self.by_method.setdefault(self.store.method() or "(another thread)", Counter())[name] += 1
            self.write_units += units
            self.items_written[name] += items
            self._units(0.0, units)

    def _after(self, model: Any, parsed: dict, **_: Any) -> None:
        name, params = model.name, getattr(self._pending, "params", None) or {}
        consistent = 1.0 if params.get("ConsistentRead") else 0.5
        units = 0.0
        if name == "GetItem":
            units = consistent * _kb(parsed.get("Item"), 4096)
        elif name in ("Query", "Scan"):
            units = consistent * _kb(parsed.get("Items"), 4096)
        elif name == "BatchGetItem":  # each key a read, found or not (at least one unit, or half)
            for table_name, request in params.get("RequestItems", {}).items():
                each = 1.0 if request.get("ConsistentRead") else 0.5
                found = parsed.get("Responses", {}).get(table_name, [])
                units += each * (sum(_kb(item, 4096) for item in found) + len(request.get("Keys", [])) - len(found))
        elif name == "TransactGetItems":
            units = sum(2 * _kb(r.get("Item"), 4096) for r in parsed.get("Responses", []))
        with self._lock:
            self.read_units += units
            self._units(units, 0.0)


def _kb(value: Any, unit: int) -> int:
    """Request units an item (or items) of this size costs: at least one."""
    size = len(json.dumps(value, default=str)) if value else 0
    return max(1, math.ceil(size / unit))


@dataclass
class Latency:
    """Modelled round trips (seconds): each DynamoDB call and SQS SendMessageBatch, each CRM request,
    each Metrika request."""

    aws: float = 0.0
    crm: float = 0.0
    metrika: float = 0.0


@dataclass
class Figures:
    """What one phase did."""

    seconds: float = 0.0
    store: Counter = field(default_factory=Counter)
    messages: int = 0
    sqs_sends: int = 0
    crm: Counter = field(default_factory=Counter)
    metrika: Counter = field(default_factory=Counter)
    log_bytes: int = 0
    log_lines: int = 0
    batches: int = 0
    dynamo: dict = field(default_factory=dict)

    def crm_total(self) -> int:
        return sum(self.crm.values())

    def metrika_total(self) -> int:
        return sum(self.metrika.values())


@dataclass
class Result:
    integrations: int
    deals: int
    phases: dict[str, Figures]
    delivered_once: int  # deals whose order Metrika received exactly once
    orders_seen: int
    uploaded_more_than_once: int
    pending: int  # messages still queued (retries) when the run ended
    queued_by_reconcile: int
    state_item_bytes: tuple[int, int] = (0, 0)  # entity state items: mean, max (JSON)


@dataclass
class Sandboxes:
    amocrm: Any
    bitrix: Any
    metrika: Any

    def crm_requests(self) -> Counter:
        return Counter(amocrm=len(self.amocrm.requests), bitrix24=len(self.bitrix.calls))

    def metrika_requests(self) -> Counter:
        return Counter(_metrika_kind(r["path"]) for r in self.metrika.requests)


def _metrika_kind(path: str) -> str:
    """`/cdp/api/v1/counter/7/data/orders` → `data/orders`; a management path → its last two parts."""
    parts = [p for p in path.split("/") if p and not p.isdigit()]
    return "/".join(parts[-2:])


_TENANT = threading.local()  # the account (amoCRM token) or portal (Bitrix24 code) of the request served
_REST = re.compile(r"/rest/(?P<user>[^/]+)/(?P<code>[^/]+)/(?P<method>[\w.]+?)(\.json)?/?$")


_CRM_SECONDS = [0.0]  # each CRM API request answered after this long (`--crm-ms`)


class TenantDict(dict):
    """A sandbox's entities of every account: read by id, any; listed, only the calling account's."""

    def __init__(self) -> None:
        super().__init__()
        self.owner: dict[Any, str] = {}

    def _mine(self, key: Any) -> bool:
        tenant = getattr(_TENANT, "name", None)
        return tenant is None or self.owner.get(key) == tenant

    def values(self) -> list:  # type: ignore[override]
        return [v for k, v in dict.items(self) if self._mine(k)]

    def items(self) -> list:  # type: ignore[override]
        return [(k, v) for k, v in dict.items(self) if self._mine(k)]

    def __iter__(self) -> Any:
        return iter([k for k in dict.keys(self) if self._mine(k)])


def _accounts_sandboxes() -> tuple[type, type]:
    """The amoCRM and Bitrix24 sandboxes, each serving many accounts in one process: an amoCRM account
    is its access token, a Bitrix24 portal its incoming-webhook code; a list answers only the caller's
    entities (what reconciliation reads), everything else is the sandbox's own behaviour."""
    from sandbox.amocrm import AmoCrmSandbox
    from sandbox.bitrix24 import Bitrix24Sandbox

    class AmoCrmAccounts(AmoCrmSandbox):
        def __init__(self, **options: Any) -> None:
            self.accounts: dict[str, str] = {}  # access token → account
            super().__init__(**options)

        def reset(self) -> None:
            super().reset()
            self.leads, self.contacts = TenantDict(), TenantDict()

        def _guarded(self, handler: Any) -> Any:
            inner = super()._guarded(handler)

            def wrapped(request: Any) -> Any:
                account = self.accounts.get(request.headers.get("authorization", "").removeprefix("Bearer "))
                if account is not None:
                    request.headers["authorization"] = f"Bearer {self.token}"
                _TENANT.name = account
                if _CRM_SECONDS[0]:
                    time.sleep(_CRM_SECONDS[0])
                try:
                    return inner(request)
                finally:
                    _TENANT.name = None
            return wrapped

    class Bitrix24Portals(Bitrix24Sandbox):
        def __init__(self, **options: Any) -> None:
            self.portals: dict[str, str] = {}  # incoming-webhook code → portal
            super().__init__(**options)

        def reset(self) -> None:
            super().reset()
            self.deals, self.contacts = TenantDict(), TenantDict()

        def portal_url(self, code: str) -> str:
            return f"{self.url}/rest/{self.user}/{code}/"

        def _rest(self, request: Any) -> Any:
            portal = self.portals.get(request.match["code"])
            if portal is not None:
                request.match = _REST.match(request.path.replace(f"/{request.match['code']}/", f"/{self.code}/", 1))
            _TENANT.name = portal
            if _CRM_SECONDS[0]:
                time.sleep(_CRM_SECONDS[0])
            try:
                return super()._rest(request)
            finally:
                _TENANT.name = None

    return AmoCrmAccounts, Bitrix24Portals


@contextlib.contextmanager
def sandboxes() -> Any:
    """One amoCRM, one Bitrix24 (each serving many accounts) and one Metrika sandbox, limits lifted."""
    from sandbox.metrika import MetrikaSandbox
    amocrm_class, bitrix_class = _accounts_sandboxes()
    started: list = []
    try:
        metrika = MetrikaSandbox(daily_limit=10**9).start()
        started.append(metrika)
        amocrm = amocrm_class(token="scale-bench-amo", rate_limit=10**9).start()
        started.append(amocrm)
        bitrix = bitrix_class(bucket_size=10**9).start()
        started.append(bitrix)
        amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
        bitrix.add_funnel(0, "Общая", [("NEW", "Новая", None), ("WON", "Сделка успешна", "S"),
                                       ("LOSE", "Сделка провалена", "F")])
        yield Sandboxes(amocrm, bitrix, metrika)
    finally:
        for server in reversed(started):
            server.stop()


def seed(raw_store: Any, boxes: Sandboxes, integrations: int, deals: int, *, per_token: int = 1,
         prefix: str = "scale") -> tuple[list[str], list[tuple[str, str, bytes, dict]], dict[str, int]]:
    """Integrations (even: amoCRM, odd: Bitrix24), each with its own Metrika counter and `deals` deals
    with a contact each; the webhook each deal's creation sends. Returns the ids, the webhooks in the
    order they arrive (interleaved: deal d of every integration before deal d + 1), and each
    integration's counter."""
    amocrm, bitrix, metrika = boxes.amocrm, boxes.bitrix, boxes.metrika
    ids, counters, per_integration = [], {}, []
    base = COUNTER_BASE + len(metrika.counters)
    for n in range(integrations):
        integration_id = f"{prefix}-{n:05d}"
        counter = base + n
        common = {"counter_id": counter, "metrika_token": f"y0_{prefix}_{n // max(1, per_token):05d}",
                  "timezone": "Europe/Moscow", "currency": "RUB", "phone_region": "RU"}
        if n % 2 == 0:
            token = f"amo-{integration_id}"
            amocrm.accounts[token] = integration_id
            raw_store.put_integration(integration_id, {**common, "crm": "amocrm", "connection": {
                "base_url": amocrm.url, "access_token": token, "webhook_secret": AMO_SECRET}})
            raw_store.put_status_mapping(integration_id, AMO_MAPPING, 0)
        else:
            code = f"code{integration_id}"
            bitrix.portals[code] = integration_id
            raw_store.put_integration(integration_id, {**common, "crm": "bitrix24", "connection": {
                "webhook_url": bitrix.portal_url(code), "application_token": B24_TOKEN}})
            raw_store.put_status_mapping(integration_id, B24_MAPPING, 0)
        metrika.counter(counter).order_statuses.update({"new": {"id": "new", "type": "IN_PROGRESS"}})
        hooks = []
        for d in range(deals):
            phone = f"+7 916 {n % 1000:03d}-{d // 100 % 100:02d}-{d % 100:02d}"
            if n % 2 == 0:
                person = amocrm.create_contact(f"Клиент {n}-{d}", phones=[phone], notify=False)
                amocrm.outbox.clear()
                lead = amocrm.create_lead(f"Сделка {n}-{d}", 7001, 1001, price=1000 + d, contacts=[person["id"]])
                amocrm.contacts.owner[person["id"]] = amocrm.leads.owner[lead["id"]] = integration_id
                (_, body), = amocrm.outbox
                amocrm.outbox.clear()
                hooks.append((integration_id, "amocrm", body, {"secret": AMO_SECRET}))
            else:
                person = bitrix.create_contact(f"Клиент {n}-{d}", phones=[phone], notify=False)
                deal = bitrix.create_deal(f"Сделка {n}-{d}", stage_id="NEW", opportunity=f"{1000 + d}.00",
                                          contact_id=person["ID"], notify=False)
                bitrix.contacts.owner[person["ID"]] = bitrix.deals.owner[deal["ID"]] = integration_id
                hooks.append((integration_id, "bitrix24", bitrix.event_body("ONCRMDEALADD", deal["ID"], B24_TOKEN), {}))
        ids.append(integration_id)
        counters[integration_id] = counter
        per_integration.append(hooks)
    webhooks = [hooks[d] for d in range(deals) for hooks in per_integration]
    return ids, webhooks, counters


def run(boxes: Sandboxes, integrations: int, deals: int, *, raw_store: Any = None, batch_size: int = 100,
        threads: int | None = None, per_token: int = 1, prefix: str = "scale",
        on_store: Callable[[CountedStore], Any] | None = None, patience: float = 30.0,
        latency: Latency | None = None) -> Result:
    """The phases over `integrations` × `deals`. `raw_store`: the store to use (the in-memory one unless
    given); `on_store(counted)` may return an object with `clear()` and a snapshot `figures()` of DynamoDB
    calls (moto), taken per phase."""
    import chalicelib.crm.amocrm.source as amo_source
    import chalicelib.crm.bitrix24.source as b24_source
    os.environ.setdefault("ALLOW_LOOPBACK_CRM", "1")  # the CRM sandboxes listen on loopback
    paced = amo_source.MIN_INTERVAL, b24_source.MIN_INTERVAL
    amo_source.MIN_INTERVAL = b24_source.MIN_INTERVAL = 0.0  # one sandbox for all accounts: see the docstring
    latency = latency or Latency()
    _CRM_SECONDS[0] = latency.crm
    boxes.metrika.set_faults(slow=1.0 if latency.metrika else 0.0, slow_seconds=latency.metrika)
    try:
        return _run(boxes, integrations, deals, raw_store=raw_store, batch_size=batch_size, threads=threads,
                    per_token=per_token, prefix=prefix, on_store=on_store, patience=patience, aws=latency.aws)
    finally:
        amo_source.MIN_INTERVAL, b24_source.MIN_INTERVAL = paced
        _CRM_SECONDS[0] = 0.0
        boxes.metrika.set_faults()


def _run(boxes: Sandboxes, integrations: int, deals: int, *, raw_store: Any, batch_size: int, threads: int | None,
         per_token: int, prefix: str, on_store: Callable[[CountedStore], Any] | None, patience: float,
         aws: float) -> Result:
    from chalicelib.crm.amocrm.source import AmoCrmSource
    from chalicelib.crm.bitrix24.source import Bitrix24Source
    from chalicelib.ingest import Ingest
    from chalicelib.metrika.client import MetrikaClient
    from chalicelib.metrika.governor import QuotaGovernor
    from chalicelib.queue import MemoryQueue
    from chalicelib.schedules import fan_out
    from chalicelib.store.memory import MemoryStore
    from chalicelib.worker import WORKER_THREADS, Worker
    raw_store = raw_store if raw_store is not None else MemoryStore()
    ids, webhooks, counters = seed(raw_store, boxes, integrations, deals, per_token=per_token, prefix=prefix)
    store, queue = CountedStore(raw_store, aws), CountedQueue(MemoryQueue(), aws)
    dynamo = on_store(store) if on_store else None
    sources = {"amocrm": AmoCrmSource(store.reserve_slot, accounts=store),
               "bitrix24": Bitrix24Source(store.reserve_slot)}

    def metrika_for(integration: dict) -> MetrikaClient:
        token = integration["metrika_token"]
        return MetrikaClient(token, boxes.metrika.url, governor=QuotaGovernor(store, token))

    ingest = Ingest(store, queue, max_body_bytes=2 << 20)
    worker = Worker(store, queue, metrika_for, sources, threads=threads or WORKER_THREADS)
    logs = LogBytes()
    app_logger = logging.getLogger("metrika_crm_bridge")
    phases: dict[str, Figures] = {}

    @contextlib.contextmanager
    def phase(name: str) -> Any:
        store.calls.clear()
        queue.messages = queue.requests = 0
        logs.bytes = logs.lines = 0
        crm, metrika = boxes.crm_requests(), boxes.metrika_requests()
        if dynamo is not None:
            dynamo.clear()
        figures = phases[name] = Figures()
        started = time.perf_counter()
        app_logger.addHandler(logs)
        propagate, app_logger.propagate = app_logger.propagate, False
        try:
            with contextlib.redirect_stdout(logs):
                yield figures
        finally:
            app_logger.removeHandler(logs)
            app_logger.propagate = propagate
        figures.seconds = time.perf_counter() - started
        figures.store = Counter(store.calls)
        figures.messages, figures.sqs_sends = queue.messages, queue.requests
        figures.crm = boxes.crm_requests() - crm
        figures.metrika = boxes.metrika_requests() - metrika
        figures.log_bytes, figures.log_lines = logs.bytes, logs.lines
        if dynamo is not None:
            figures.dynamo = dynamo.figures()

    def drain(figures: Figures) -> None:
        while True:
            bodies = queue.receive(batch_size)
            if bodies:
                worker.handle(bodies)
                figures.batches += 1
                continue
            due = queue.next_due()
            if due is None or due - time.time() > patience:
                return
            time.sleep(max(0.0, due - time.time()))

    with phase("webhooks"):
        for integration_id, crm, body, query in webhooks:
            getattr(ingest, crm)(integration_id, body, query)
    with phase("worker") as figures:
        drain(figures)
    with phase("reconcile_all (schedule)"):
        fan_out(store, queue, "reconcile_all", run=str(int(time.time())))
    with phase("reconcile jobs (worker)") as figures:
        jobs = queue.receive(10**9)  # the jobs alone: what they queue is counted, then drained below
        for start in range(0, len(jobs), batch_size):
            worker.handle(jobs[start:start + batch_size])
            figures.batches += 1
    queued_by_reconcile = phases["reconcile jobs (worker)"].messages
    with phase("reconcile's deliveries (worker)") as figures:
        drain(figures)
    with phase("confirm_uploads (schedule)"):
        fan_out(store, queue, "confirm_uploads", run=str(int(time.time()) + 1))
    with phase("confirm jobs (worker)") as figures:
        drain(figures)
    # The steady state of an idle integration: each schedule once more, nothing changed, nothing pending.
    with phase("reconcile again, nothing changed (fan-out + jobs)") as figures:
        fan_out(store, queue, "reconcile_all", run=str(int(time.time()) + 2))
        drain(figures)
    with phase("confirm again, nothing pending (fan-out + jobs)") as figures:
        fan_out(store, queue, "confirm_uploads", run=str(int(time.time()) + 3))
        drain(figures)

    once = seen = more = 0
    for integration_id in ids:
        counter = boxes.metrika.counter(counters[integration_id])
        times = [n for key, n in counter.times_uploaded.items() if key.startswith("orders:")]
        seen += len(counter.orders)
        once += sum(1 for n in times if n == 1)
        more += sum(1 for n in times if n > 1)
    sizes = [len(json.dumps(e, default=str, ensure_ascii=False).encode())
             for integration_id in ids[:50] for e in raw_store.list_entities(integration_id)]
    return Result(integrations, deals, phases, once, seen, more, len(queue), queued_by_reconcile,
                  (int(sum(sizes) / len(sizes)) if sizes else 0, max(sizes, default=0)))


# --- moto slice ------------------------------------------------------------------------------------------

class MotoCounts:
    def __init__(self, counted: CountedStore, calls: DynamoCalls) -> None:
        self._calls = calls

    def clear(self) -> None:
        self._calls.clear()

    def figures(self) -> dict:
        calls = self._calls
        return {"operations": Counter(calls.operations), "by_method": {m: dict(c) for m, c in calls.by_method.items()},
                "read_units": calls.read_units, "write_units": calls.write_units,
                "items_written": Counter(calls.items_written),
                "units_by_method": {m: list(u) for m, u in calls.units_by_method.items()}}


@contextlib.contextmanager
def moto_store() -> Any:
    """DynamoStore on a moto_server of its own (tables from infra/*.yaml through tools.infra), and a
    hook to count its calls; yields (store, on_store)."""
    import boto3

    from sandbox.local_stack import emulator_env, free_port, start_moto, stop
    port = free_port()
    moto = start_moto(port)
    saved = dict(os.environ)
    try:
        os.environ.update(emulator_env(f"http://127.0.0.1:{port}"), STAGE="dev")
        from chalicelib.settings import get_settings
        from chalicelib.store.dynamodb import DynamoStore
        from tools.infra import ensure_resources
        get_settings.cache_clear()
        with contextlib.redirect_stdout(io.StringIO()):
            ensure_resources(emulator=True)
        settings = get_settings()
        from botocore.config import Config
        client = boto3.client("dynamodb", config=Config(max_pool_connections=64))
        store = DynamoStore(client, settings.config_table, settings.state_table, quota_table=settings.quota_table)

        def on_store(counted: CountedStore) -> MotoCounts:
            calls = DynamoCalls(counted)
            calls.attach(client)
            return MotoCounts(counted, calls)
        yield store, on_store
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stop([moto])


# --- report ----------------------------------------------------------------------------------------------

def _per(value: float, count: int) -> str:
    return f"{value / count:.2f}" if count else "—"


def report(result: Result, *, batch_size: int, threads: int, slice_result: Result | None) -> None:
    deals, phases = result.integrations * result.deals, result.phases
    webhooks, worker = phases["webhooks"], phases["worker"]
    rows = []
    for name, figures in phases.items():
        rows.append([name, f"{figures.seconds:.2f} s", figures.batches or "—", sum(figures.store.values()),
                     figures.messages, figures.sqs_sends, figures.crm_total(), figures.metrika_total(),
                     f"{figures.log_bytes / 1024:.0f} KB"])
    table(f"Scale: {result.integrations} integrations × {result.deals} deals (amoCRM and Bitrix24 alternating; "
          f"in-memory store, loopback sandboxes; worker batches of {batch_size}, {threads} integrations at once)",
          ["phase", "time", "batches", "store calls", "messages sent", "SendMessageBatch", "CRM requests",
           "Metrika requests", "logs"], rows)
    delivery = webhooks.seconds + worker.seconds
    store_live = webhooks.store + worker.store
    table("Per delivered deal (webhook + worker)", ["figure", "value"], [
        ["deals delivered exactly once / deals", f"{result.delivered_once} / {deals}"
                                                 f" (orders in Metrika: {result.orders_seen}, sent twice: "
                                                 f"{result.uploaded_more_than_once})"],
        ["webhooks recorded a second (ingest, in process)", f"{deals / webhooks.seconds:.0f}"],
        ["deals a second through the worker", f"{deals / worker.seconds:.1f}" if worker.seconds else "—"],
        ["deals a second, webhook to Metrika", f"{deals / delivery:.1f}"],
        ["CRM requests a deal", f"{_per(worker.crm_total(), deals)} ({dict(worker.crm)})"],
        ["Metrika requests a deal", f"{_per(worker.metrika_total(), deals)} ({dict(worker.metrika)})"],
        ["store calls a deal: webhook / worker", f"{_per(sum(webhooks.store.values()), deals)} / "
                                                 f"{_per(sum(worker.store.values()), deals)}"],
        ["SQS messages a deal (sent)", _per(webhooks.messages + worker.messages, deals)],
        ["log bytes a deal: webhook / worker", f"{_per(webhooks.log_bytes, deals)} / {_per(worker.log_bytes, deals)}"],
        ["worker seconds a deal (batches one after another: Lambda GB-s a deal at 1,024 MB)",
         f"{worker.seconds / deals:.4f} s"],
        ["ingest seconds a webhook (the API handler's work, no HTTP)", f"{webhooks.seconds / deals:.4f} s"],
        ["entity state item (JSON): mean / max", f"{result.state_item_bytes[0]} B / {result.state_item_bytes[1]} B"],
        ["messages still queued at the end", result.pending],
        ["messages the reconciliation queued", result.queued_by_reconcile],
    ])
    table("Store calls a deal by method (webhook + worker), in-memory run", ["method", "calls", "a deal"],
          [[name, n, _per(n, deals)] for name, n in store_live.most_common()])
    n = result.integrations
    sched = [[name, f"{f.seconds:.3f} s", _per(f.seconds * 1000, n) + " ms", _per(sum(f.store.values()), n),
              _per(f.messages, n), _per(f.crm_total(), n), _per(f.metrika_total(), n)]
             for name, f in phases.items() if "reconcile" in name or "confirm" in name]
    # (the last two rows: an idle integration's cost each time the schedule fires)
    table(f"Schedules: per integration ({n} integrations)", ["phase", "time", "per integration", "store calls",
                                                            "messages", "CRM requests", "Metrika requests"], sched)
    if slice_result is not None:
        report_moto(slice_result)
        report_projection(result, slice_result)


def report_projection(result: Result, sliced: Result) -> None:
    """DynamoDB a deal at the big run's shape: its store calls a deal × the operations and request units
    each call made on moto (the slice)."""
    deals = result.integrations * result.deals
    calls = result.phases["webhooks"].store + result.phases["worker"].store
    slice_calls = sliced.phases["webhooks"].store + sliced.phases["worker"].store
    ops: dict[str, Counter] = {}
    units: dict[str, list[float]] = {}
    for name in ("webhooks", "worker"):
        dynamo = sliced.phases[name].dynamo
        for method, counted in dynamo.get("by_method", {}).items():
            ops.setdefault(method, Counter()).update(counted)
        for method, (read, write) in dynamo.get("units_by_method", {}).items():
            total = units.setdefault(method, [0.0, 0.0])
            total[0] += read
            total[1] += write
    rows, totals = [], Counter()
    for method, n in calls.most_common():
        measured = slice_calls.get(method, 0)
        per_call = {op: c / measured for op, c in ops.get(method, {}).items()} if measured else {}
        read, write = (u / measured for u in units.get(method, [0.0, 0.0])) if measured else (0.0, 0.0)
        for op, c in per_call.items():
            totals[op] += c * n / deals
        totals["read units"] += read * n / deals
        totals["write units"] += write * n / deals
        rows.append([method, _per(n, deals), ", ".join(f"{op} {c:.2f}" for op, c in sorted(per_call.items())) or
                     ("not on moto's slice" if not measured else "none (served from the process's copy)"),
                     f"{read * n / deals:.2f}", f"{write * n / deals:.2f}"])
    writes = sum(c for op, c in totals.items() if op in WRITES)
    reads = sum(c for op, c in totals.items() if op not in WRITES and "units" not in op)
    rows.append(["**total a deal**", _per(sum(calls.values()), deals),
                 f"{writes:.2f} writes, {reads:.2f} reads: " + ", ".join(
                     f"{op} {c:.2f}" for op, c in sorted(totals.items()) if "units" not in op),
                 f"{totals['read units']:.2f}", f"{totals['write units']:.2f}"])
    table(f"DynamoDB a deal at the {result.integrations} × {result.deals} run's shape (its store calls a deal × "
          "the operations and units a call made on moto)",
          ["store method", "calls a deal", "DynamoDB operations a call (moto)", "read units a deal (est.)",
           "write units a deal (est.)"], rows)


def report_moto(result: Result) -> None:
    deals = result.integrations * result.deals
    phases = result.phases
    rows = []
    for name, figures in phases.items():
        d = figures.dynamo
        ops = d.get("operations", Counter())
        writes = sum(n for op, n in ops.items() if op in WRITES)
        per = deals if name in ("webhooks", "worker") else result.integrations
        unit = "deal" if per == deals else "integration"
        rows.append([name, f"{figures.seconds:.2f} s", sum(ops.values()), writes, f"{_per(sum(ops.values()), per)} / {unit}",
                     f"{_per(writes, per)} / {unit}", f"{_per(d.get('read_units', 0), per)} / {unit}",
                     f"{_per(d.get('write_units', 0), per)} / {unit}", json.dumps(dict(sorted(ops.items())))])
    table(f"DynamoDB on moto: {result.integrations} integrations × {result.deals} deals (real calls counted; "
          f"delivered exactly once: {result.delivered_once} / {deals})",
          ["phase", "time", "calls", "writes", "calls", "writes", "read units (est.)", "write units (est.)",
           "operations"], rows)
    methods: dict[str, Counter] = {}
    for name in ("webhooks", "worker"):
        for method, ops in phases[name].dynamo.get("by_method", {}).items():
            methods.setdefault(method, Counter()).update(ops)
    calls = phases["webhooks"].store + phases["worker"].store
    table("Store method → DynamoDB operations (webhook + worker, measured on moto)",
          ["store method", "calls", "DynamoDB operations", "operations a deal"],
          [[method, calls.get(method, "—"), json.dumps(dict(sorted(ops.items()))), _per(sum(ops.values()), deals)]
           for method, ops in sorted(methods.items(), key=lambda kv: -sum(kv[1].values()))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--integrations", type=int, default=1000)
    parser.add_argument("--deals", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=int(os.environ.get("WORKER_BATCH_SIZE", "100")),
                        help="messages a worker batch (app.py: WORKER_BATCH_SIZE, 100)")
    parser.add_argument("--threads", type=int, default=None, help="integrations at once (worker.WORKER_THREADS)")
    parser.add_argument("--integrations-per-token", type=int, default=1)
    parser.add_argument("--moto-slice", type=int, default=100,
                        help="integrations of the DynamoDB-on-moto run (0: none); as many as a batch holds, so "
                             "that each deal is alone in its integration's group, as in the big run")
    parser.add_argument("--moto-deals", type=int, default=2, help="deals an integration in the moto run")
    parser.add_argument("--quick", action="store_true", help="50 × 2 and a moto slice of 4: a smoke run")
    parser.add_argument("--aws-ms", type=float, default=0.0, help="each store call and SQS send takes this long")
    parser.add_argument("--crm-ms", type=float, default=0.0, help="each CRM request takes this long")
    parser.add_argument("--metrika-ms", type=float, default=0.0, help="each Metrika request takes this long")
    args = parser.parse_args()
    if args.quick:
        args.integrations, args.deals, args.moto_slice, args.moto_deals = 50, 2, 4, 2
    from chalicelib.worker import WORKER_THREADS
    threads = args.threads or WORKER_THREADS
    with sandboxes() as boxes:
        latency = Latency(args.aws_ms / 1000, args.crm_ms / 1000, args.metrika_ms / 1000)
        result = run(boxes, args.integrations, args.deals, batch_size=args.batch_size, threads=threads,
                     per_token=args.integrations_per_token, latency=latency)
        if any(vars(latency).values()):
            print(f"\nModelled latency: AWS calls {args.aws_ms:g} ms, CRM requests {args.crm_ms:g} ms, "
                  f"Metrika requests {args.metrika_ms:g} ms (the moto slice runs without)")
        sliced = None
        if args.moto_slice:
            with moto_store() as (store, on_store):
                sliced = run(boxes, args.moto_slice, args.moto_deals, raw_store=store, batch_size=args.batch_size,
                             threads=threads, per_token=args.integrations_per_token, prefix="moto", on_store=on_store)
        report(result, batch_size=args.batch_size, threads=threads, slice_result=sliced)


if __name__ == "__main__":
    main()
