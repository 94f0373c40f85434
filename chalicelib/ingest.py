"""Webhook → verify → record entity state → queue → answer. Also the other ways entities enter the
queue: reconciliation (with a sweep for lost messages), replay, and deals held for an unmapped stage.

Recording is atomic from the CRM's point of view. Each entity gets a *queue lease* when its state is
recorded (`StateStore.mark_dirty`); whoever takes the lease sends the message. If the process dies
between the two writes, or the queue refuses the message, the lease is released or runs out
(`QUEUE_LEASE_SECONDS`), and the next webhook, the CRM's retry or the reconciliation sweep queues the
entity again. No entity can stay flagged queued with no message on its way.

A webhook naming more than `INLINE_ENTITIES` entities (an amoCRM mass action, a contact with many
linked leads) is recorded whole before the answer — its refs in the store's inbox, one queue message
per batch — and the worker expands each batch exactly as above (`expand_inbox`). The answer then costs
the same for 11 entities or 20,000. A batch stays in the inbox until it has been expanded, so a lost
message costs time, not events: the reconciliation sweep queues a batch left behind again.
"""
from __future__ import annotations

import hmac
import time
import traceback
import uuid
from typing import Any, Callable, Iterable

from . import deadline
from .crm import CrmSource, EntityRef, WebhookError
from .errors import ApiError, BridgeError, Unavailable, http_error, invalid, not_found
from .logs import log_event
from .queue import INBOX, Queue, message
from .store import CLAIM_GRACE_SECONDS

RECONCILE_OVERLAP = 120  # seconds; the window overlaps the last run (changes the CRM dates a little late)
RECONCILE_FIRST_WINDOW = 24 * 3600  # a first run looks back one day
# Reconciliation keeps two cursors. RECONCILE_RAN (`reconcile`): when it last ran, by our clock, which the
# schedules compare with EventBridge's time (`chalicelib.schedules`). RECONCILE_POSITION: where its
# window starts, in the CRM's own clock — the newest change time the CRM listed — so a CRM whose clock
# (or, for Bitrix24, whose time zone) is off from ours by hours still lists every change it makes next.
RECONCILE_RAN = "reconcile"
RECONCILE_POSITION = "reconcile_position"
# How long a queued message is trusted to reach a worker and be worked on. Past it, the entity is queued
# again by the next event or the sweep (a duplicate message costs one CRM read; the content hash stops a
# resend). The worker reads an entity without a write (`StateStore.delivery_states`) and the lease stays
# until the delivery closes it, so the lease is what keeps the sweep off a message a worker died on,
# which SQS hides for the queue's visibility timeout before handing it out again: it lasts as long as the
# claim grace (that visibility + one worker run; tests/test_deploy_config.py holds it to the timeouts).
QUEUE_LEASE_SECONDS = CLAIM_GRACE_SECONDS
# An event time more than this past our clock is not trusted (a time from the year 2100): it must not
# make every real change after it look stale. Clocks a little ahead are normal and kept as they are.
FUTURE_SKEW_SECONDS = 300
# Seconds a warm Lambda answers webhooks from its copy of the integration (one DynamoDB read less per
# webhook); a changed config, or a deleted integration, shows in the other Lambdas after that long.
INTEGRATION_MAX_AGE = 5.0
# The one answer to a webhook whose integration id is unknown, names the other CRM's integration, or
# whose secret is wrong.
FORBIDDEN = "this webhook URL does not accept these credentials"
# A webhook naming at most this many entities is recorded entity by entity before the answer: one
# conditional write each (single-digit ms on DynamoDB) and one SendMessageBatch (which holds ten). A
# larger one is recorded whole: one BatchWriteItem and one SendMessageBatch, however many entities. All
# of them before the answer cannot be made fast: every entity of an integration lives in one DynamoDB
# partition, which takes 1,000 writes a second ("Best practices for designing and using partition keys
# effectively", https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/bp-partition-key-design.html),
# and on the local emulator 250 writes took 2.5 s one by one and 1.6 s from 16 threads.
INLINE_ENTITIES = 10
# Refs per inbox batch: one item (~45 bytes a ref: ~23 KB of DynamoDB's 400 KB), one queue message, and
# one expansion in the worker: 500 conditional writes one after another, ~4 s at DynamoDB's usual
# single-digit ms, and ~150 writes a second, far below the partition's 1,000 (the deliveries the
# expansion queues then write to the same partition).
INBOX_BATCH_REFS = 500
# Batches one worker invocation expands (~8 s): with its deliveries it stays well inside its time. More
# in one SQS batch are queued again for the next invocation.
INBOX_BATCHES_PER_RUN = 2
# Seconds of the invocation a batch's expansion needs to be started (`chalicelib.deadline`): 500
# conditional writes one after another (~4 s; 12.5 s at a slow DynamoDB's 25 ms) and 50 SendMessageBatch
# calls (~1 s). It calls no CRM and no Metrika, so nothing clips it: this margin is its only guard.
INBOX_SECONDS = 20
# A batch still in the inbox this long after it was recorded lost its message (or its expansion keeps
# failing): the reconciliation sweep queues it again.
INBOX_GRACE_SECONDS = 900
WEBHOOK_ORIGINS = ("amocrm", "bitrix24")
# Recorded whole above INLINE_ENTITIES: webhooks (the CRM's deadline) and requeues from admin routes and
# scheduled jobs (their Lambda's). Reconciliation, sweeps and inbox expansion record entity by entity.
DEFERRABLE_ORIGINS = (*WEBHOOK_ORIGINS, "replay")


