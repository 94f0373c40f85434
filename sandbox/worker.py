"""Local worker loop: polls the emulator's events queue and calls the same handler the Lambda runs.

Messages are deleted only after the handler returns, as Lambda's SQS event source does; a crash leaves
them to reappear after the visibility timeout and, past maxReceiveCount, in the dead-letter queue. Each
record carries SQS's own attributes (`ApproximateReceiveCount` among them, as Lambda passes it), and
moto_server applies the queue's redrive policy itself: on the receive after the fifth, the message
moves to the dead-letter queue, as in AWS.
With `lambda_timeout` (`make run`: the worker's timeout in .chalice/config.json) each batch gets a Lambda
context with that much time, so the handler's deadline (chalicelib/deadline.py) works as deployed;
without it (tests, benches) the handler runs with no deadline.

    python -m sandbox.worker
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import boto3

log = logging.getLogger("sandbox.worker")


def sqs_event(messages: list[dict], queue_arn: str) -> dict:
    """The Lambda SQS event for received messages (same shape AWS sends)."""
    return {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
        "attributes": m.get("Attributes", {}), "messageAttributes": {}, "md5OfBody": m.get("MD5OfBody", ""),
        "eventSource": "aws:sqs", "eventSourceARN": queue_arn, "awsRegion": "local",
    } for m in messages]}


class WorkerLoop:
    def __init__(self, handler: Any, queue_name: str, *, sqs: Any = None, batch_size: int = 100,
                 batching_window: float = 0.0, wait_seconds: int = 1, lambda_timeout: float | None = None,
                 on_failure: Callable[[list[dict]], None] | None = None) -> None:
        """`on_failure(messages)` runs after the handler raised, with the batch's received messages (a
        test makes them visible again at once instead of waiting out the visibility timeout)."""
        self._handler = handler
        self._lambda_timeout = lambda_timeout
        self._on_failure = on_failure
        self._sqs = sqs or boto3.client("sqs")
        self._url = self._sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
        self._arn = self._sqs.get_queue_attributes(QueueUrl=self._url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self._batch_size, self._window, self._wait = batch_size, batching_window, wait_seconds
        self._stop = threading.Event()

    def _receive(self) -> list[dict]:
        """Like Lambda's event source: gather up to `batch_size` messages, waiting at most the batching
        window once the first one arrived (SQS itself hands out at most 10 per call)."""
        messages: list[dict] = []
        deadline = None
        while len(messages) < self._batch_size:
            got = self._sqs.receive_message(QueueUrl=self._url, MaxNumberOfMessages=min(10, self._batch_size - len(messages)),
                                            WaitTimeSeconds=0 if messages else self._wait,
                                            AttributeNames=["All"]).get("Messages", [])
            messages += got
            if messages and deadline is None:
                deadline = time.monotonic() + self._window
            if not messages or (not got and time.monotonic() >= deadline):
                break
            if not got:
                time.sleep(0.05)
        return messages

    def run_once(self) -> int:
        """Receive one batch and hand it to the handler. Returns the number of messages handled."""
        messages = self._receive()
        if not messages:
            return 0
        try:
            self._handler(sqs_event(messages, self._arn), self._context())
        except Exception:
            log.exception("worker handler failed; %d message(s) will be redelivered", len(messages))
            if self._on_failure is not None:
                self._on_failure(messages)
            return 0
        for start in range(0, len(messages), 10):
            self._sqs.delete_message_batch(QueueUrl=self._url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages[start:start + 10])])
        return len(messages)

    def _context(self) -> Any:
        """A Lambda context whose remaining time starts at `lambda_timeout` (None without one)."""
        if self._lambda_timeout is None:
            return None
        from chalice.local import LambdaContext
        return LambdaContext("on_events_message", memory_size=0, max_runtime_ms=int(self._lambda_timeout * 1000))

    def drain(self, idle_rounds: int = 2) -> int:
        """Handle messages until the queue stays empty for `idle_rounds` polls (tests, scripts)."""
        handled, idle = 0, 0
        while idle < idle_rounds:
            count = self.run_once()
            handled += count
            idle = 0 if count else idle + 1
        return handled

    def run_forever(self) -> None:
        while not self._stop.is_set():
            self.run_once()

    def stop(self) -> None:
        self._stop.set()


def configured_worker_timeout(stage: str) -> float:
    """The worker's `lambda_timeout` for `stage` in .chalice/config.json, as `chalice deploy` sets it."""
    from chalice.cli.factory import CLIFactory
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return CLIFactory(root).create_config_obj(chalice_stage_name=stage).scope(stage, "on_events_message").lambda_timeout


def main() -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    sys.path.insert(0, ".")
    from app import on_events_message
    from chalicelib.settings import get_settings
    loop = WorkerLoop(on_events_message, get_settings().events_queue,
                      batch_size=int(os.environ.get("WORKER_BATCH_SIZE", "100")),
                      batching_window=float(os.environ.get("WORKER_BATCHING_WINDOW", "5")),
                      lambda_timeout=configured_worker_timeout(get_settings().stage))
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    print(f"worker polling {get_settings().events_queue}", flush=True)
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
