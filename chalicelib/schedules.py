"""The scheduled jobs (reconciliation, upload confirmation), fanned out: the schedule only lists the
integrations and queues one job message per integration; the worker runs each integration's job on its
own, isolated like a delivery group and under the worker's deadline rules.

Why: walked in one function, the jobs cost 23-146 ms per integration at loopback speed, so a 10-minute
run reached a few hundred integrations at most and, at real network latency, 1,000 needed minutes. A
fan-out costs the schedule one scan of the config table (0.3 s for 1,000 integrations on moto) and one
SendMessageBatch per ten integrations, and a slow or failing integration delays only itself.

A job message is `{"integration_id", "kind": "reconcile" | "confirm", "crm_id": <run id>}`, the run id
being the schedule's own time in Unix seconds (EventBridge's `time`, which a retried invocation carries
again), so the messages of a run sent twice (a Lambda retry after SQS failed half-way, a redelivery)
are harmless: a job is skipped when its integration was reconciled, or had its uploads checked against
Metrika, after the run was scheduled (the per-integration cursors `reconcile` and `confirm`; the latter
is written only when Metrika was read, so a duplicate of a run with nothing to confirm costs one query),
and the worker runs one of each kind per integration and batch. Under a backlog that also keeps the jobs from
piling up: an integration runs each job at most once per schedule period or per queue delay, whichever
is longer, and reconciliation's window always starts where the last run's listing ended (the newest
change time the CRM listed, in its own clock, less an overlap), so nothing is skipped.

Nothing remains of the walk's rotation cursor (`CURSOR#reconcile_all` / `CURSOR#confirm_uploads` under
scope `*`): every run queues every integration, so no tail can be starved. Items left by earlier
versions are read by nothing.
"""
from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

from .errors import BridgeError
from .logs import log_event
from .queue import CONFIRM, DRAIN, RECONCILE, REFRESH, Queue, message

# The schedules' message kinds, by the Chalice handler that queues them.
JOBS = {"reconcile_all": RECONCILE, "confirm_uploads": CONFIRM,
        # daily: installed (OAuth) integrations refresh a token idle for 30 days (`CrmSource.keep_alive`)
        "refresh_tokens": REFRESH}
# Seconds of outbound calls a job needs to be started in the worker (its `deadline.has`): reconciliation
# lists the deals changed since the last run (one to a few CRM pages, each answered within seconds) and
# records them (one write each); confirmation waits for a Metrika slot (at most the governor's 30 s) and
# reads one or two pages of `last_uploadings` (seconds each). About 40 s at worst; 60 s leaves room.
JOB_SECONDS = 60
# A run id is Unix seconds; anything else (hand-made, absurd) is not compared with the cursors and runs.
_MAX_RUN_ID = 2**40
# The oldest event time a real run can carry: Lambda retries an asynchronous invocation (a schedule's)
# for at most 6 hours ("MaximumEventAgeInSeconds", 60-21600: https://docs.aws.amazon.com/lambda/latest/api/API_FunctionEventInvokeConfig.html),
# plus a margin for clock skew. An older time is a sample event run by hand (the Lambda console's
# scheduled-event template says 1970-01-01T00:00:00Z): compared with the cursors it would skip every
# integration that ever ran the job, so such a run runs as of now.
MAX_EVENT_AGE = 6 * 3600 + 300


