"""The events queue: SQS in AWS and locally, a list in memory for logic tests.

Messages are `{"integration_id", "kind", "crm_id"}` JSON: an entity to deliver (`kind` order/contact)
or a job for one integration (`kind` backfill, its `crm_id` the run id; `kind` inbox, its `crm_id` a
batch of a large webhook body to expand into entity messages, see `chalicelib.ingest`; `kind` reconcile
or confirm, its `crm_id` the run id of the schedule that queued it, see `chalicelib.schedules`).
"""
from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from . import deadline
from .errors import Unavailable

BACKFILL = "backfill"  # message kind of a history-import step (its `crm_id` is the run id)
INBOX = "inbox"  # message kind of a large webhook body's batch of refs (its `crm_id` is the batch id)
RECONCILE = "reconcile"  # a scheduled reconciliation of one integration (its `crm_id` is the run id)
CONFIRM = "confirm"  # a scheduled confirmation of one integration's uploads (its `crm_id` is the run id)
REFRESH = "refresh"  # a scheduled OAuth token refresh of one idle installed integration (`crm_id`: the run id)
DRAIN = "drain"  # a drain of a Bitrix24 application's offline-event queue (its `crm_id` is when it was queued)
MAX_SQS_BATCH = 10  # SendMessageBatch takes at most 10 entries
MAX_DELAY_SECONDS = 900  # SQS's own limit for DelaySeconds
# Receives of one message before SQS moves it to the dead-letter queue (the events queue's redrive
# policy, `maxReceiveCount` in infra/stage.yaml, which tests/test_infra.py holds equal to this), and the
# receive on which the worker flags a message's entities (`chalicelib.worker`).
MAX_RECEIVE_COUNT = 5
_UNAVAILABLE_CODES = frozenset({"ServiceUnavailable", "InternalError", "ThrottlingException", "RequestThrottled",
                                "KmsThrottled", "AWS.SimpleQueueService.ServiceUnavailable"})


class Queue(Protocol):
    def send(self, messages: list[dict], delay_seconds: int = 0) -> None:
        """Queue every message, or raise `Unavailable`. Messages go in batches of ten, so some may have
        been queued before a failure: callers treat all as not queued (and release their leases), which
        costs at most a duplicate message, never a lost one."""


def message(integration_id: str, kind: str, crm_id: str) -> dict:
    return {"integration_id": integration_id, "kind": kind, "crm_id": crm_id}


@dataclass(frozen=True)
class Received:
    """A message as the worker gets it: its body and how many times SQS has handed it out."""

    body: str
    receive_count: int = 1

    @property
    def last_receive(self) -> bool:
        """Failing now sends it to the dead-letter queue (SQS moves it on the next receive)."""
        return self.receive_count >= MAX_RECEIVE_COUNT


def received(record: dict) -> Received:
    """A Lambda SQS event record (`SQSRecord.to_dict()`) as `Received`. The count is SQS's
    `attributes.ApproximateReceiveCount`, a decimal string (a whole number is taken too); anything else
    (absent, not digits, absurdly long, a bool) counts as a first receive, so a record we cannot read
    never flags anything."""
    attributes = record.get("attributes")
    count = attributes.get("ApproximateReceiveCount") if isinstance(attributes, dict) else None
    if isinstance(count, str) and count.isascii() and count.isdigit() and len(count) <= 9:
        count = int(count)
    body = record.get("body")
    usable = type(count) is int and 1 <= count < 10**9
    return Received(body if isinstance(body, str) else "", count if usable else 1)


class EventQueue:
    """SQS adapter; the queue URL is looked up once. Wire errors become `Unavailable` here and only here."""

    def __init__(self, client: Any, queue_name: str) -> None:
        self._sqs = client
        self._name = queue_name
        self._url: str | None = None

    def send(self, messages: list[dict], delay_seconds: int = 0) -> None:
        delay = max(0, min(MAX_DELAY_SECONDS, int(delay_seconds)))
        with _sqs_errors():
            if self._url is None:
                self._url = self._sqs.get_queue_url(QueueName=self._name)["QueueUrl"]
            for start in range(0, len(messages), MAX_SQS_BATCH):
                chunk = messages[start:start + MAX_SQS_BATCH]
                result = self._sqs.send_message_batch(QueueUrl=self._url, Entries=[
                    {"Id": str(i), "MessageBody": json.dumps(m, sort_keys=True), "DelaySeconds": delay}
                    for i, m in enumerate(chunk)])
                if result.get("Failed"):
                    raise Unavailable("queue", f"SQS refused {len(result['Failed'])} message(s)")


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


