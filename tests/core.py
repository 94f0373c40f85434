"""The delivery core wired in process: the in-memory store and queue, a fake clock, a CRM source that
answers from a dict, and the real Metrika client talking to the Metrika sandbox over loopback HTTP.

Logic tests of ingest, worker, delivery and the history import run on this in a fraction of a second
each; the same code runs against DynamoDB and SQS in the end-to-end tests."""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from chalicelib.backfill import Backfill
from chalicelib.crm import EntityRows
from chalicelib.ingest import Ingest
from chalicelib.metrika.client import MetrikaClient
from chalicelib.metrika.governor import QuotaGovernor
from chalicelib.queue import MemoryQueue
from chalicelib.store.memory import MemoryStore
from chalicelib.worker import Worker

NOW = 1_790_000_000.0  # 2026-09-21, the fake clock's start
METRIKA_TOKEN = "y0_core-test-token"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StoredSignal(MemoryStore):
    """A MemoryStore that sets `stored` once a refreshed token pair is stored (`finish_refresh`): a test
    of two refreshers at once waits on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stored = threading.Event()

    def finish_refresh(self, *args: Any, **kwargs: Any) -> Any:
        ok = super().finish_refresh(*args, **kwargs)
        self.stored.set()
        return ok


def at_once(work: Callable[[], Any], threads: int, *, timeout: float) -> tuple[list, list]:
    """`work` in `threads` threads released together (a barrier), each joined for up to `timeout` s:
    what they returned and what they raised, in the order they finished."""
    barrier, results, errors = threading.Barrier(threads), [], []

    def run() -> None:
        barrier.wait()
        try:
            results.append(work())
        except Exception as exc:  # noqa: BLE001 — the caller asserts on it
            errors.append(exc)
    started = [threading.Thread(target=run) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(timeout)
    return results, errors


class StaticSource:
    """Answers snapshots from `rows` keyed by (kind, crm id); records what it was asked. `fail` may
    raise instead (per integration id), to drill what a broken CRM answer does."""

    def __init__(self, rows: dict | None = None) -> None:
        self.rows: dict = rows or {}
        self.calls: list[list[tuple[str, str]]] = []
        self.fail: Callable[[dict], None] | None = None
        self.changed: list = []

    def snapshot(self, integration, mapping, refs, attributes=()):
        self.calls.append(sorted((r.kind, r.crm_id) for r in refs))
        if self.fail:
            self.fail(integration)
        return {(r.kind, r.crm_id): self.rows[(r.kind, r.crm_id)] for r in refs if (r.kind, r.crm_id) in self.rows}

    def changed_since(self, integration, since):
        return list(self.changed)


def watch_calls(obj: Any, names: Iterable[str], seen: Callable[[str], None]) -> None:
    """Wrap the methods `names` of this object only (not its class): each call tells `seen` its name
    first, then runs the method as it was."""
    for name in names:
        real = getattr(obj, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            seen(_name)
            return _real(*args, **kwargs)

        setattr(obj, name, wrapped)


def count_calls(obj: Any, names: Iterable[str]) -> dict[str, int]:
    """Calls of the object's methods `names`, counted by name as they happen."""
    counted = dict.fromkeys(names, 0)

    def seen(name: str) -> None:
        counted[name] += 1
    watch_calls(obj, list(counted), seen)
    return counted


def deal_rows(deal_id: str, *, status: str = "PAID", revenue: int = 15990, contact: str = "11",
              client_ids: list[str] | None = None, updated: datetime | None = None, **order_fields: Any) -> EntityRows:
    customer = {"uniq_id": contact, "name": "Иван", "phones": ["+7 (916) 123-45-67"]}
    if client_ids is not None:
        customer["client_ids"] = client_ids
    if updated is not None:
        customer["update_date_time"] = updated
    return EntityRows(contacts=[customer], orders=[{
        "id": deal_id, "client_uniq_id": contact, "order_status": status, "revenue": revenue,
        "create_date_time": datetime(2026, 9, 20, 7, 0, tzinfo=timezone.utc), **order_fields}])


class Core:
    def __init__(self, metrika_url: str, *, counter_id: int = 7070, retry_limit: int = 12,
                 sources: dict | None = None, clock: Clock | None = None, threads: int | None = None) -> None:
        self.clock = clock or Clock()
        self.store = MemoryStore(clock=self.clock)
        self.queue = MemoryQueue(clock=self.clock)
        self.source = StaticSource()
        self.sources = sources or {"amocrm": self.source}
        self.metrika_url = metrika_url
        self.counter_id = counter_id
        self.ingest = Ingest(self.store, self.queue, max_body_bytes=256 * 1024, clock=self.clock)
        self.backfill = Backfill(self.store, self.queue, self.metrika_for, self.sources, clock=self.clock)
        # `threads`: integrations of a batch at once (the worker's default unless given; 1 for a test whose
        # fake clock needs the groups one after another).
        self.worker = Worker(self.store, self.queue, self.metrika_for, self.sources, retry_limit=retry_limit,
                             clock=self.clock, backfill_for=lambda: self.backfill,
                             **({"threads": threads} if threads is not None else {}))

    def metrika_for(self, integration: dict) -> MetrikaClient:
        governor = QuotaGovernor(self.store, integration["metrika_token"], clock=self.clock, sleep=self.clock.advance)
        return MetrikaClient(integration["metrika_token"], self.metrika_url, governor=governor, sleep=self.clock.advance)

    def integration(self, integration_id: str = "shop", **overrides: Any) -> str:
        config = {"crm": "amocrm", "counter_id": self.counter_id, "metrika_token": METRIKA_TOKEN,
                  "timezone": "Europe/Moscow", "hash_pii": False, "deleted_deal_status": "CANCELLED",
                  "connection": {"base_url": "https://shop.amocrm.ru", "access_token": "t",
                                 "webhook_secret": "s" * 20}, **overrides}
        self.store.put_integration(integration_id, config)
        return integration_id

    def drain(self, max_rounds: int = 200) -> int:
        """Run the worker until the queue is empty, jumping the clock over retry delays. Returns the
        number of batches handled."""
        batches = 0
        for _ in range(max_rounds):
            bodies = self.queue.receive(100)
            if not bodies:
                due = self.queue.next_due()
                if due is None:
                    return batches
                self.clock.now = max(self.clock.now, due)
                continue
            self.worker.handle(bodies)
            batches += 1
        raise AssertionError("the queue did not drain")
