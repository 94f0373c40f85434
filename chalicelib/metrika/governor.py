"""Per-token quota governor: at most 3 Metrika requests in flight and a daily request budget, shared by
every Lambda through DynamoDB (Metrika quotas: 3 parallel requests and 5,000 a day per user, reset at
00:00 GMT — https://yandex.ru/dev/metrika/ru/intro/quotas "Квотирование").

Both refusals are the taxonomy's `Transient` (source "metrika"), as Metrika's own 429s would be: no
free slot within `max_wait` (`Busy`: retry in a few seconds; our own requests held the slots, so not a
failed attempt), and today's budget spent (`daily_quota`, retry at 00:00 UTC; waiting for it is not a
failed attempt either).

The leases are what holds the limit: the worker runs many invocations (app.py's WORKER_CONCURRENCY), each
several integrations at once, and the admin routes call Metrika too. Within one process a token's
requests first pass a local gate of as many places as the token has slots, so threads of one invocation
wait on it for free instead of polling the lease items (a failed conditional write is billed like a
write). The leases cover every stage on one token: the store keeps the
leases and day counts by token hash in one table all stages share (`store/dynamodb.py`). Each stage
applies its own `daily_budget` to the shared count, so a dev stage with a lower budget stops while prod,
on the same token, still has the rest of the day's 5,000.

Every counted request (and a refusal for the spent budget, as 100 %) emits the `MetrikaBudgetUsedPercent`
metric for the stage (`chalicelib/metrics.py`), which the budget alarm watches.
"""
from __future__ import annotations

import hashlib
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from .. import deadline, metrics
from ..errors import Busy, OutOfTime, Transient
from .cdp import SOURCE, seconds_until_quota_reset


def quota_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


_GATES: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_GATES_LOCK = threading.Lock()


def local_gate(key: str, parallel: int) -> threading.BoundedSemaphore:
    """This process's gate for a token (by quota key): `parallel` places, shared by every governor."""
    with _GATES_LOCK:
        return _GATES.setdefault((key, parallel), threading.BoundedSemaphore(parallel))


class QuotaGovernor:
    def __init__(self, store: Any, token: str, *, daily_budget: int = 5000, parallel: int = 3,
                 lease_seconds: float = 90.0, max_wait: float = 30.0, stage: str = "",
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 emit: Callable[[str], None] = metrics.write_line) -> None:
        self._store, self._key = store, quota_key(token)
        self.daily_budget, self._parallel = daily_budget, parallel
        self._lease_seconds, self._max_wait = lease_seconds, max_wait
        self._clock, self._sleep = clock, sleep
        self._stage, self._emit = stage, emit

    def _day(self) -> str:
        return datetime.fromtimestamp(self._clock(), timezone.utc).strftime("%Y-%m-%d")

    def used_today(self) -> int:
        return self._store.requests_on(self._key, self._day())

    def remaining(self) -> int:
        return max(0, self.daily_budget - self.used_today())

    @contextmanager
    def request(self) -> Iterator[None]:
        """Hold an in-flight slot and spend one request of today's budget for the duration. The wait for
        a slot ends after `max_wait`, or earlier when the invocation's deadline would leave no time for
        the call itself (`OutOfTime`: not a failed attempt)."""
        owner = uuid.uuid4().hex
        left = deadline.usable()
        wait = self._max_wait if left is None else min(self._max_wait, left - deadline.MIN_CALL_SECONDS)
        give_up = self._clock() + wait
        gate = local_gate(self._key, self._parallel)
        if not gate.acquire(timeout=max(wait, 0.0)):  # this process's own requests fill every slot
            raise self._no_slot(wait)
        try:
            slot = self._store.acquire_lease(self._key, self._parallel, owner, self._clock(), self._lease_seconds)
            while slot is None:
                if self._clock() >= give_up:
                    raise self._no_slot(wait)
                self._sleep(0.2)
                slot = self._store.acquire_lease(self._key, self._parallel, owner, self._clock(), self._lease_seconds)
            with self._leased(slot, owner):
                yield
        finally:
            gate.release()

    def _no_slot(self, wait: float) -> Transient:
        if wait < self._max_wait:
            return OutOfTime(f"no Metrika request slot came free in the {max(wait, 0.0):.1f} s this invocation "
                             f"had left ({self._parallel} in flight for this token)", source=SOURCE, retry_after=5)
        # Our own workers' requests fill the slots (up to 80 threads share a token's 3): not an attempt.
        # As no attempt is counted the worker's backoff does not grow, so the retry waits as long as this
        # wait did: a saturated token is not polled by the same entities every few seconds.
        return Busy(f"{self._parallel} Metrika requests already in flight for this token; try later",
                    source=SOURCE, retry_after=max(5.0, self._max_wait))

    @contextmanager
    def _leased(self, slot: int, owner: str) -> Iterator[None]:
        """Count the request against today's budget while holding `slot`; the slot freed after."""
        try:
            used = self._store.count_request(self._key, self._day(), self.daily_budget)
            self._emit(metrics.budget_used_line(stage=self._stage, used=self.daily_budget if used is None else used,
                                                budget=self.daily_budget, quota_key=self._key,
                                                timestamp_ms=int(self._clock() * 1000)))
            if used is None:
                raise Transient(
                    f"today's budget of {self.daily_budget} Metrika requests is spent; waiting for 00:00 UTC",
                    source=SOURCE, daily_quota=True,
                    errors=[{"error_type": "quota_requests_by_uid", "message": "daily budget spent (counted by us)"}],
                    retry_after=seconds_until_quota_reset(datetime.fromtimestamp(self._clock(), timezone.utc)))
            yield
        finally:
            self._store.release_lease(self._key, slot, owner)
