"""Queue batch → group by integration (isolated) → read (claim if redelivered) → CRM → delivery sink → state.

Chalice's `on_sqs_message` has no partial batch response, so a raised exception fails every message
of the batch — up to 100, of every integration. The worker therefore isolates each integration's
group: whatever a group raises, expected or not, only that group's entities are re-queued with
backoff and an attempt counted, then parked with the error after the retry limit. Only losing the
store or the queue (`errors.Unavailable`) fails the batch, and then SQS redelivers it.

Time: the Lambda's deadline (`chalicelib.deadline`, set by `app.py` from the invocation's remaining time)
clips every outbound call, and a unit of work — an integration group, an inbox batch, a history-import
step — starts only while enough of the invocation is left for it (GROUP_SECONDS, `ingest.INBOX_SECONDS`,
`backfill.START_SECONDS`). What is not started is queued again as it came (the entities' queue leases
still hold) and the batch succeeds, so a slow batch never times out into SQS's redelivery and, after
five receives, the dead-letter queue.

Concurrency: the integrations of a batch run side by side, WORKER_THREADS at a time, each isolated as
above; each task runs in a copy of the caller's context (`contextvars.copy_context`), so the invocation's
deadline holds in every thread, and keeps its own `Report`, summed when all are done. Metrika's "3 requests
in flight per token" is the quota governor's (DynamoDB leases shared by every worker), and each CRM
account's rate is the shared limiter's (`reserve_slot`), so neither depends on how many groups or workers
run at once. The schedules' jobs (`reconcile`, `confirm` messages: `chalicelib.schedules`) run in the same
tasks, one of each kind per integration and batch, isolated the same way.

A batch can still fail as a whole (the store unreachable, the Lambda timing out or running out of
memory), and after MAX_RECEIVE_COUNT receives SQS moves its messages to the dead-letter queue. On that
last receive, before any work, the worker flags each entity the message names (`dead_lettered_at`),
so the status page shows it and `replay {}` brings it back should the attempt fail too; whatever
settles the entity or queues it again clears the flag.
"""
from __future__ import annotations

import contextvars
import json
import random
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from . import deadline
from .backfill import START_SECONDS as STEP_START_SECONDS
from .crm import CONTACT, ORDER, CrmSource, EntityRef, EntityRows, crm_contact_id, is_crm_contact
from .delivery import (BATCH_HARDER_SECONDS, Accepted, Parked, Pending, Sink, copy_unknown, previous_customers,
                       row_hash, row_key)
from .errors import BridgeError, OutOfTime, Transient, Unavailable
from .logs import log_event
from .ingest import QUEUE_LEASE_SECONDS, expand_inbox
from .queue import BACKFILL, CONFIRM, DRAIN, INBOX, MAX_DELAY_SECONDS, RECONCILE, REFRESH, Queue, Received, message
from .schedules import JOB_SECONDS, Jobs, job_failed, scheduled_at

DELETED_DEAL_STATUS = "CANCELLED"
# Seconds of the invocation kept after the last outbound call (`deadline.invocation`'s reserve): the
# writes that settle a cut-short group — up to 100 entities' attempts, ~10 ms each, 2.5 s at a slow
# DynamoDB's 25 ms — and re-queueing the groups not started (100 messages: 10 SendMessageBatch calls),
# with room for the SDK's retries of throttled calls. Far more than they take, far less than the 300 s.
RESERVE_SECONDS = 10
# Seconds of outbound calls an integration group needs to be started: its CRM read (a few requests at
# amoCRM's 7 or Bitrix24's 2 a second, each answered in a second or two: ~10 s), a wait for one of the
# token's 3 Metrika slots (at most the governor's 30 s), a contacts and an orders upload (answered in
# seconds; ~5 s each) and the claim and state writes (~1 s for 100 entities) ≈ 50 s, rounded up. A
# group started with less is cut short (retried without an attempt counted), which wastes its CRM read.
GROUP_SECONDS = 60
# A retry message's lease lasts its delay plus this margin: like a first message's (ingest.QUEUE_LEASE_SECONDS),
# long enough for the message's hidden time after a receive, as no claim marks the receive.
RETRY_LEASE_MARGIN = QUEUE_LEASE_SECONDS
# Marks a state the worker claimed (`_read_states`) rather than read: it closes by the lease, not `seq`.
CLAIMED = "_claimed"
# Integrations of one batch worked on at once. A group spends most of its time waiting on the CRM and
# Metrika, so threads overlap those waits; each group may itself write WRITERS items at a time
# (`chalicelib.parallel`), which the DynamoDB client's connection pool is sized for (`app.get_store`).
# Eight fill a batch's usual spread (100 messages over a few dozen integrations) in a few rounds while
# a Metrika token's 3 slots and a CRM account's rate stay with the governor and the limiter.
WORKER_THREADS = 8
# A scheduled job cut short after starting with at least this many seconds of calls had all an invocation
# gives (300 s less the reserve and what a batch's first groups take): another try would fare no better.
JOB_HAD_ALL = 4 * JOB_SECONDS


