"""The events queue: SQS in AWS and locally, a list in memory for logic tests.

Messages are `{"integration_id", "kind", "crm_id"}` JSON: an entity to deliver (`kind` order/contact)
or a job for one integration (`kind` backfill, its `crm_id` the run id; `kind` inbox, its `crm_id` a
batch of a large webhook body to expand into entity messages, see `chalicelib.ingest`).
"""
from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from typing import Any, Callable, Protocol

from .errors import Unavailable

BACKFILL = "backfill"  # message kind of a history-import step (its `crm_id` is the run id)
INBOX = "inbox"  # message kind of a large webhook body's batch of refs (its `crm_id` is the batch id)
MAX_SQS_BATCH = 10  # SendMessageBatch takes at most 10 entries
MAX_DELAY_SECONDS = 900  # SQS's own limit for DelaySeconds
_UNAVAILABLE_CODES = frozenset({"ServiceUnavailable", "InternalError", "ThrottlingException", "RequestThrottled",
                                "KmsThrottled", "AWS.SimpleQueueService.ServiceUnavailable"})


class Queue(Protocol):
    def send(self, messages: list[dict], delay_seconds: int = 0) -> None:
        """Queue every message, or raise `Unavailable`. Messages go in batches of ten, so some may have
        been queued before a failure: callers treat all as not queued (and release their leases), which
        costs at most a duplicate message, never a lost one."""


def message(integration_id: str, kind: str, crm_id: str) -> dict:
    return {"integration_id": integration_id, "kind": kind, "crm_id": crm_id}


class EventQueue:
    """SQS adapter; the queue URL is looked up once. Wire errors become `Unavailable` here and only here."""

    def __init__(self, client: Any, queue_name: str) -> None:
        self._sqs = client
        self._name = queue_name
        self._url: str | None = None

    def send(self, messages: list[dict], delay_seconds: int = 0) -> None:
        from botocore.exceptions import BotoCoreError, ClientError
        delay = max(0, min(MAX_DELAY_SECONDS, int(delay_seconds)))
        try:
            if self._url is None:
                self._url = self._sqs.get_queue_url(QueueName=self._name)["QueueUrl"]
            for start in range(0, len(messages), MAX_SQS_BATCH):
                chunk = messages[start:start + MAX_SQS_BATCH]
                result = self._sqs.send_message_batch(QueueUrl=self._url, Entries=[
                    {"Id": str(i), "MessageBody": json.dumps(m, sort_keys=True), "DelaySeconds": delay}
                    for i, m in enumerate(chunk)])
                if result.get("Failed"):
                    raise Unavailable("queue", f"SQS refused {len(result['Failed'])} message(s)")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _UNAVAILABLE_CODES or code.endswith("NonExistentQueue"):
                raise Unavailable("queue", code) from exc
            raise
        except BotoCoreError as exc:  # connection refused, timeouts, DNS
            raise Unavailable("queue", type(exc).__name__) from exc


class MemoryQueue:
    """In-process queue with SQS's delay semantics, on an injectable clock (logic tests)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self.sent: list[tuple[dict, int]] = []  # every (message, delay) ever sent, for assertions
        self.fail_next = 0  # the next N sends raise Unavailable (fault drills)

    def send(self, messages: list[dict], delay_seconds: int = 0) -> None:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise Unavailable("queue", "drill")
            delay = max(0, min(MAX_DELAY_SECONDS, int(delay_seconds)))
            for m in messages:
                heapq.heappush(self._heap, (self._clock() + delay, next(self._seq), json.dumps(m, sort_keys=True)))
                self.sent.append((m, delay))

    def receive(self, limit: int = 100) -> list[str]:
        """Bodies of up to `limit` messages due now, removed from the queue."""
        with self._lock:
            out = []
            while self._heap and self._heap[0][0] <= self._clock() and len(out) < limit:
                out.append(heapq.heappop(self._heap)[2])
            return out

    def __len__(self) -> int:
        return len(self._heap)

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None
