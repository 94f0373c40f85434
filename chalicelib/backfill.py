"""History import ("backfill"): page through the CRM's contacts, then its deals, changed since a start
date, and upload them in large batches, sharing per-entity delivery state with the live path.

Why: orders match visits only after the first contact upload and only within 21 days ("Загрузка
данных о клиентах", https://yandex.ru/dev/metrika/ru/data-import/contacts), so an integration's first
reports are empty unless existing customers and deals go up early.

How it runs: as a chain of steps on the events queue (`{"kind": "backfill", "crm_id": "<run id>:<step>"}`
messages; a message for a step already done — SQS redelivering a batch that failed after the step saved
its progress — is dropped, so there is only ever one chain), each
reading pages until about `row_limit` entities, uploading them, then saving the cursor and counts and
queueing the next step. An interrupted step (crash, timeout, Metrika or CRM failure) is retried from the
last saved cursor; a stop lets the step in flight finish and queues nothing more; starting again resumes.

Delivery goes through the same sink as the live path (`delivery.Sink`). Sharing state with webhooks
(`StateStore.take_for_backfill`): an entity is taken only when the live path has
no message pending for it and has not sent this content or newer; while taken, webhooks only record
their newer time, and if one did, the entity is queued to the live path after the import's upload, so
the newer state always lands last.
"""
from __future__ import annotations

import time
import uuid
from datetime import date, datetime, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

from . import deadline
from .crm import EntityRows
from .delivery import Accepted, Parked, Pending, Retry, Sink, content_hash_of, previous_customers, validated_rows
from .errors import BridgeError, OutOfTime, Transient, invalid, not_found
from .ingest import FUTURE_SKEW_SECONDS
from .logs import log_event
from .parallel import each
from .queue import BACKFILL, MAX_DELAY_SECONDS, Queue, message
PHASES = ("contacts", "orders")
STEP_ROWS = 1000  # entities read per step, at most (and at most the upload row limit)
STEP_SECONDS = 60  # reading time per step, at most; inside the worker's 300 s with the upload after it
# Seconds of outbound calls a step keeps after reading, for the upload and the saves: a wait for one of
# the token's 3 Metrika slots (the governor's 30 s at most), the contacts and the orders upload of up to
# 1,000 rows each (answered within seconds: ~10 s each) and ~2,000 conditional writes, 8 at a time
# (take and release: ~3 s) ≈ 55 s, rounded up. Reading stops this long before the invocation's
# deadline (`chalicelib.deadline`) leaves no time for calls, so a step's upload is not cut short.
UPLOAD_SECONDS = 60
# A step is started only with time to read something (a page or two: an amoCRM page of 250, or a
# Bitrix24 batch of 50 deals, is answered within a couple of seconds) and upload it.
START_SECONDS = 10 + UPLOAD_SECONDS
BUDGET_RESERVE = 500  # Metrika requests a day the import leaves to the live path
RETRY_LIMIT = 12
MAX_DELAY = MAX_DELAY_SECONDS
# How long the import holds an entity it took: longer than a step's retry can wait (MAX_DELAY) plus the
# step itself, so a held entity is still held when the retry comes. A crashed import's entities go
# back to the live path when it runs out.
HOLD_SECONDS = MAX_DELAY + STEP_SECONDS + 600
# A running import saves its job at every step and every retry. Longer than the longest quiet spell a
# live import has — a retry's delay (MAX_DELAY), then its message redelivered after a crashed worker
# (the queue's 1800 s visibility), then the step (the worker's 300 s) — with room: a "running" job
# quiet for longer has no message left (dead-lettered, or lost), and starting it again resumes it.
STALLED_SECONDS = 3600
COUNTS = ("read", "contacts_sent", "orders_sent", "skipped", "failed", "older_than_21_days")


def parse_since(value: Any, time_zone: str, now: datetime | None = None) -> int:
    """`since` as `YYYY-MM-DD` (midnight in the counter's time zone) or Unix seconds; not in the future."""
    now = now or datetime.now(timezone.utc)
    if isinstance(value, bool) or value is None:
        raise invalid("since is required: a date (YYYY-MM-DD) or Unix seconds")
    if isinstance(value, int):
        since = value
    else:
        try:
            day = date.fromisoformat(str(value))
        except ValueError:
            raise invalid(f"since must be a date (YYYY-MM-DD) or Unix seconds, not {str(value)[:40]!r}") from None
        since = int(datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(time_zone)).timestamp())
    if since > now.timestamp():
        raise invalid("since is in the future")
    if since < 0:
        raise invalid("since must not be before 1970")
    return since