@dataclass
class Report:
    """What one batch did (returned by the Lambda handler, logged by the local loop)."""

    uploaded: int = 0
    skipped: int = 0
    parked: int = 0
    retried: int = 0
    superseded: int = 0
    requests: int = 0
    backfill_steps: int = 0
    failed_groups: int = 0
    expanded: int = 0  # entities of large webhook bodies recorded (ingest.expand_inbox)
    postponed: int = 0  # messages queued again, not started: too little of the invocation was left
    dead_lettered: int = 0  # entities flagged on their message's last receive, before it was worked on
    jobs: int = 0  # scheduled jobs (reconcile, confirm) run for an integration
    jobs_skipped: int = 0  # jobs a later run had already done (duplicates), or of a deleted integration
    failed_jobs: int = 0  # jobs that raised (the CRM or Metrika refusing, a bug): the next run tries again

    def add(self, other: "Report") -> None:
        """Count `other` in (each integration's task keeps its own report; the batch sums them)."""
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class Worker:
    def __init__(self, store: Any, queue: Queue, metrika_for: Callable[[dict], Any], sources: dict[str, CrmSource],
                 *, row_limit: int = 1000, retry_limit: int = 12, retry_base: float = 1.0,
                 batch_harder_seconds: int = BATCH_HARDER_SECONDS, clock: Callable[[], float] = time.time,
                 backfill_for: Callable[[], Any] | None = None, threads: int = WORKER_THREADS) -> None:
        self._store, self._queue, self._metrika_for = store, queue, metrika_for
        self._sources, self._row_limit, self._retry_limit = sources, row_limit, retry_limit
        self._retry_base, self._batch_harder_seconds, self._clock = retry_base, batch_harder_seconds, clock
        self._backfill_for, self._threads = backfill_for, max(1, int(threads))
        self._local = threading.local()  # per thread: entities a delivery could not close (`_supersede`)
        self._jobs = Jobs(store, queue, metrika_for, sources, clock=clock)

    def handle(self, messages: Iterable[str | Received]) -> Report:
        """One SQS batch (message bodies, or `Received` with their receive counts): entities on their
        message's last receive flagged first, large webhook bodies expanded into entity messages
        (`ingest.expand_inbox`), each integration's deliveries and scheduled jobs (side by side, up to
        `threads` integrations at once), then history-import steps."""
        report = Report()
        groups: dict[str, dict[tuple[str, str], None]] = {}
        jobs: dict[str, dict[str, str]] = {}  # integration → job kind → run id (the latest of the batch)
        steps: list[dict] = []
        inbox: list[tuple[str, str]] = []
        last: dict[tuple[str, str, str], None] = {}
        redelivered: set[tuple[str, str, str]] = set()  # entities whose message SQS handed out again
        for delivered in messages:
            received = delivered if isinstance(delivered, Received) else Received(delivered)
            try:
                item = json.loads(received.body)
                kind, integration_id, crm_id = item["kind"], str(item["integration_id"]), str(item["crm_id"])
            except (ValueError, KeyError, TypeError):  # not ours: nothing to re-queue, nothing to retry
                log_event("message_dropped", reason="malformed", body=str(received.body)[:200])
                continue
            if received.last_receive:
                log_event("last_receive", integration_id=integration_id, kind=str(kind)[:40], crm_id=crm_id[:80],
                          receive_count=received.receive_count)
            if kind == BACKFILL:
                steps.append(item)
            elif kind == INBOX:
                # The batch stays in the inbox until expanded: the reconciliation sweep queues it again.
                inbox.append((integration_id, crm_id))
            elif kind in (RECONCILE, CONFIRM, DRAIN, REFRESH):
                # A job names no entity: nothing to flag on a last receive; the next run does it anyway.
                runs = jobs.setdefault(integration_id, {})
                runs[kind] = max(runs.get(kind, crm_id), crm_id, key=lambda run: scheduled_at(run) or 0)
            else:
                groups.setdefault(integration_id, {})[(kind, crm_id)] = None
                if received.receive_count > 1:
                    redelivered.add((integration_id, kind, crm_id))
                if received.last_receive:
                    last[(integration_id, kind, crm_id)] = None
        # Entities flagged in this batch: a message of theirs queued again unworked takes its flag along.
        flagged = self._flag_dead_letters(list(last), report) if last else set()
        if inbox:  # large webhook bodies become entity messages (for a later batch)
            expansion = expand_inbox(self._store, self._queue, inbox, clock=self._clock)
            report.expanded += expansion["expanded"]
            report.failed_groups += expansion["failed"]
            report.postponed += expansion["postponed"]
        self._each_integration([(integration_id, list(groups.get(integration_id, ())), jobs.get(integration_id, {}))
                                for integration_id in dict.fromkeys([*groups, *jobs])], report,
                                flagged=flagged, redelivered=redelivered)
        for index, step in enumerate(steps):
            if not deadline.has(STEP_START_SECONDS):
                self._postpone([message(str(s["integration_id"]), BACKFILL, str(s["crm_id"])) for s in steps[index:]],
                               "history-import steps", len(steps) - index, report)
                break
            self._step(step, report)
        return report

    def _each_integration(self, work: list[tuple[str, list[tuple[str, str]], dict[str, str]]], report: Report, *,
                         flagged: set[tuple[str, str, str]] = frozenset(),
                         redelivered: set[tuple[str, str, str]] = frozenset()) -> None:
        """Each integration's task (`_integration`), up to `threads` at once, each in a copy of this
        context (the invocation's deadline). Then their reports are summed and the messages they did
        not start are queued again in one go. `Unavailable` in any task stops tasks from starting and,
        once the running ones are done, fails the batch (SQS redelivers all of it; what was delivered
        is skipped as clean); nothing else leaves a task."""
        if self._threads == 1 or len(work) <= 1:
            outcomes = [self._integration(*unit, flagged=flagged, redelivered=redelivered) for unit in work]
        else:
            stop = threading.Event()

            def task(unit: tuple) -> tuple[Report, list[dict], int] | None:
                if stop.is_set():
                    return None
                try:
                    return self._integration(*unit, flagged=flagged, redelivered=redelivered)
                except BaseException:
                    stop.set()
                    raise
            with ThreadPoolExecutor(min(self._threads, len(work)), thread_name_prefix="integration") as pool:
                futures = [pool.submit(contextvars.copy_context().run, task, unit) for unit in work]
            errors = [future.exception() for future in futures if future.exception() is not None]
            if errors:
                raise next((e for e in errors if isinstance(e, Unavailable)), errors[0])
            outcomes = [future.result() for future in futures]
        later: list[dict] = []
        units = 0
        for own, postponed, postponed_units in filter(None, outcomes):
            report.add(own)
            later += postponed
            units += postponed_units
        if later:
            self._postpone(later, "integration groups and jobs", units, report, flagged=flagged)

    def _integration(self, integration_id: str, keys: list[tuple[str, str]],
                     jobs: dict[str, str], *, flagged: set[tuple[str, str, str]] = frozenset(),
                     redelivered: set[tuple[str, str, str]] = frozenset()) -> tuple[Report, list[dict], int]:
        """One integration's part of the batch, with its own report: its entities' delivery, then its
        scheduled jobs, each started only with its time left (else returned, to be queued again as it
        came). Returns (report, messages not started, units of work not started)."""
        report, later, units = Report(), [], 0
        if keys:
            if deadline.has(GROUP_SECONDS):
                self._isolated(integration_id, keys, report, flagged=flagged,
                               redelivered={(k, c) for i, k, c in redelivered if i == integration_id})
            else:
                later += [message(integration_id, kind, crm_id) for kind, crm_id in keys]
                units += 1
        for kind, run in jobs.items():
            if deadline.has(JOB_SECONDS) and self._job(kind, integration_id, run, report):
                continue
            later.append(message(integration_id, kind, run))
            units += 1
        return report, later, units

    def _job(self, kind: str, integration_id: str, run: str, report: Report) -> bool:
        """A scheduled job, isolated: `Unavailable` fails the batch; a job the deadline cut short
        returns False (queued again as it came: both jobs may run twice) — unless it had most of an
        invocation (JOB_HAD_ALL seconds) and still did not finish: queued again at once it would loop
        from batch to batch for ever (its cursor never moves), so it waits for the next schedule,
        logged (`job_timed_out`); anything else is logged and left to the next run."""
        started_with = deadline.usable()
        try:
            result = self._jobs.run(kind, integration_id, run)
        except Unavailable:
            raise
        except OutOfTime:
            if started_with is None or started_with < JOB_HAD_ALL:
                return False
            report.failed_jobs += 1
            log_event("job_timed_out", kind=kind, integration_id=integration_id, run=run,
                      seconds=round(started_with, 1))
            return True
        except Exception as exc:  # noqa: BLE001 — one integration's job must not fail the batch
            report.failed_jobs += 1
            job_failed(kind, integration_id, exc)
            return True
        if "skipped" in result:
            report.jobs_skipped += 1
        else:
            report.jobs += 1
            if kind == RECONCILE and (result.get("found") or result.get("swept")):
                log_event("reconciled", integration_id=integration_id, run=run, **result)
        return True

    def _postpone(self, messages: list[dict], what: str, units: int, report: Report, *,
                  flagged: set[tuple[str, str, str]] = frozenset()) -> None:
        """Queue again, as they came, messages whose work was not started for lack of time. Their
        entities' queue leases were taken when they were first queued and still hold, so nothing else
        queues them meanwhile; a failure to queue is `Unavailable` and fails the batch (SQS redelivers).
        An entity this batch flagged on its message's last receive (`flagged`) loses the flag once the
        new message is sent: the batch succeeds, so that message never reaches the dead-letter queue."""
        self._queue.send(messages)
        report.postponed += len(messages)
        for m in messages:
            key = (m["integration_id"], m["kind"], m["crm_id"])
            if key in flagged:
                self._store.clear_dead_lettered(*key)
        log_event("work_postponed", what=what, units=units, messages=len(messages),
                  seconds_left=round(deadline.remaining() or 0.0, 1))

    def _flag_dead_letters(self, keys: list[tuple[str, str, str]], report: Report) -> set[tuple[str, str, str]]:
        """Flag each entity of a message on its last receive, before any work on the batch: should the
        Lambda die on it once more (timeout, memory), the flag is already written. One write each, on
        this rare receive only. `Unavailable` fails the batch (SQS moves the message to the dead-letter
        queue unflagged; the entity stays dirty, and once its queue lease has run out the
        reconciliation sweep queues it); anything else one entity raises (a key the store refuses) is
        logged and skips only it. Returns the keys flagged."""
        flagged = set()
        for integration_id, kind, crm_id in keys:
            try:
                flagged_now = self._store.mark_dead_lettered(integration_id, kind, crm_id)
            except Unavailable:
                raise
            except Exception as exc:  # noqa: BLE001 — one odd key must not fail the batch
                log_event("dead_letter_flag_failed", integration_id=integration_id, kind=str(kind)[:40],
                          crm_id=crm_id[:80], error=type(exc).__name__)
                continue
            if flagged_now:
                flagged.add((integration_id, kind, crm_id))
                report.dead_lettered += 1
                log_event("dead_letter_flagged", integration_id=integration_id, kind=kind, crm_id=crm_id)
        return flagged

    # --- one integration's entities -----------------------------------------------------------------

    def _isolated(self, integration_id: str, keys: list[tuple[str, str]], report: Report, *,
                  flagged: set[tuple[str, str, str]] = frozenset(),
                  redelivered: set[tuple[str, str]] = frozenset()) -> None:
        """Deliver one integration's entities; whatever that raises stays here. A group that crashes is
        tried again one entity at a time, so one poison entity (a record the translation chokes on)
        holds up only itself; each entity that still crashes is retried with backoff, then parked."""
        try:
            self._deliver(integration_id, keys, report, redelivered=redelivered)
            return
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 — isolate whatever one integration raises
            report.failed_groups += 1
            log_event("group_failed", integration_id=integration_id, entities=len(keys), error=type(exc).__name__,
                      message=str(exc)[:300], traceback=traceback.format_exc(limit=8))
            if len(keys) == 1:
                self._requeue_after_crash(integration_id, keys, exc, report)
                return
        for index, key in enumerate(keys):
            if not deadline.has(GROUP_SECONDS):  # one by one takes longer: the rest waits for another invocation
                self._postpone([message(integration_id, *k) for k in keys[index:]], "entities of a crashed group",
                               len(keys) - index, report, flagged=flagged)
                return
            self._isolated(integration_id, [key], report, flagged=flagged, redelivered=redelivered)

    def _deliver(self, integration_id: str, keys: list[tuple[str, str]], report: Report, *,
                 redelivered: set[tuple[str, str]] = frozenset()) -> None:
        integration = self._store.get_integration(integration_id)
        if integration is None:
            log_event("delivery_dropped", integration_id=integration_id, reason="integration deleted")
            return
        claimed = self._read_states(integration_id, keys, redelivered)
        if not claimed:
            return
        try:
            self._deliver_read(integration_id, integration, claimed, report)
        finally:
            if self._superseded:
                self._requeue_superseded(integration_id, report)

    def _read_states(self, integration_id: str, keys: list[tuple[str, str]],
                     redelivered: set[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        """The dirty entities of `keys`, as read for delivery. A first receive only reads them (one bulk
        read, no write): each entity's queue lease stays until the delivery closes it (`mark_clean`
        with the `seq` read), so an event meanwhile queues nothing and the delivery queues it again
        when it cannot close (`_requeue_superseded`). The lease (QUEUE_LEASE_SECONDS) outlasts the
        message's hidden time after a receive, so the stuck sweep leaves a message a worker died on to
        SQS. Claimed instead (one write; closed as claimed, by the lease, `CLAIMED`): an entity whose
        message SQS hands out again (`claimed_at`: the sweep leaves it alone for its next hidden time
        too), and a dirty one without `seq`, recorded by the code before it (during a deploy, a webhook
        of that code counts no `seq`, but takes the lease a claim dropped)."""
        states = self._store.delivery_states(integration_id, [k for k in keys if k not in redelivered])
        for key in keys:
            if key in redelivered or (key in states and states[key].get("dirty") and not states[key].get("seq")):
                state = self._store.claim(integration_id, *key)
                if state is None:
                    states.pop(key, None)
                else:
                    states[key] = {**state, CLAIMED: True}
        return {key: states[key] for key in keys if key in states and states[key].get("dirty")}

    def _deliver_read(self, integration_id: str, integration: dict, claimed: dict[tuple[str, str], dict],
                      report: Report) -> None:
        from .amocrm_install import unusable
        stopped = unusable(integration, integration_id)
        if stopped:  # disabled in the CRM, or installed without a Metrika counter yet: a person must act
            for key, state in claimed.items():
                self._park(integration_id, key, state, {"kind": "misconfigured", "message": stopped}, report)
            return
        source = self._sources.get(integration["crm"])
        if source is None:
            error = {"kind": "misconfigured", "message": f"enrichment from {integration['crm']} is not available in this build"}
            for key, state in claimed.items():
                self._park(integration_id, key, state, error, report)
            return
        refs = [EntityRef(kind, crm_id, state["event_time"], state.get("last_action", "update"))
                for (kind, crm_id), state in claimed.items()]
        mapping = (self._store.get_status_mapping(integration_id) or {}).get("entries", [])
        attributes = self._store.get_attribute_mapping(integration_id)
        try:
            rows = source.snapshot(integration, mapping, refs, attributes)
        except Transient as exc:
            self._retry(integration_id, claimed, exc.describe(), report, after=exc.retry_after,
                        count_attempt=exc.counts_attempt)
            return
        except BridgeError as exc:  # the CRM refused (token revoked, no access): a person must act
            for key, state in claimed.items():
                self._park(integration_id, key, state, exc.describe(), report)
            return
        pending = []
        for key, state in claimed.items():
            entity = rows.get(key) or EntityRows(error={"kind": "permanent",
                                                        "message": "the CRM returned nothing for this entity"})
            if entity.gone:
                deleted = deletion_rows(state, integration.get("deleted_deal_status", DELETED_DEAL_STATUS),
                                        datetime.fromtimestamp(self._clock(), timezone.utc))
                # A deleted entity's identifiers leave its customers (the sink drops its source from them).
                entity = deleted or (EntityRows(gone=True) if previous_customers(state) else None)
                if entity is None:  # nothing in Metrika to change
                    report.skipped += 1
                    self._finish(integration_id, key, state, state.get("content_hash") or "", state.get("row_hashes") or {},
                                 state.get("uploading_id"), state.get("last_order"), None, report)
                    continue
            pending.append(Pending(key, entity, sent=sent_hashes(state), content_hash=state.get("content_hash"),
                                   customers_before=previous_customers(state), resend=copy_unknown(state)))
        metrika = self._metrika_for(integration)
        sink = Sink(self._store, metrika, row_limit=self._row_limit, batch_harder=True,
                    batch_harder_seconds=self._batch_harder_seconds,
                    name_products=getattr(source, "product_names", None))
        delivery = sink.deliver(integration_id, integration, pending, attributes=attributes)
        report.requests += len(delivery.uploads)
        if delivery.uploads:
            log_event("upload", integration_id=integration_id, entities=len(pending), requests=len(delivery.uploads),
                      rows=sum(u.rows for u in delivery.uploads))
        retries: dict[tuple, dict] = {}
        customers: dict[str, str] = {}
        for key, outcome in delivery.outcomes.items():
            state = claimed[key]
            if isinstance(outcome, Accepted):
                sent = outcome.contacts_sent + outcome.orders_sent
                report.uploaded += bool(sent)
                report.skipped += not sent
                self._finish(integration_id, key, state, outcome.content_hash, outcome.row_hashes,
                             outcome.uploading_id or state.get("uploading_id"),
                             outcome.last_order or state.get("last_order"), outcome.facts, report)
                if key[0] == ORDER and outcome.customers_sent:
                    customers.update({crm_contact_id(c["uniq_id"]): row_hash(CONTACT, c) for c in outcome.contacts
                                      if is_crm_contact(c["uniq_id"]) and c["uniq_id"] in outcome.customers_sent})
            elif isinstance(outcome, Parked):
                self._park(integration_id, key, state, outcome.error, report)
            else:
                retries.setdefault((outcome.after, outcome.count_attempt, json.dumps(outcome.error, sort_keys=True)),
                                   {})[key] = outcome
        for (after, count_attempt, _), outcomes in retries.items():
            first = next(iter(outcomes.values()))
            self._retry(integration_id, {k: claimed[k] for k in outcomes}, first.error, report, after=after,
                        count_attempt=count_attempt, row_hashes={k: o.row_hashes for k, o in outcomes.items()})
        # The deals' customers whose rows went up now: a history import or an unchanged contact webhook
        # need not send them again. A customer whose row Metrika already held is left as it is (noted
        # when its row went up): the write would repeat what is stored, on every update of the deal.
        if customers:
            self._store.note_contacts_sent(integration_id, customers)

    def _finish(self, integration_id: str, key: tuple[str, str], state: dict, content_hash: str,
                row_hashes: dict, uploading_id: str | None, last_order: str | None, facts: dict | None,
                report: Report) -> None:
        if not self._store.mark_clean(integration_id, *key, event_time=state["event_time"], content_hash=content_hash,
                                      row_hashes=row_hashes, uploading_id=uploading_id, last_order=last_order,
                                      facts=facts, version=closing_version(state)):
            self._supersede(key, state, report)

    def _park(self, integration_id: str, key: tuple[str, str], state: dict, error: dict, report: Report) -> None:
        report.parked += 1
        if not self._store.mark_failed(integration_id, *key, event_time=state["event_time"], error=error,
                                       version=closing_version(state)):
            self._supersede(key, state, report)
        log_event("entity_parked", integration_id=integration_id, kind=key[0], crm_id=key[1],
                  reason=str(error.get("message"))[:300])

    @property
    def _superseded(self) -> dict[tuple[str, str], dict]:
        """Entities this thread's delivery could not close, with the state it read (one integration's
        group runs on one thread)."""
        local = self._local.__dict__
        return local.setdefault("superseded", {})

    def _supersede(self, key: tuple[str, str], state: dict, report: Report) -> None:
        report.superseded += 1  # something was recorded since the read: queued again below
        self._superseded[key] = state

    def _requeue_superseded(self, integration_id: str, report: Report) -> None:
        """Entities recorded meanwhile (an event, a resend, an import's hold) while this delivery held
        their lease: whoever recorded saw the lease and queued nothing, so the delivery queues them
        again, with the lease renewed, unless someone took a new lease since (and so queued a message
        of their own). Should this process die before the send, the renewed lease runs out and the stuck
        sweep queues them, and SQS hands the message being worked on out again anyway."""
        pending, self._local.superseded = self._superseded, {}
        until = self._clock() + QUEUE_LEASE_SECONDS
        again = [key for key, state in pending.items()
                 if self._store.renew_queue_lease(integration_id, *key, seen=state.get("queued_until"), until=until)]
        if again:
            self._queue.send([message(integration_id, *key) for key in again])
            log_event("requeued_superseded", integration_id=integration_id, entities=len(again))

    def _retry(self, integration_id: str, states: dict[tuple[str, str], dict], error: dict, report: Report, *,
               after: float | None = None, count_attempt: bool = True,
               row_hashes: dict[tuple[str, str], dict] | None = None) -> None:
        """Exponential backoff with jitter; past the retry limit the entity is parked, visible. Waiting
        for the quota (or batching harder) is not a failed attempt."""
        again, most_attempts = [], 0
        for key, state in states.items():
            attempts = int(state.get("attempts") or 0) + (1 if count_attempt else 0)
            if attempts > self._retry_limit:
                self._park(integration_id, key, state, {**error, "message": f"gave up after {attempts - 1} "
                                                                            f"retries: {error.get('message')}"}, report)
                continue
            most_attempts = max(most_attempts, attempts)
            again.append((key, state, attempts))
        if not again:
            return
        base = min(MAX_DELAY_SECONDS, self._retry_base * 2 ** min(most_attempts, 10))
        delay = int(min(MAX_DELAY_SECONDS, max(after or 0, random.uniform(base / 2, base))))
        lease_until = self._clock() + delay + RETRY_LEASE_MARGIN
        for key, state, attempts in again:
            self._store.note_attempt(integration_id, *key, attempts=attempts, error=error, lease_until=lease_until,
                                     row_hashes=(row_hashes or {}).get(key))
        self._queue.send([message(integration_id, *key) for key, _, _ in again], delay_seconds=delay)
        report.retried += len(again)

    def _requeue_after_crash(self, integration_id: str, keys: list[tuple[str, str]], exc: Exception,
                             report: Report) -> None:
        """A group raised something unexpected (a bug, a CRM answer nobody foresaw): its entities that
        still wait are retried with backoff and an attempt counted, then parked — never dropped."""
        error = {"kind": "unexpected", "message": f"{type(exc).__name__}: {str(exc)[:300]}"}
        try:
            states = {}
            for kind, crm_id in keys:
                state = self._store.get_entity(integration_id, kind, crm_id)
                if state is not None and state.get("dirty"):
                    states[(kind, crm_id)] = state
            if states:
                self._retry(integration_id, states, error, report)
            if self._superseded:  # parked past the retry limit, but recorded since the read
                self._requeue_superseded(integration_id, report)
        except Unavailable:
            raise
        except Exception:  # noqa: BLE001 — the same fault again: the entities stay dirty, the sweep finds them
            log_event("requeue_failed", integration_id=integration_id, entities=len(keys),
                      traceback=traceback.format_exc(limit=8))

    # --- history-import steps -----------------------------------------------------------------------

    def _step(self, item: dict, report: Report) -> None:
        backfill = self._backfill_for() if self._backfill_for else None
        if backfill is None:
            log_event("message_dropped", reason="no history import in this worker", integration_id=item["integration_id"])
            return
        try:
            backfill.step(str(item["integration_id"]), str(item["crm_id"]))
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 — one import's crash must not fail the batch
            report.failed_groups += 1
            log_event("backfill_step_failed", integration_id=item["integration_id"], error=type(exc).__name__,
                      traceback=traceback.format_exc(limit=8))
            try:
                backfill.crashed(str(item["integration_id"]), str(item["crm_id"]), f"{type(exc).__name__}: {exc}"[:300])
            except Unavailable:
                raise
            except Exception:  # noqa: BLE001 — the job stays as it was; its held entities' leases run out
                log_event("backfill_requeue_failed", integration_id=item["integration_id"],
                          traceback=traceback.format_exc(limit=8))
        report.backfill_steps += 1


def closing_version(state: dict) -> int | None:
    """`mark_clean`'s `version` for a state as the worker took it: the `seq` read (0: none), or None for a
    claimed one (closed if no lease was taken since the claim)."""
    return None if state.get(CLAIMED) else int(state.get("seq") or 0)


def sent_hashes(state: dict) -> dict[str, str]:
    """What Metrika holds of this entity, row by row. Items written before row hashes existed carry
    only the last order sent; an empty map means none (`mark_resend`: an upload of it failed)."""
    if state.get("row_hashes") is not None:
        return dict(state["row_hashes"])
    if state.get("last_order"):
        order = json.loads(state["last_order"])
        return {row_key(ORDER, order): row_hash(ORDER, order)}
    return {}


def deletion_rows(state: dict, deleted_status: str | None, now: datetime) -> EntityRows | None:
    """Metrika has no delete ("Order data format", https://yandex.com/dev/metrika/en/data-import/orders-data):
    a deleted deal is re-sent, as last sent, with the integration's `deleted_deal_status` (CANCELLED by
    default). None when there is nothing to change: never sent, a contact, already in that status, or
    the integration keeps deleted deals as they were. The rows are marked `gone`: they name no customer,
    so the sink drops the deal's identifiers from the customers it had (`Pending.customers_before`)."""
    last = state.get("last_order")
    if state.get("kind") != ORDER or not last or not deleted_status:
        return None
    order = json.loads(last)
    if order.get("order_status") == deleted_status:
        return None
    order.update(order_status=deleted_status, update_date_time=now)
    order.pop("finish_date_time", None)
    return EntityRows(orders=[order], gone=True)