def secrets_match(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; an unset expected secret never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _accepts(integration: dict, crm: str, secret_matches: Callable[[dict], bool]) -> bool:
    return integration.get("crm") == crm and secret_matches(integration.get("connection") or {})


def _holds_own_secret(integration: dict, raw: bytes, query: dict[str, str]) -> bool:
    """Whether the request carries the secret of the integration's own CRM: amoCRM's `?secret=`, or
    the `auth[application_token]` in a Bitrix24 body. Constant time, as every secret comparison."""
    connection = integration.get("connection") or {}
    if integration.get("crm") == "amocrm":
        return secrets_match(query.get("secret"), connection.get("webhook_secret"))
    if integration.get("crm") == "bitrix24":
        from .crm.form import parse_bracket_form
        try:
            auth = parse_bracket_form(raw).get("auth")
        except WebhookError:
            return False
        token = auth.get("application_token") if isinstance(auth, dict) else None
        return isinstance(token, str) and secrets_match(token, connection.get("application_token"))
    return False


def newest_refs(refs: Iterable[EntityRef]) -> list[EntityRef]:
    """One ref per entity, the newest (a body may carry `update` and `status` for one lead)."""
    newest: dict[tuple[str, str], EntityRef] = {}
    for ref in refs:
        key = (ref.kind, ref.crm_id)
        if key not in newest or ref.event_time >= newest[key].event_time:
            newest[key] = ref
    return list(newest.values())




class Ingest:
    def __init__(self, store: Any, queue: Queue, *, max_body_bytes: int, clock: Callable[[], float] = time.time,
                 lease_seconds: float = QUEUE_LEASE_SECONDS) -> None:
        self._store, self._queue, self._max_body = store, queue, max_body_bytes
        self._clock, self._lease = clock, lease_seconds

    # --- webhooks -----------------------------------------------------------------------------------

    def amocrm(self, integration_id: str, raw: bytes, query: dict[str, str], *, encoding: str | None = None) -> dict:
        """amoCRM signs nothing: the unguessable `?secret=` and the account id are the checks
        ("Webhooks", https://www.amocrm.ru/developers/content/crm_platform/webhooks-format). `encoding`:
        the request's Content-Encoding header."""
        from .crm.amocrm.webhook import parse_amocrm_webhook
        self._check_size(raw, encoding)
        connection = self._authenticated(integration_id, "amocrm", raw, query, lambda c: secrets_match(
            query.get("secret"), c.get("webhook_secret")))
        webhook = self._parse(parse_amocrm_webhook, raw)
        expected_account = connection.get("account_id")
        if expected_account and webhook.account_id != expected_account:
            raise ApiError(403, "forbidden", f"webhook comes from account {webhook.account_id}, "
                                             f"this integration serves account {expected_account}")
        return self.record(integration_id, webhook.refs, origin="amocrm", ignored=webhook.ignored)

    def bitrix24(self, integration_id: str, raw: bytes, query: dict[str, str] | None = None, *,
                 encoding: str | None = None) -> dict:
        """Bitrix24: `auth[application_token]` first (absent: 401, whether the integration exists or not),
        in constant time, then member id and domain when configured ("Event handlers",
        https://apidocs.bitrix24.com/api-reference/events/index.html). `query` is read only to recognise
        an amoCRM webhook sent here by mistake."""
        from .crm.bitrix24.webhook import MissingCredentials, parse_bitrix24_event
        self._check_size(raw, encoding)
        query = query or {}
        try:
            event = parse_bitrix24_event(raw)
        except MissingCredentials as exc:
            if query.get("secret"):
                self._check_route(integration_id, "bitrix24", self._read(integration_id), raw, query)
            raise ApiError(401, "unauthenticated", str(exc)) from exc
        except WebhookError as exc:
            raise invalid(str(exc)) from exc
        connection = self._authenticated(integration_id, "bitrix24", raw, query, lambda c: secrets_match(
            event.application_token, c.get("application_token")))
        for key, value in (("member_id", event.member_id), ("domain", event.domain)):
            if connection.get(key) and value != connection[key]:
                raise ApiError(403, "forbidden", f"auth[{key}] does not match this integration")
        return self.record(integration_id, event.refs, origin="bitrix24", ignored=0 if event.refs else 1)

    def _check_size(self, raw: bytes, encoding: str | None = None) -> None:
        """First, whatever the integration: a body over the limit is never read; nor is a compressed
        one. The limit is on the body's own length, never on a Content-Length header (a chunked body
        has none). API Gateway decompresses a request only where content encoding is enabled on the
        API, which this one leaves off ("Call an API method with a compressed payload in API Gateway",
        https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-make-request-with-compressed-payload.html),
        so a gzip or deflate body would reach us as it was sent: no CRM compresses its webhooks, and
        inflating it here would unbound the limit (a small body can inflate a thousandfold)."""
        if len(raw) > self._max_body:
            raise ApiError(413, "payload_too_large", f"webhook body is {len(raw)} bytes; the limit is {self._max_body}")
        if encoding and encoding.strip().lower() not in ("", "identity"):
            from .crm.form import field_name
            raise ApiError(415, "unsupported_media_type", f"Content-Encoding {field_name(encoding, 40)} is not "
                                                          "accepted: send the webhook body uncompressed")

    def _authenticated(self, integration_id: str, crm: str, raw: bytes, query: dict[str, str],
                       secret_matches: Callable[[dict], bool]) -> dict:
        """The integration's connection when it is a `crm` integration and the webhook's secret matches.
        Otherwise one answer, 403 with one message, whether the id is unknown, names the other CRM's
        integration or the secret is wrong: the answers do not tell an outsider which integrations exist.
        (Only a caller holding the integration's own secret learns that it posted to the wrong route.)

        The config may come from this Lambda's copy of the last seconds; a mismatch is checked again
        against a fresh read, so a rotated secret works at once (the old one may still pass here for
        those seconds). An unknown id is read again too, and the store keeps a miss as it keeps a config:
        a refusal costs the same reads either way, so its time does not tell which ids exist either."""
        integration = self._read(integration_id, max_age=INTEGRATION_MAX_AGE)
        if integration is None or not _accepts(integration, crm, secret_matches):
            integration = self._read(integration_id)
        if integration is not None and _accepts(integration, crm, secret_matches):
            if isinstance(integration.get("disabled"), dict):  # uninstalled in the CRM: said only to a holder of the secret
                raise ApiError(410, "integration_disabled", f"integration {integration_id!r} was disabled in {crm}; "
                                                            "install it again to resume")
            return integration["connection"]
        self._check_route(integration_id, crm, integration, raw, query)
        raise ApiError(403, "forbidden", FORBIDDEN)

    def _read(self, integration_id: str, max_age: float = 0) -> dict | None:
        return self._store.get_integration(integration_id, max_age=max_age)

    @staticmethod
    def _check_route(integration_id: str, route: str, integration: dict | None, raw: bytes,
                     query: dict[str, str]) -> None:
        """A 400 saying where to send it, for a webhook that carries the secret of the integration's own
        CRM but came to the other CRM's route; nothing for anyone else."""
        if integration is None or integration.get("crm") == route or not _holds_own_secret(integration, raw, query):
            return
        raise invalid(f"integration {integration_id!r} is a {integration['crm']} integration: "
                      f"send its webhooks to /webhooks/{integration['crm']}/{integration_id}")

    @staticmethod
    def _parse(parser: Callable[[bytes], Any], raw: bytes) -> Any:
        try:
            return parser(raw)
        except WebhookError as exc:
            raise invalid(str(exc)) from exc

    # --- recording ----------------------------------------------------------------------------------

    def record(self, integration_id: str, refs: list[EntityRef], *, origin: str, ignored: int = 0) -> dict:
        """Record each entity's newest event and queue a message for those whose lease this call took.
        All-or-nothing towards the caller: on any failure the leases taken here are released before
        the error goes up, so the CRM's retry (or the next event) queues them.

        More than INLINE_ENTITIES entities from a webhook or a requeue (DEFERRABLE_ORIGINS) are recorded
        whole instead (`_record_later`), answered with `deferred` (their number) and `queued` 0: the
        worker's expansion records them."""
        now = self._clock()
        accepted, refs = len(refs), newest_refs(refs)
        event = "webhook" if origin in WEBHOOK_ORIGINS else "requeue"
        if origin in DEFERRABLE_ORIGINS and len(refs) > INLINE_ENTITIES:
            batches = self._record_later(integration_id, refs, now=now, origin=origin)
            log_event(event, integration_id=integration_id, origin=origin, entities=accepted, queued=0,
                      deferred=len(refs), batches=batches, ignored=ignored)
            return {"accepted": accepted, "queued": 0, "ignored": ignored, "deferred": len(refs)}
        leased = self._record_now(integration_id, refs, now=now, origin=origin)
        log_event(event, integration_id=integration_id, origin=origin, entities=accepted, queued=len(leased),
                  ignored=ignored)
        return {"accepted": accepted, "queued": len(leased), "ignored": ignored}

    def _record_now(self, integration_id: str, refs: list[EntityRef], *, now: float, origin: str) -> list[EntityRef]:
        """Mark each entity dirty (future times capped) and queue those whose lease this call took; the
        refs leased. On any failure the leases taken are released before the error goes up."""
        leased: list[EntityRef] = []
        try:
            for ref in refs:
                if ref.event_time > now + FUTURE_SKEW_SECONDS:
                    ref = self._untrusted_time(integration_id, ref, now, origin)
                if self._store.mark_dirty(integration_id, ref, now=now, lease_seconds=self._lease,
                                          future_skew=FUTURE_SKEW_SECONDS):
                    leased.append(ref)
            if leased:
                self._queue.send([message(integration_id, r.kind, r.crm_id) for r in leased])
        except BaseException as exc:
            self._release(integration_id, leased)
            log_event("record_failed", integration_id=integration_id, origin=origin, error=type(exc).__name__,
                      released=len(leased))
            raise
        return leased

    def _record_later(self, integration_id: str, refs: list[EntityRef], *, now: float, origin: str) -> int:
        """Record the refs whole, in batches of INBOX_BATCH_REFS, and queue one message per batch; the
        number of batches. All or nothing as well: if the store or the queue fails, the batches are
        deleted again before the error goes up (should that fail too, the sweep expands them later: a
        duplicate of the CRM's retry, harmless), and no entity was touched."""
        batches = {uuid.uuid4().hex: refs[start:start + INBOX_BATCH_REFS] for start in range(0, len(refs), INBOX_BATCH_REFS)}
        try:
            self._store.put_inbox(integration_id, batches, now=now)
            self._queue.send([message(integration_id, INBOX, batch_id) for batch_id in batches])
        except BaseException as exc:
            try:
                self._store.delete_inbox(integration_id, list(batches))
            except Exception:  # noqa: BLE001 — the first error is the one to report; the sweep finds the batches
                pass
            log_event("record_failed", integration_id=integration_id, origin=origin, error=type(exc).__name__,
                      deferred=len(refs), batches=len(batches))
            raise
        return len(batches)

    def expand(self, integration_id: str, batch_id: str) -> dict:
        """Record an inbox batch's entities as a small webhook's are (capped times, leases, messages),
        then delete the batch: {"entities", "queued"}. A batch already gone (a message delivered twice,
        a sweep) does nothing. On a failure the leases are released and the batch stays, for SQS's
        redelivery of the message or, should that be lost too, the sweep."""
        refs = self._store.get_inbox(integration_id, batch_id)
        if refs is None:
            return {"entities": 0, "queued": 0}
        leased = self._record_now(integration_id, refs, now=self._clock(), origin=INBOX)
        self._store.delete_inbox(integration_id, [batch_id])
        log_event("inbox_expanded", integration_id=integration_id, batch_id=batch_id, entities=len(refs),
                  queued=len(leased))
        return {"entities": len(refs), "queued": len(leased)}

    def _untrusted_time(self, integration_id: str, ref: EntityRef, now: float, origin: str) -> EntityRef:
        """An event time far in the future is capped: the event is recorded and queued, but it does not
        advance the entity's clock — it takes the time already recorded (0 when none, or when that
        one is bogus too). Capping at our own clock instead would mix clocks: a CRM whose clock runs
        behind ours would then see its next real changes dropped as stale. One extra read, on this
        rare path only."""
        state = self._store.get_entity(integration_id, ref.kind, ref.crm_id)
        recorded = int(state["event_time"]) if state and state.get("event_time") is not None else 0
        capped_at = recorded if recorded <= now + FUTURE_SKEW_SECONDS else 0
        log_event("event_time_capped", integration_id=integration_id, kind=ref.kind, crm_id=ref.crm_id,
                  event_time=ref.event_time, capped_at=capped_at, origin=origin)
        return EntityRef(ref.kind, ref.crm_id, capped_at, ref.action)

    def _release(self, integration_id: str, refs: list[EntityRef]) -> None:
        for ref in refs:
            try:
                self._store.release_queue_lease(integration_id, ref.kind, ref.crm_id)
            except Unavailable:  # the store is failing too: the lease runs out by itself
                return

    # --- other ways in ------------------------------------------------------------------------------

    def requeue(self, integration_id: str, refs: list[EntityRef]) -> dict:
        """Queue entities again (a replay, a re-send after a FAILED upload). Many at once are recorded
        whole, as a large webhook is, so an admin route or a scheduled job never writes entity by entity
        past its time limit."""
        return self.record(integration_id, refs, origin="replay")

    def requeue_held(self, integration_id: str, entries: list[dict]) -> int:
        """Queue again the entities held because their stage was not mapped, now that it is."""
        mapped = {e["crm_status"] for e in entries}
        held = [EntityRef(e["kind"], e["crm_id"], e["event_time"], "remapped") for e in self._store.list_entities(integration_id)
                if (e.get("last_error") or {}).get("code") == "unmapped_stage"
                and e["last_error"].get("crm_status") in mapped]
        return self.record(integration_id, held, origin="remapped")["queued"] if held else 0

    def reconcile(self, integration_id: str, source: CrmSource, *, since: int | None = None) -> dict:
        """Feed entities changed since the stored cursor through the same path as webhooks, so a lost
        webhook costs minutes, not a deal (Bitrix24 never retries; amoCRM hooks can be disabled); and
        sweep entities whose message was lost (dirty, lease gone or run out) back onto the queue.
        Listed entities Metrika already holds as the CRM has them are left alone
        (`chalicelib.delivered`: no write, no message); `delivered` counts them."""
        integration = self._store.get_integration(integration_id)
        if integration is None:
            raise not_found(f"integration {integration_id!r}")
        now = int(self._clock())
        stored = self._store.get_cursor(integration_id, RECONCILE_POSITION)
        position = stored
        if position is None:  # a first run, or the first since the position was kept: a day back, or
            ran = self._store.get_cursor(integration_id, RECONCILE_RAN)  # since a run longer ago than that
            position = now - RECONCILE_FIRST_WINDOW if ran is None else min(ran, now - RECONCILE_FIRST_WINDOW)
        start = max(0, (since if since is not None else position) - RECONCILE_OVERLAP)
        stuck = [EntityRef(e["kind"], e["crm_id"], e["event_time"], "sweep")
                 for e in self._store.stuck_entities(integration_id, now=now)]
        swept = self.record(integration_id, stuck, origin="sweep")["queued"] if stuck else 0
        stale = self._store.stale_inbox(integration_id, before=now - INBOX_GRACE_SECONDS)
        if stale:  # queued again, not expanded here: expanding is the worker's, with its time budget
            self._queue.send([message(integration_id, INBOX, batch_id) for batch_id in stale])
            log_event("inbox_swept", integration_id=integration_id, batches=len(stale))
        listed = source.changed_since(integration, start)
        from .delivered import undelivered  # the reconciliation's alone (marshmallow loads only if it compares)
        refs, delivered = undelivered(self._store, source, integration_id, integration, listed, now=now,
                                      future_skew=FUTURE_SKEW_SECONDS)
        result = self.record(integration_id, refs, origin="reconcile") if refs else {"queued": 0}
        if listed and (since is None or since <= position):  # a `since` after it leaves it to the next run
            newest = newest_listed(listed, limit=now + FUTURE_SKEW_SECONDS)
            # A scheduled run only moves it on; a `since` before it may move it back (a CRM clock that
            # jumped back and left it ahead of every change the CRM makes).
            position = newest if since is not None else max(position, newest)
        if position != stored:
            self._store.put_cursor(integration_id, RECONCILE_POSITION, position)
        self._store.put_cursor(integration_id, RECONCILE_RAN, now)  # what the schedules compare with
        return {"since": start, "found": len(listed), "queued": result["queued"], "swept": swept,
                "delivered": delivered}


def newest_listed(listed: list[EntityRef], *, limit: int) -> int:
    """Where the reconciliation window starts next: the newest change time the CRM listed, in its own
    clock, never past what it showed. A time past `limit` (our clock plus FUTURE_SKEW_SECONDS: a deal
    dated in the year 2100) is left out, or it would hold the window past every real change of a CRM
    whose clock lags ours; when every listed time is past it (a CRM clock hours ahead), `limit`."""
    possible = [ref.event_time for ref in listed if ref.event_time <= limit]
    return max(possible) if possible else limit


def expand_inbox(store: Any, queue: Queue, batches: list[tuple[str, str]], *,
                 clock: Callable[[], float] = time.time) -> dict:
    """The worker's part for INBOX messages ((integration id, batch id) each): expand up to
    INBOX_BATCHES_PER_RUN batches and queue the rest again for another invocation, so one SQS batch
    full of them stays inside the worker's time; so are those left when the invocation's deadline no
    longer leaves INBOX_SECONDS. `Unavailable` goes up (SQS redelivers the batch);
    anything else one batch raises is logged and leaves that batch for the sweep, failing no other.
    {"expanded": entities, "queued": entity messages, "failed": batches, "postponed": batches}."""
    batches = list(dict.fromkeys(batches))
    first, later = batches[:INBOX_BATCHES_PER_RUN], batches[INBOX_BATCHES_PER_RUN:]
    if later:
        queue.send([message(integration_id, INBOX, batch_id) for integration_id, batch_id in later])
    ingest = Ingest(store, queue, max_body_bytes=0, clock=clock)
    outcome = {"expanded": 0, "queued": 0, "failed": 0, "postponed": len(later)}
    for index, (integration_id, batch_id) in enumerate(first):
        if not deadline.has(INBOX_SECONDS):
            left = first[index:]
            queue.send([message(i, INBOX, b) for i, b in left])
            outcome["postponed"] += len(left)
            log_event("work_postponed", what="inbox batches", units=len(left), messages=len(left),
                      seconds_left=round(deadline.remaining() or 0.0, 1))
            break
        try:
            result = ingest.expand(integration_id, batch_id)
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 — one batch's bug must not fail the others
            outcome["failed"] += 1
            log_event("inbox_expand_failed", integration_id=integration_id, batch_id=batch_id,
                      error=type(exc).__name__, traceback=traceback.format_exc(limit=8))
            continue
        outcome["expanded"] += result["entities"]
        outcome["queued"] += result["queued"]
    return outcome


def reconcile_since(body: Any, *, now: float) -> int | None:
    """The `since` of a `POST …/reconcile` body (`{}`, or `{"since": <Unix seconds>}`), else a 400
    naming the field: a bool, a negative value, a float, a string, a number of 2,000 digits or a time
    after now (the cursor would then skip the window between the last run and now) is not a time to
    list changes from, and a field of another name (`{"sinse": …}`) is not quietly ignored."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise invalid('body must be a JSON object: {} or {"since": <unix seconds>}')
    unknown = sorted(str(key)[:40] for key in body if key != "since")
    if unknown:
        raise invalid('the body takes "since" alone (Unix seconds)', {key: ["unknown field"] for key in unknown[:10]})
    since = body.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise invalid("since must be Unix seconds (a non-negative whole number)", {"since": str(since)[:40]})
    if since is not None and since > now + FUTURE_SKEW_SECONDS:
        raise invalid("since must be Unix seconds not after now", {"since": str(since)[:40]})
    return since


def reconcile_or_answer(ingest: Ingest, integration_id: str, source: CrmSource, since: Any = None) -> dict:
    """`reconcile` for an admin route: bad `since` is a 400, the CRM's failure a 422/502."""
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or not 0 <= since <= 2**40):
        raise invalid("since must be Unix seconds (a non-negative whole number)", {"since": str(since)[:40]})
    try:
        return ingest.reconcile(integration_id, source, since=since)
    except BridgeError as exc:
        raise http_error("could not list changed deals", exc) from exc
