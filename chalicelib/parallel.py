"""Store writes side by side: a history-import step, a customer record per upload and a FAILED upload's
re-send each write hundreds of items, and one by one their latencies add up."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")
# botocore's connection pool holds 10 per client: eight writers never wait for a connection.
WRITERS = 8


def each(write: Callable[[T], Any], items: list[T]) -> list[Any]:
    """`write(item)` for every item, `WRITERS` at a time, results in the items' order. Every write runs
    even when one fails; then the first error is raised (a caller's retry repeats the rest, harmlessly)."""
    if len(items) <= 1:
        return [write(item) for item in items]
    with ThreadPoolExecutor(min(WRITERS, len(items))) as pool:
        futures = [pool.submit(write, item) for item in items]
    return [future.result() for future in futures]
