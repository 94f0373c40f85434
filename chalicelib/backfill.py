"""History import ("backfill"): page through the CRM's contacts, then its deals, changed since a start
date, and upload them in large batches, sharing per-entity delivery state with the live path.

Why (CDP reference §5.1, §13): orders match visits only after the first contact upload and only within
21 days, so an integration's first reports are empty unless existing customers and deals go up early.

How it runs: as a chain of steps on the events queue (`{"kind": "backfill", "run_id"}` messages), each
reading pages until about `row_limit` entities, uploading them, then saving the cursor and counts and
queueing the next step. An interrupted step (crash, timeout, Metrika or CRM failure) is retried from the
last saved cursor; a stop lets the step in flight finish and queues nothing more; starting again resumes.

Sharing state with webhooks (`Store.take_for_backfill`): an entity is taken only when the live path has
no message pending for it and has not sent this content or newer; while taken, webhooks only record
their newer time, and if one did, the entity is queued to the live path after the import's upload, so
the newer state always lands last.
"""
from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

from .crm import CONTACT, ORDER, EntityRows, PermanentSourceError, RetryableSourceError
from .errors import invalid, not_found
from .logs import log_event
from .metrika.cdp import MetrikaError
from .pipeline import (
    BACKFILL,
    EventQueue,
    content_hash_of,
    csv_kinds_for,
    delivery_facts,
    rejected_keys,
    send_rows,
    sync_products,
)