def run_id(scheduled: Any, *, now: float) -> str:
    """The run id for a schedule's event time (`CloudWatchEvent.time`, ISO 8601 UTC such as
    "2026-09-21T10:00:00Z": "Amazon EventBridge events", field `time`,
    https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-events-structure.html). An event without
    a readable time, or one older than any retry of a real run (MAX_EVENT_AGE: a sample event run by
    hand), runs as of `now`."""
    if isinstance(scheduled, str) and len(scheduled) <= 40:
        try:
            parsed = datetime.fromisoformat(scheduled.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None:
            seconds = int((parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp())
            if seconds >= now - MAX_EVENT_AGE:
                return str(seconds)
    return str(int(now))


def scheduled_at(run: str) -> int | None:
    """The Unix seconds a run id names, or None when it names none (then the job simply runs)."""
    if isinstance(run, str) and run.isascii() and run.isdigit() and len(run) <= 13 and int(run) < _MAX_RUN_ID:
        return int(run)
    return None


def fan_out(store: Any, queue: Queue, job: str, *, run: str) -> dict:
    """Queue one `JOBS[job]` message per integration (in batches of ten: `Queue.send`). No CRM, no
    Metrika, no per-integration read. `Unavailable` (the scan or SQS failing) fails the invocation, and
    Lambda's retry sends the same run again: the messages already sent become duplicates, which the
    worker skips."""
    started = time.monotonic()
    ids = store.list_integration_ids()
    queue.send([message(integration_id, JOBS[job], run) for integration_id in ids])
    result = {"job": job, "run": run, "queued": len(ids), "seconds": round(time.monotonic() - started, 3)}
    log_event("schedule_fanned_out", **result)
    return result


class Jobs:
    """An integration's scheduled job, as the worker runs it. `run` returns the job's result (or why it
    was skipped) and raises what the job raised: the worker isolates it (`Unavailable` fails the batch;
    anything else is logged and waits for the next run)."""

    def __init__(self, store: Any, queue: Queue, metrika_for: Callable[[dict], Any], sources: dict, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._store, self._queue, self._metrika_for = store, queue, metrika_for
        self._sources, self._clock = sources, clock

    def run(self, kind: str, integration_id: str, run: str) -> dict:
        from .ingest import Ingest  # the worker imports this module; the ingest path only for a job
        if kind not in (RECONCILE, CONFIRM, DRAIN, REFRESH):
            raise ValueError(f"no scheduled job of kind {kind!r}")
        integration = self._store.get_integration(integration_id)
        if integration is None:
            return {"skipped": "integration deleted"}
        from .amocrm_install import unusable
        stopped = unusable(integration, integration_id)
        if stopped and kind != REFRESH:  # disabled, or no Metrika counter yet: nothing to reconcile or confirm
            return {"skipped": stopped}
        if kind == REFRESH:  # no cursor: keep_alive itself refreshes only a token idle long enough
            source = self._sources.get(integration["crm"])
            if not hasattr(source, "keep_alive") or (integration.get("connection") or {}).get("auth") != "oauth":
                return {"skipped": "not an installed (OAuth) integration"}
            if isinstance(integration.get("disabled"), dict):
                return {"skipped": "disabled"}
            return {"refreshed": source.keep_alive(integration)}
        if kind == DRAIN or (kind == RECONCILE and _is_application(integration)):
            # A Bitrix24 application's offline-event queue: drained on a nudge (ONOFFLINEEVENT) and with
            # every reconciliation (its schedule, RECONCILE_MINUTES), before it. Every drain runs (no
            # cursor): an empty queue costs one call.
            from .bitrix24_app import drain
            drained = drain(self._store, self._queue, self._sources.get("bitrix24"), integration_id, integration,
                            clock=self._clock)
            if kind == DRAIN:
                return drained
        scheduled = scheduled_at(run)
        if scheduled is not None:
            last = self._store.get_cursor(integration_id, kind)
            if last is not None and last >= scheduled:  # a run after this one was scheduled covered it
                return {"skipped": f"{kind} ran at {last}, after run {scheduled} was scheduled"}
        ingest = Ingest(self._store, self._queue, max_body_bytes=0, clock=self._clock)
        if kind == RECONCILE:
            source = self._sources.get(integration["crm"])
            if source is None:
                return {"skipped": f"{integration['crm']} is not available in this build"}
            # It writes the `reconcile` cursor (when it ran, our clock: compared above) and keeps its
            # window's start apart, in the CRM's clock (`ingest.RECONCILE_POSITION`).
            return ingest.reconcile(integration_id, source)
        from .operations import confirm_uploads
        started = int(self._clock())  # what the listing covers: runs scheduled later still read it
        result = confirm_uploads(self._store, self._metrika_for(integration), integration_id, integration,
                                 requeue=ingest.requeue)
        if result.get("pages"):  # Metrika was read: a duplicate of this run need not read it again
            self._store.put_cursor(integration_id, CONFIRM, started)
        return result


def _is_application(integration: dict) -> bool:
    return integration.get("crm") == "bitrix24" and (integration.get("connection") or {}).get("auth") == "oauth"


def job_failed(kind: str, integration_id: str, exc: Exception) -> None:
    """Log a job's failure in the form the schedules logged it (`reconcile_failed`, `confirm_failed`):
    the CRM or Metrika refusing or unreachable, or a bug. The job runs again with the next schedule."""
    event = f"{kind}_failed"
    if isinstance(exc, BridgeError):
        log_event(event, integration_id=integration_id, error=type(exc).__name__, message=exc.message[:300])
    else:
        log_event(event, integration_id=integration_id, error=type(exc).__name__,
                  traceback=traceback.format_exc(limit=8))