def public_job(job: dict | None) -> dict | None:
    """The job as the API shows it (no internals such as the run id)."""
    if job is None:
        return None
    return {k: v for k, v in job.items() if k not in ("run_id", "attempts", "partial")}


class Backfill:
    def __init__(self, store: Any, queue: Queue, metrika_for: Callable[[dict], Any], sources: dict[str, Any],
                 *, row_limit: int = 1000, step_seconds: float = STEP_SECONDS, retry_base: float = 2.0,
                 budget_reserve: int = BUDGET_RESERVE, clock: Callable[[], float] = time.time) -> None:
        self._store, self._queue, self._metrika_for, self._sources = store, queue, metrika_for, sources
        self._row_limit, self._step_seconds, self._retry_base = row_limit, step_seconds, retry_base
        self._reserve, self._clock = budget_reserve, clock

    # --- the admin API --------------------------------------------------------------------------------

    def start(self, integration_id: str, body: Any) -> dict:
        """Start an import from `since`, or resume the stopped or failed one with the same `since`
        (`"restart": true` starts over). A running import is returned as it is, unless it has not moved
        for STALLED_SECONDS (its step message went to the dead-letter queue): then it is resumed, under
        a new run id, so a later redrive of the old message does nothing."""
        if body is not None and not isinstance(body, dict):
            raise invalid('body must be a JSON object: {"since": "YYYY-MM-DD"}')
        body = body or {}
        unknown = sorted(set(body) - {"since", "restart"})
        if unknown:
            raise invalid(f"unknown field(s): {', '.join(k[:40] for k in unknown[:5])}", {"fields": [k[:40] for k in unknown[:5]]})
        if not isinstance(body.get("restart", False), bool):
            raise invalid("restart must be true or false", {"restart": str(body["restart"])[:40]})
        integration = self._integration(integration_id)
        current = self._store.get_backfill(integration_id)
        since = parse_since(body.get("since", (current or {}).get("since_ts")), integration["timezone"])
        now = int(self._clock())
        stalled = bool(current) and now - int(current.get("updated_at") or 0) >= STALLED_SECONDS
        if current and current["state"] == "running" and current["since_ts"] == since and not body.get("restart") \
                and not stalled:
            return {"backfill": public_job(current), "started": False}
        if current and (current["state"] in ("stopped", "failed") or current["state"] == "running" and stalled) \
                and current["since_ts"] == since and not body.get("restart"):
            job = {**current, "state": "running", "error": None, "attempts": 0, "resumed_at": now}
        else:
            job = {"since_ts": since, "since": datetime.fromtimestamp(since, timezone.utc).isoformat(),
                   "state": "running", "phase": PHASES[0], "cursor": None, "started_at": now, "finished_at": None,
                   "counts": {k: 0 for k in COUNTS}, "totals": {}, "crm_requests": 0, "metrika_requests": 0,
                   "steps": 0, "attempts": 0, "error": None}
        job.update(run_id=uuid.uuid4().hex, updated_at=now)  # a new run: any older step message is void
        self._store.put_backfill(integration_id, job)
        self._queue.send([self._message(integration_id, job)])
        log_event("backfill_started", integration_id=integration_id, since=since, phase=job["phase"])
        return {"backfill": public_job(job), "started": True}

    def stop(self, integration_id: str) -> dict:
        self._integration(integration_id)
        job = self._store.get_backfill(integration_id)
        if job is None:
            raise not_found(f"history import for integration {integration_id!r}")
        if job["state"] == "running":
            job.update(state="stopped", updated_at=int(self._clock()))
            self._store.put_backfill(integration_id, job)
            log_event("backfill_stopped", integration_id=integration_id, phase=job["phase"])
        return {"backfill": public_job(job)}

    def status(self, integration_id: str) -> dict:
        self._integration(integration_id)
        job = public_job(self._store.get_backfill(integration_id))
        if job and job["state"] == "running" and int(self._clock()) - int(job.get("updated_at") or 0) >= STALLED_SECONDS:
            job["stalled"] = ("no step for over an hour (its message went to the dead-letter queue?): "
                              "POST …/backfill again resumes it")
        return {"backfill": job}

    def _integration(self, integration_id: str) -> dict:
        integration = self._store.get_integration(integration_id)
        if integration is None:
            raise not_found(f"integration {integration_id!r}")
        if integration["crm"] not in self._sources:
            raise invalid(f"history import from {integration['crm']} is not available in this build")
        return integration

    @staticmethod
    def _message(integration_id: str, job: dict) -> dict:
        return message(integration_id, BACKFILL, f"{job['run_id']}:{job['steps']}")

    @staticmethod
    def _is_next(job: dict | None, step_id: str) -> bool:
        """Whether `step_id` (a message's `<run id>:<step>`) is the running import's next step. A bare
        run id (queued before step numbers existed) is taken for the next step."""
        run_id, _, number = step_id.partition(":")
        return bool(job) and job.get("run_id") == run_id and job["state"] == "running" \
            and (not number or (number.isdigit() and int(number) == job.get("steps", 0)))

    # --- one step (the worker calls this for a backfill message) --------------------------------------

    def step(self, integration_id: str, step_id: str) -> dict:
        job = self._store.get_backfill(integration_id)
        integration = self._store.get_integration(integration_id)
        if not integration or not self._is_next(job, step_id):
            return {"skipped": "not the running import's next step"}
        run_id = job["run_id"]
        metrika = self._metrika_for(integration)
        remaining = metrika.remaining_budget()
        if remaining is not None and remaining < self._reserve:
            # Leave today's rest to the live path; try again later (the quota resets at 00:00 UTC).
            return self._again(integration_id, job, MAX_DELAY, f"waiting for Metrika quota: {remaining} requests "
                               f"left today, {self._reserve} kept for live deliveries", count_attempt=False)
        source = self._sources[integration["crm"]]
        mapping = (self._store.get_status_mapping(integration_id) or {}).get("entries", [])
        attributes = self._store.get_attribute_mapping(integration_id)
        started = self._clock()
        rows: dict[tuple[str, str], EntityRows] = {}
        times: dict[tuple[str, str], int] = {}
        cursor, phase = job["cursor"], job["phase"]
        # What an earlier, failed attempt at this step already settled (see `_deliver`).
        partial = job.get("partial") or {"counts": {}, "settled": [], "accepted": {}}
        used = {"crm": 0, "metrika": metrika.governor.used_today() if metrika.governor else 0}
        # Reading stops in time for the upload and the saves after it (UPLOAD_SECONDS before the
        # invocation leaves no time for calls); a page read cut short ends the reading, not the step.
        calls_left = deadline.usable()
        read_seconds = self._step_seconds if calls_left is None else min(self._step_seconds, calls_left - UPLOAD_SECONDS)
        if read_seconds <= 0:
            return self._again(integration_id, job, 1, "too little of the worker's time was left to start this "
                               "step", count_attempt=False)
        try:
            with deadline.narrowed(read_seconds):
                while len(rows) < min(self._row_limit, STEP_ROWS) and self._clock() - started < read_seconds:
                    page = source.backfill_page(integration, mapping, attributes, phase, job["since_ts"], cursor)
                    used["crm"] += page.requests
                    rows.update(page.rows)
                    times.update(page.event_times)
                    if page.total is not None and cursor is None:
                        job["totals"][phase] = page.total
                    cursor = page.cursor
                    if cursor is None:
                        break
        except OutOfTime as exc:
            if not rows:  # nothing read: the step waits for an invocation with time, no attempt counted
                self._add_requests(job, metrika, used)
                return self._again(integration_id, job, exc.retry_after or 1, exc.message, count_attempt=False)
            # else: upload what was read; the cursor is the last page read whole
        except Transient as exc:
            self._add_requests(job, metrika, used)
            return self._again(integration_id, job, exc.retry_after or self._backoff(job), exc.message,
                               count_attempt=exc.counts_attempt)
        except BridgeError as exc:
            return self._fail(integration_id, job, f"the CRM refused the import: {exc.message}")
        counts, retry, refused = self._deliver(integration_id, integration, metrika, source, attributes, rows, times,
                                               partial)
        if refused is not None:
            job["partial"] = counts  # a resumed run knows what this attempt settled
            self._add_requests(job, metrika, used)
            return self._fail(integration_id, job, f"Metrika refused the import: {refused.get('message')}")
        if retry is not None:
            job["partial"] = counts
            self._add_requests(job, metrika, used)
            return self._again(integration_id, job, retry.after or self._backoff(job), str(retry.error.get("message")),
                               count_attempt=retry.count_attempt)
        for key, value in counts["counts"].items():
            job["counts"][key] = job["counts"].get(key, 0) + value
        crm_requests, metrika_requests = self._add_requests(job, metrika, used)
        job["steps"] += 1
        job.update(cursor=cursor, attempts=0, error=None, partial=None, updated_at=int(self._clock()))
        if cursor is None:
            next_phase = PHASES.index(phase) + 1
            if next_phase < len(PHASES):
                job["phase"] = PHASES[next_phase]
            else:
                job.update(phase="done", state="done", finished_at=int(self._clock()))
        if not self._store.put_backfill(integration_id, job, expect_run=run_id):
            return {"stopped": True, **counts["counts"]}  # stopped (or restarted) while this step ran: queue nothing
        if job["state"] == "running":
            self._queue.send([self._message(integration_id, job)])
        else:
            log_event("backfill_done", integration_id=integration_id, **job["counts"])
        log_event("backfill_step", integration_id=integration_id, phase=phase, crm_requests=crm_requests,
                  metrika_requests=metrika_requests, **counts["counts"])
        return counts["counts"]

    def crashed(self, integration_id: str, step_id: str, reason: str) -> dict:
        """A step raised something unexpected: retry it with backoff, counting an attempt, so a bug
        fails the import visibly after the retry limit instead of failing the worker's batch."""
        job = self._store.get_backfill(integration_id)
        if not self._is_next(job, step_id):
            return {"skipped": "not the running import's next step"}
        return self._again(integration_id, job, self._backoff(job), f"unexpected error: {reason}")

    def _backoff(self, job: dict) -> float:
        return self._retry_base * 2 ** min(job.get("attempts", 0), 9)

    @staticmethod
    def _add_requests(job: dict, metrika: Any, used: dict) -> tuple[int, int]:
        metrika_requests = (metrika.governor.used_today() - used["metrika"]) if metrika.governor else 0
        job["crm_requests"] += used["crm"]
        job["metrika_requests"] += metrika_requests
        return used["crm"], metrika_requests

    def _again(self, integration_id: str, job: dict, delay: float, reason: str, count_attempt: bool = True) -> dict:
        attempts = job.get("attempts", 0) + (1 if count_attempt else 0)
        if attempts > RETRY_LIMIT:
            return self._fail(integration_id, job, f"gave up after {attempts - 1} retries: {reason}")
        job.update(attempts=attempts, error=reason, updated_at=int(self._clock()))
        if self._store.put_backfill(integration_id, job, expect_run=job["run_id"]):
            self._queue.send([self._message(integration_id, job)], delay_seconds=int(min(MAX_DELAY, max(1, delay))))
        log_event("backfill_retry", integration_id=integration_id, attempts=attempts, reason=reason[:300])
        return {"retry_in": delay}

    def _fail(self, integration_id: str, job: dict, reason: str) -> dict:
        job.update(state="failed", error=reason, updated_at=int(self._clock()))
        self._store.put_backfill(integration_id, job, expect_run=job["run_id"])
        log_event("backfill_failed", integration_id=integration_id, reason=reason[:300])
        return {"failed": reason}

    # --- delivery of one step's entities ---------------------------------------------------------------

    def _deliver(self, integration_id: str, integration: dict, metrika: Any, source: Any, attributes: list[dict],
                 rows: dict[tuple[str, str], EntityRows], times: dict[tuple[str, str], int],
                 partial: dict) -> tuple[dict, Retry | None, dict | None]:
        """Take, deliver (through the sink) and release one step's entities.

        Returns (progress, retry, refusal): `progress` is `partial` with this attempt added — counts,
        the entities settled (sent, parked or skipped) and, per entity still taken, the rows Metrika
        already accepted — so that a retry of the step (it re-reads the same entities from its
        cursor) neither counts nor sends them again. `retry` is set when some rows must wait;
        `refusal` when Metrika refuses the integration itself (token, counter): the import fails and
        its entities stay taken until a run resumes it or their lease runs out."""
        from marshmallow import ValidationError
        now = self._clock()
        # A step that failed before row hashes existed saved no `accepted`; its rows simply go again.
        partial = {"counts": {}, "settled": [], **partial, "accepted": partial.get("accepted") or {}}
        settled_before = {tuple(key) for key in partial["settled"]}
        rows = {key: entity for key, entity in rows.items() if key not in settled_before}
        counts = {k: 0 for k in COUNTS}
        counts["read"] = len(rows)
        checked: dict[tuple[str, str], tuple] = {}
        for key, entity in rows.items():
            if entity.gone:
                continue
            error, validated, content_hash = entity.error, None, ""
            if error is None:
                try:
                    validated = validated_rows(integration, attributes, entity)
                    content_hash = content_hash_of(*validated)
                except ValidationError as exc:
                    error = {"kind": "permanent", "message": "row failed validation", "fields": exc.messages}
            checked[key] = (error, validated, content_hash)
        known = self._store.existing_entities(integration_id, list(checked))
        # Each entity costs two conditional writes (take, release): side by side (`parallel.each`).
        # A time the CRM puts far in the future must not advance the entity's clock (see
        # ingest.FUTURE_SKEW_SECONDS): taken as 0, so every real change after it still counts.
        taken = dict(zip(checked, each(lambda key: self._store.take_for_backfill(
            integration_id, *key, times[key] if times[key] <= now + FUTURE_SKEW_SECONDS else 0, checked[key][2],
            absent=key not in known, now=now, lease_seconds=HOLD_SECONDS), list(checked))))
        pending = []
        for key, (error, validated, content_hash) in checked.items():
            if taken[key] is None:
                counts["skipped"] += 1  # the live path has it, or this content was already sent
                continue
            # The customer of a deal usually went up in the contacts phase: the sink sends it again only
            # if the deal adds something (a ClientID from the lead, say), by the customer's record.
            sent = dict(partial["accepted"].get(_key_text(key), {}))
            entity = EntityRows(error=error) if error else rows[key]
            pending.append(Pending(key, entity, sent=sent, validated=validated,
                                   customers_before=previous_customers(taken[key].state)))
        delivery = Sink(self._store, metrika, row_limit=self._row_limit,
                        name_products=getattr(source, "product_names", None)).deliver(
            integration_id, integration, pending, attributes=attributes)
        releases: dict[tuple[str, str], dict] = {}
        retry: Retry | None = None
        refusal: dict | None = None
        accepted = dict(partial["accepted"])
        for key, outcome in delivery.outcomes.items():
            if isinstance(outcome, Accepted):
                counts["contacts_sent"] += outcome.contacts_sent
                counts["orders_sent"] += outcome.orders_sent
                counts["older_than_21_days"] += bool(outcome.facts and outcome.facts.get("late"))
                releases[key] = {"content_hash": outcome.content_hash, "row_hashes": outcome.row_hashes,
                                 "uploading_id": outcome.uploading_id, "last_order": outcome.last_order,
                                 "facts": outcome.facts}
                accepted.pop(_key_text(key), None)
            elif isinstance(outcome, Parked) and outcome.error.get("kind") == "misconfigured":
                refusal = outcome.error
            elif isinstance(outcome, Parked):
                counts["failed"] += 1
                releases[key] = {"error": outcome.error}
                accepted.pop(_key_text(key), None)
            else:
                counts["contacts_sent"] += outcome.contacts_sent
                counts["orders_sent"] += outcome.orders_sent
                accepted[_key_text(key)] = outcome.row_hashes
                retry = retry or outcome
        self._release(integration_id, {key: taken[key] for key in releases}, releases)
        waiting = {key for key, o in delivery.outcomes.items()
                   if isinstance(o, Retry) or (isinstance(o, Parked) and o.error.get("kind") == "misconfigured")}
        counts["read"] -= len(waiting)  # read again by the retry
        progress = {"counts": _added(partial["counts"], counts), "accepted": accepted,
                    "settled": partial["settled"] + [list(key) for key in rows if key not in waiting]}
        return progress, retry, refusal

    def _release(self, integration_id: str, held: dict, outcomes: dict[tuple[str, str], dict]) -> None:
        """End the hold on each entity with its outcome (sent: content hash, upload, facts; or parked:
        error)."""
        def release(key: tuple[str, str]) -> bool:
            outcome = outcomes[key]
            return self._store.release_backfilled(
                held[key], content_hash=outcome.get("content_hash"), row_hashes=outcome.get("row_hashes"),
                uploading_id=outcome.get("uploading_id"), last_order=outcome.get("last_order"),
                facts=outcome.get("facts"), error=outcome.get("error"))
        released = dict(zip(outcomes, each(release, list(outcomes))))
        # A webhook recorded a newer change while we held these: the live path sends them now, after our
        # upload, so the newest state lands last.
        overtaken = [message(integration_id, *key) for key, ok in released.items() if not ok]
        if overtaken:
            self._queue.send(overtaken)


def _key_text(key: tuple[str, str]) -> str:
    return f"{key[0]}:{key[1]}"


def _added(before: dict, more: dict) -> dict:
    """Two attempts' counts at one step added up."""
    counts = dict(before)
    for key, value in more.items():
        counts[key] = counts.get(key, 0) + value
    return counts