# A redrive call's bounds: an admin route must answer inside API Gateway's 29 s, so one call moves at
# most this many messages (10 a round trip of receive, send and delete: ~100 rounds of a few tens of ms)
# and stops starting rounds after REDRIVE_SECONDS; the caller calls again while some remain.
REDRIVE_LIMIT = 1000
REDRIVE_SECONDS = 20.0
# A message received from the dead-letter queue stays hidden this long: enough for its send and delete,
# and short enough that one whose send failed is back in the dead-letter queue within a minute.
REDRIVE_VISIBILITY_SECONDS = 60
# The SQS client of a redrive (`redrive_client`): each call connects within 1 s and reads within 5 s (a
# receive long-polls 1 s; moto_server on a loaded machine was seen to stall past 4 s), one attempt: a
# failed call is the route's 503 and the operator's retry, so no retry's backoff (or a throttled answer's
# x-amz-retry-after) can stretch it. One call thus ends within REDRIVE_CALL_SECONDS, SQS hanging or not
# (botocore's defaults: 60 s to connect, 60 s to read, five attempts; "Retries",
# https://docs.aws.amazon.com/boto3/latest/guide/retries.html), and a round starts only while the
# invocation's deadline leaves that much: a hung SQS is the route's 503, inside API Gateway's 29 s.
REDRIVE_CONNECT_SECONDS = 1.0
REDRIVE_READ_SECONDS = 5.0
REDRIVE_CALL_SECONDS = REDRIVE_CONNECT_SECONDS + REDRIVE_READ_SECONDS


def redrive_client() -> Any:
    """An SQS client for `DeadLetterQueue` whose every call ends within REDRIVE_CALL_SECONDS."""
    import boto3
    from botocore.config import Config
    return boto3.client("sqs", config=Config(connect_timeout=REDRIVE_CONNECT_SECONDS, read_timeout=REDRIVE_READ_SECONDS,
                                             retries={"total_max_attempts": 1}))


class DeadLetterQueue:
    """The events queue's dead-letter queue: how many messages it holds, and moving them back.

    SQS's own redrive (`StartMessageMoveTask`) does the same asynchronously; this adapter does it by
    hand (receive, send to the events queue, delete), so it works on the local emulator too and says
    at once how many moved. Each message is sent before it is deleted: a crash in between leaves a
    copy in both queues, which costs one extra delivery attempt (a claimed entity that is no longer
    dirty is skipped), never a lost message. Wire errors become `Unavailable` here, as in `EventQueue`."""

    def __init__(self, client: Any, dead_letter_queue: str, events_queue: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sqs, self._clock = client, clock
        self._names = (dead_letter_queue, events_queue)
        self._urls: tuple[str, str] | None = None

    def count(self) -> dict:
        """{"messages": waiting in the dead-letter queue, "in_flight": received and not yet deleted}.
        SQS's counts are approximate (they settle within about a minute)."""
        with _sqs_errors():
            attributes = self._sqs.get_queue_attributes(QueueUrl=self._url_of()[0], AttributeNames=[
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return {"messages": int(attributes.get("ApproximateNumberOfMessages", 0)),
                "in_flight": int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))}

    def redrive(self, *, limit: int = REDRIVE_LIMIT, seconds: float = REDRIVE_SECONDS, wait_seconds: int = 1) -> dict:
        """Move up to `limit` messages back to the events queue, starting no round after `seconds`:
        {"moved", "remaining" (messages left, counting those in flight), "failed" (sends SQS refused:
        they reappear in the dead-letter queue after REDRIVE_VISIBILITY_SECONDS)}. It moves at most as
        many as the queue counted when it started, so messages that fail again while it runs wait for
        the next call instead of going round in one. Under an invocation's deadline (`chalicelib.deadline`:
        an API route's) a round starts only while one call of REDRIVE_CALL_SECONDS still fits."""
        end = self._clock() + seconds
        dead, events = self._url_of()
        budget = min(max(0, int(limit)), self.count()["messages"])
        moved = failed = 0
        with _sqs_errors():
            while moved < budget and self._clock() < end and deadline.has(REDRIVE_CALL_SECONDS):
                got = self._sqs.receive_message(
                    QueueUrl=dead, MaxNumberOfMessages=min(MAX_SQS_BATCH, budget - moved),
                    WaitTimeSeconds=wait_seconds, VisibilityTimeout=REDRIVE_VISIBILITY_SECONDS).get("Messages", [])
                if not got:
                    break
                sent = self._sqs.send_message_batch(QueueUrl=events, Entries=[
                    {"Id": str(i), "MessageBody": m["Body"]} for i, m in enumerate(got)])
                done = [got[int(entry["Id"])] for entry in sent.get("Successful", [])]
                if done:
                    self._sqs.delete_message_batch(QueueUrl=dead, Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)])
                moved += len(done)
                if sent.get("Failed"):  # SQS is refusing: stop here, they come back after the visibility
                    failed += len(sent["Failed"])
                    break
        left = self.count()
        return {"moved": moved, "remaining": left["messages"] + left["in_flight"], "failed": failed}

    def _url_of(self) -> tuple[str, str]:
        if self._urls is None:
            with _sqs_errors():
                self._urls = tuple(self._sqs.get_queue_url(QueueName=name)["QueueUrl"] for name in self._names)
        return self._urls


@contextmanager
def _sqs_errors() -> Iterator[None]:
    """SQS wire errors as `Unavailable("queue", …)`, here and only here: the service failing or
    throttling us (its error codes, or any 5xx: one whose body is not SQS's JSON, such as a load
    balancer's page, has botocore's code "500", "502", …), the queue missing (not created for this
    stage), the connection failing (refused, timeouts, DNS). Anything else (a bug, bad input)
    propagates as it is."""
    from botocore.exceptions import BotoCoreError, ClientError
    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _UNAVAILABLE_CODES or code.endswith("NonExistentQueue") or status >= 500:
            raise Unavailable("queue", code or str(status)) from exc
        raise
    except BotoCoreError as exc:
        raise Unavailable("queue", type(exc).__name__) from exc
