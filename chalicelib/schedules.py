"""The scheduled jobs' walk over every integration (reconciliation, upload confirmation): one integration
at a time, each isolated, inside the invocation's time, resuming where the last run stopped.

Time (`chalicelib.deadline`): an integration is started only while the invocation leaves START_SECONDS
for outbound calls, and every call is clipped to the deadline. An integration cut short (`OutOfTime`, or
the 504 its admin-route form answers) is not done; the run stops there and logs what it left.

Rotation: the integrations are sorted, and each run starts where the previous one stopped (a position
kept per job in a cursor item), so when runs cannot reach every integration the next run starts with
those left, and the alphabetical tail is never starved. An integration cut short comes first in the next
run, unless it already came first in this one: having had a whole run and not finished, it goes behind
the others, so one integration too big for an invocation cannot hold every run (the others get at least
every other run). Integrations added or deleted between runs shift the positions by as many: at worst
one run visits a few twice or later, none waits for ever.
"""
from __future__ import annotations

import traceback
from typing import Any, Callable

from . import deadline
from .errors import ApiError, OutOfTime, Unavailable
from .logs import log_event

# Owner of the jobs' cursor items in the config store. Not an integration id (`chalicelib.ids` allows
# letters, digits, _ and -), so no integration's listing, reads or deletion ever touches them.
SCOPE = "*"
# Seconds of the invocation kept after the last outbound call: the writes that record an integration's
# outcome (a reconciliation's cursor; a confirmation's upload statuses, up to a few hundred writes 8 at
# a time) and the rotation's cursor.
RESERVE_SECONDS = 10
# Seconds of outbound calls an integration needs to be started: reconciliation lists the deals changed
# since the last run (one to a few CRM pages, each answered within seconds) and records them (one write
# each); confirmation waits for a Metrika slot (at most the governor's 30 s) and reads one or two pages
# of `last_uploadings` (seconds each). About 40 s at worst; 60 s leaves room.
START_SECONDS = 60


def rotation(ids: list[str], start: int) -> list[str]:
    """`ids` beginning at position `start` (modulo their number), then wrapping round."""
    if not ids:
        return []
    start %= len(ids)
    return ids[start:] + ids[:start]


def timed_out(exc: BaseException) -> bool:
    """Whether an integration's work stopped because the invocation ran out of time."""
    return isinstance(exc, OutOfTime) or (isinstance(exc, ApiError) and exc.status == 504)


def each_integration(store: Any, job: str, work: Callable[[str], dict], *, failed_event: str,
                     answer_errors: bool = False) -> dict[str, dict]:
    """`work(integration_id)` for every integration, in rotation from where the last run of `job`
    stopped, while the invocation's time allows; the results by integration id.

    Per integration: `Unavailable` (our store or queue) fails the run; the deadline stops it there
    (that integration comes first next time, or last when it was this run's first); an `ApiError` is its result `{"error": …}` when
    `answer_errors`, else logged like anything else it raises (`failed_event`, with the traceback)."""
    ids = store.list_integration_ids()
    start = (store.get_cursor(SCOPE, job) or 0) % len(ids) if ids else 0
    order = rotation(ids, start)
    results: dict[str, dict] = {}
    done = 0
    for integration_id in order:
        if not deadline.has(START_SECONDS):
            break
        try:
            results[integration_id] = work(integration_id)
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 — one broken integration must not stop the others
            if timed_out(exc):
                if done == 0:  # it had the whole run and still did not finish: behind the others next
                    done = 1
                    log_event("schedule_integration_timed_out", job=job, integration_id=integration_id)
                break
            if answer_errors and isinstance(exc, ApiError):
                results[integration_id] = {"error": exc.message}
            else:
                log_event(failed_event, integration_id=integration_id, error=type(exc).__name__,
                          traceback=traceback.format_exc(limit=8))
        done += 1
    left = order[done:]
    if left:
        log_event("schedule_incomplete", job=job, done=done, left=len(left), next=left[0], left_ids=left[:20],
                  seconds_left=round(deadline.remaining() or 0.0, 1))
    if ids and done % len(ids):
        store.put_cursor(SCOPE, job, (start + done) % len(ids))
    return results