PHASES = ("contacts", "orders")
STEP_ROWS = 1000  # entities read per step, at most (and at most the upload row limit)
STEP_SECONDS = 60  # well inside the worker Lambda's timeout and the queue's visibility timeout
BUDGET_RESERVE = 500  # Metrika requests a day the import leaves to the live path
RETRY_LIMIT = 12
MAX_DELAY = 900
# Each entity costs two conditional writes (take, release); run them side by side, as the step's time
# is otherwise their latencies added up. botocore's connection pool holds 10 per client.
STATE_WRITERS = 8
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
            raise invalid(f"since must be a date (YYYY-MM-DD) or Unix seconds, not {value!r}") from None
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
    def __init__(self, store: Any, queue: EventQueue, metrika_for: Callable[[dict], Any], sources: dict[str, Any],
                 *, row_limit: int = 1000, step_seconds: float = STEP_SECONDS, retry_base: float = 2.0,
                 budget_reserve: int = BUDGET_RESERVE, clock: Callable[[], float] = time.time) -> None:
        self._store, self._queue, self._metrika_for, self._sources = store, queue, metrika_for, sources
        self._row_limit, self._step_seconds, self._retry_base = row_limit, step_seconds, retry_base
        self._reserve, self._clock = budget_reserve, clock

    # --- the admin API --------------------------------------------------------------------------------

    def start(self, integration_id: str, body: Any) -> dict:
        """Start an import from `since`, or resume the stopped or failed one with the same `since`
        (`"restart": true` starts over). A running import is returned as it is."""
        if body is not None and not isinstance(body, dict):
            raise invalid('body must be a JSON object: {"since": "YYYY-MM-DD"}')
        body = body or {}
        integration = self._integration(integration_id)
        current = self._store.get_backfill(integration_id)
        since = parse_since(body.get("since", (current or {}).get("since_ts")), integration["timezone"])
        now = int(self._clock())
        if current and current["state"] == "running" and current["since_ts"] == since and not body.get("restart"):
            return {"backfill": public_job(current), "started": False}
        if current and current["state"] in ("stopped", "failed") and current["since_ts"] == since \
                and not body.get("restart"):
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
        return {"backfill": public_job(self._store.get_backfill(integration_id))}

    def _integration(self, integration_id: str) -> dict:
        integration = self._store.get_integration(integration_id)
        if integration is None:
            raise not_found(f"integration {integration_id!r}")
        if integration["crm"] not in self._sources:
            raise invalid(f"history import from {integration['crm']} is not available in this build")
        return integration

    @staticmethod
    def _message(integration_id: str, job: dict) -> dict:
        return {"integration_id": integration_id, "kind": BACKFILL, "crm_id": job["run_id"]}

    # --- one step (the worker calls this for a backfill message) --------------------------------------

    def step(self, integration_id: str, run_id: str) -> dict:
        job = self._store.get_backfill(integration_id)
        integration = self._store.get_integration(integration_id)
        if not job or not integration or job.get("run_id") != run_id or job["state"] != "running":
            return {"skipped": "not the running import"}
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
        partial = job.get("partial") or {"counts": {}, "settled": [], "contacts": {}}
        used = {"crm": 0, "metrika": metrika.governor.used_today() if metrika.governor else 0}
        try:
            while len(rows) < min(self._row_limit, STEP_ROWS) and self._clock() - started < self._step_seconds:
                page = source.backfill_page(integration, mapping, attributes, phase, job["since_ts"], cursor)
                used["crm"] += page.requests
                rows.update(page.rows)
                times.update(page.event_times)
                if page.total is not None and cursor is None:
                    job["totals"][phase] = page.total
                cursor = page.cursor
                if cursor is None:
                    break
            counts = self._deliver(integration_id, integration, metrika, source, attributes, rows, times, partial)
        except (RetryableSourceError, MetrikaError) as exc:
            job["partial"] = _merged(partial, getattr(exc, "partial", None))
            self._add_requests(job, metrika, used)
            if isinstance(exc, MetrikaError) and not exc.retryable:
                return self._fail(integration_id, job, f"Metrika refused the import: {exc.message}")
            delay = getattr(exc, "retry_after", None) or self._retry_base * 2 ** min(job.get("attempts", 0), 9)
            return self._again(integration_id, job, delay, str(getattr(exc, "message", exc)))
        except PermanentSourceError as exc:
            return self._fail(integration_id, job, f"the CRM refused the import: {exc}")
        for key, value in _merged(partial, {"counts": counts})["counts"].items():
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
            return {"stopped": True, **counts}  # stopped (or restarted) while this step ran: queue nothing
        if job["state"] == "running":
            self._queue.send([self._message(integration_id, job)])
        else:
            log_event("backfill_done", integration_id=integration_id, **job["counts"])
        log_event("backfill_step", integration_id=integration_id, phase=phase, crm_requests=crm_requests,
                  metrika_requests=metrika_requests, **counts)
        return counts

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
                 partial: dict) -> dict:
        """Take, upload and release one step's entities; their counts.

        When an upload fails part way, the step is retried from its cursor, so the retry reads the same
        entities. The exception then carries `partial`: the counts so far, the entities already settled
        (sent, parked, or skipped) and the deals' customers already uploaded, so that the retry neither
        counts nor sends them again."""
        from marshmallow import ValidationError

        from .pipeline import validated_rows
        settled_before = {tuple(key) for key in partial["settled"]}
        rows = {key: entity for key, entity in rows.items() if key not in settled_before}
        counts = {k: 0 for k in COUNTS}
        counts["read"] = len(rows)
        sent_contacts = self._store.content_hashes(integration_id, CONTACT, [
            c["uniq_id"] for key, e in rows.items() if key[0] == ORDER for c in e.contacts])
        sent_contacts.update(partial["contacts"])
        checked: dict[tuple[str, str], tuple] = {}
        for key, entity in rows.items():
            if entity.gone:
                continue
            error, contacts, orders, content_hash = entity.error, [], [], ""
            if error is None:
                try:
                    contacts, orders = validated_rows(integration, attributes, entity)
                    content_hash = content_hash_of(contacts, orders)
                except ValidationError as exc:
                    error = {"message": "row failed validation", "fields": exc.messages}
            checked[key] = (error, contacts, orders, content_hash)
        known = self._store.existing_entities(integration_id, list(checked))
        taken = _each(lambda key: self._store.take_for_backfill(integration_id, *key, times[key], checked[key][3],
                                                                absent=key not in known), list(checked))
        ready: dict[tuple[str, str], tuple] = {}
        products: dict[str, dict] = {}
        failed: dict[tuple[str, str], dict] = {}
        for key, (error, contacts, orders, content_hash) in checked.items():
            if taken[key] is None:
                counts["skipped"] += 1  # the live path has it, or this content was already sent
            elif error is not None:
                failed[key] = error
            else:
                # The customer of a deal usually went up in the contacts phase: send it again only if the
                # deal adds something (a ClientID from the lead, say).
                to_send = [c for c in contacts if key[0] == CONTACT
                           or sent_contacts.get(c["uniq_id"]) != content_hash_of([c], [])]
                last_order = json.dumps(orders[0], sort_keys=True, ensure_ascii=False) if orders else None
                ready[key] = (to_send, orders, content_hash, last_order, contacts)
                products.update(rows[key].products)
        counts["failed"] += len(failed)
        self._release(integration_id, taken, {key: {"error": error} for key, error in failed.items()})
        ordered = {p: products.get(p, {}) for v in ready.values() for o in v[1] for p in o.get("products") or {}}
        if ordered:
            sync_products(self._store, metrika, source, integration_id, integration, ordered)
        csv_kinds = csv_kinds_for(attributes)
        while ready:
            try:
                uploads = send_rows(metrika, integration["counter_id"], ready, self._row_limit, csv_kinds)
            except MetrikaError as exc:
                uploads, sent_contact_ids, sent_order_ids = getattr(exc, "sent", ([], set(), set()))
                done = {k: v for k, v in ready.items() if {c["uniq_id"] for c in v[0]} <= sent_contact_ids
                        and {o["id"] for o in v[1]} <= sent_order_ids}
                self._complete(integration_id, integration, done, uploads, taken, counts)
                ready = {k: v for k, v in ready.items() if k not in done}
                rejected = set() if exc.retryable else rejected_keys(exc, ready)
                if not rejected:
                    contacts = {c["uniq_id"]: content_hash_of([c], []) for v in ready.values()
                                for c in v[0] if c["uniq_id"] in sent_contact_ids}
                    counts["contacts_sent"] += len(contacts)
                    counts["read"] -= len(ready)  # read again by the retry
                    exc.partial = {"counts": counts, "contacts": contacts,
                                   "settled": [list(key) for key in rows if key not in ready]}
                    raise  # retry the step: the entities stay taken and are taken again
                counts["failed"] += len(rejected)
                self._release(integration_id, taken, {key: {"error": exc.describe()} for key in rejected})
                ready = {k: v for k, v in ready.items() if k not in rejected}
                continue
            self._complete(integration_id, integration, ready, uploads, taken, counts)
            break
        return counts

    def _complete(self, integration_id: str, integration: dict, done: dict, uploads: list, held: dict,
                  counts: dict) -> None:
        for kind, uploading_id, count in uploads:
            self._store.record_upload(integration_id, uploading_id, kind=kind, rows=count)
        outcomes = {}
        for key, (to_send, orders, content_hash, last_order, contacts) in done.items():
            facts = delivery_facts(contacts, orders, last_order, integration["timezone"]) if orders else None
            counts["contacts_sent"] += len(to_send)
            counts["orders_sent"] += len(orders)
            counts["older_than_21_days"] += bool(facts and facts.get("late"))
            outcomes[key] = {"content_hash": content_hash, "uploading_id": uploads[-1][1] if uploads else None,
                             "last_order": last_order, "facts": facts}
        self._release(integration_id, held, outcomes)

    def _release(self, integration_id: str, held: dict, outcomes: dict[tuple[str, str], dict]) -> None:
        """End the hold on each entity with its outcome (sent: content hash, upload, facts; or parked:
        error)."""
        def release(key: tuple[str, str]) -> bool:
            outcome = outcomes[key]
            return self._store.release_backfilled(
                held[key], content_hash=outcome.get("content_hash"), uploading_id=outcome.get("uploading_id"),
                last_order=outcome.get("last_order"), facts=outcome.get("facts"), error=outcome.get("error"))
        released = _each(release, list(outcomes))
        # A webhook recorded a newer change while we held these: the live path sends them now, after our
        # upload, so the newest state lands last.
        overtaken = [{"integration_id": integration_id, "kind": key[0], "crm_id": key[1]}
                     for key, ok in released.items() if not ok]
        if overtaken:
            self._queue.send(overtaken)


def _merged(partial: dict, more: dict | None) -> dict:
    """Two attempts' progress at one step added up."""
    more = more or {}
    counts = dict(partial["counts"])
    for key, value in more.get("counts", {}).items():
        counts[key] = counts.get(key, 0) + value
    return {"counts": counts, "settled": partial["settled"] + more.get("settled", []),
            "contacts": {**partial["contacts"], **more.get("contacts", {})}}


def _each(write: Callable[[Any], Any], keys: list) -> dict:
    """`write(key)` for every key, `STATE_WRITERS` at a time; the first error is raised after all ran
    (an entity left taken is taken again by the step's retry)."""
    if len(keys) <= 1:
        return {key: write(key) for key in keys}
    with ThreadPoolExecutor(min(STATE_WRITERS, len(keys))) as pool:
        futures = {key: pool.submit(write, key) for key in keys}
    return {key: future.result() for key, future in futures.items()}
