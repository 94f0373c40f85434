"""The state store's contract: one Protocol per concern, and `StateStore`, all of them together.

Two implementations keep it: `store.dynamodb.DynamoStore` (production; the only module that knows
DynamoDB key shapes) and `store.memory.MemoryStore` (in process memory, for tests and tools). One
contract test suite (`tests/test_store_contract.py`) runs against both, so code written against these
Protocols behaves the same on either.

This module stays light (no boto3): the pure parts of the app import it for types.

Conventions every method keeps:

* Values come back as plain Python values: numbers as `int` (as `float` only when not integral, such
  as a lease time), never `Decimal` or DynamoDB's typed form. Returned dicts and lists are the caller's
  own copies: changing them never changes the store or a later read.
* Times are Unix seconds. Methods that decide on time take `now` from the caller (tests pass it);
  timestamps merely recorded (`sent_at`, `failed_at` …) come from the store's clock.
* A store that cannot be reached raises `chalicelib.errors.Unavailable("store", …)`; other errors
  (bad input, bugs) propagate as they are.
* Every check-then-write named below is atomic: it holds when several processes call at once.

Entity state (one per CRM entity, under its integration) holds: `kind` ("order"/"contact"), `crm_id`,
`event_time` (newest change recorded), `dirty` (not yet delivered), `queued_until` (the queue lease:
present while a message for the entity is believed to be on its way; a lease that has passed means the
message was lost), `last_action`, `attempts`, `last_error`, `failed_at`, `content_hash`, `row_hashes`
(row id → hash of the rows Metrika accepted), `uploading_id`, `sent_at`, `last_order` (JSON of the
order as sent), `facts`, `owner` (set while a history import holds the entity), `dead_lettered_at`
(set while the entity's message is believed to be in the dead-letter queue), and `seq` (a count of the
writes that owe a delivery: each event recorded, resend and history-import hold or release adds one, so a
delivery that read the state closes it only if nothing was recorded since, even in the same second).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from chalicelib.crm import EntityRef

BACKFILL_OWNER = "backfill"  # `owner` of an entity a history import holds
# Attributes older code wrote that nothing reads any more; a whole-item put leaves them out.
LEGACY_ATTRIBUTES = ("queued", "received_at")
# A worker that claimed an entity this recently is taken to be delivering it: the stuck sweep leaves
# it alone (SQS redelivers the message of a worker that died; the sweep covers messages that are gone).
# SQS hides a received message for the events queue's visibility timeout (6 x the worker's 300 s =
# 1800 s, infra/stage.yaml) before handing it out again, so the grace covers that and one more worker
# run (tests/test_deploy_config.py holds it to the configured timeouts): shorter, the sweep would queue
# a second message for an entity whose first is merely hidden, and one that kills the worker would go
# round on several messages at once.
CLAIM_GRACE_SECONDS = 2100


# Items that expire carry `expires_at` (epoch seconds), the TTL attribute of the tables (infra/*.yaml).
# DynamoDB deletes an expired item "typically within two days" and reads return it until then
# ("UpdateTimeToLive", https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_UpdateTimeToLive.html),
# so no reader relies on it being gone.
DAY = 86400
UPLOAD_RECORD_TTL = 30 * DAY  # an upload's record: 30 days after its final status (PASSED, FAILED, UNCONFIRMED)
# The entities an upload carried are deleted when it is confirmed; this only reaps lists a crash left
# behind. It must outlast the longest an upload stays SENT (operations.GIVE_UP_AFTER, 2 days) and its
# record's 30 days, so a list is never gone while its upload can still be confirmed FAILED and re-sent.
CARRIED_TTL = 32 * DAY
# An upload still waiting for its final status (SENT) expires too, so a record nobody confirms is not kept
# for ever: confirmation settles every upload within operations.GIVE_UP_AFTER (2 days; past 6 h the status
# page reports it), so a SENT record this old means confirmation has not run (the schedule was off, the
# Metrika token revoked, Metrika down). Two weeks leaves an operator that long to notice on the status
# page (`unconfirmed_over_6h`) and bring confirmation back, which then still finds the upload and settles
# it; CARRIED_TTL outlasts it (and DynamoDB's up-to-two-day lag in deleting it) so its entities are there.
PENDING_UPLOAD_TTL = 14 * DAY
DAY_COUNTER_TTL = 3 * DAY  # a Metrika day counter: 3 days after its UTC day ends


def day_counter_expiry(day: str) -> int:
    """`expires_at` of a day counter for `day` ("YYYY-MM-DD", a UTC day): DAY_COUNTER_TTL after the day
    ends. ValueError for anything else (a counter without expiry would be kept forever)."""
    from datetime import datetime, timezone
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    return int(start.timestamp()) + DAY + DAY_COUNTER_TTL


RECENT_UPLOADS_MAX = 1000  # `recent_uploads`' largest `limit`: one DynamoDB query page of small records


def check_recent_limit(limit: Any) -> None:
    """`recent_uploads`' `limit`: a whole number from 0 to RECENT_UPLOADS_MAX, or ValueError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= RECENT_UPLOADS_MAX:
        raise ValueError(f"limit must be a whole number from 0 to {RECENT_UPLOADS_MAX}, not {limit!r}"[:120])


def plain(value: Any) -> Any:
    """Stored numbers are Decimal (DynamoDB's kind): callers get ints (ids, counts, times), or floats
    where not integral (lease times), in a fresh structure."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, set):
        return {plain(v) for v in value}
    return value


def stored_time(seconds: float) -> Decimal:
    """A time as both stores keep it: 0.1 ms is precise enough for leases and spacing, and keeps
    numbers short."""
    return Decimal(str(round(seconds, 4)))


def entity_keys(entities: Any) -> list[str]:
    """(kind, crm_id) pairs as both stores keep an upload's entities: "kind:crm_id", each once, sorted."""
    return sorted({f"{kind.lower()}:{crm_id}" for kind, crm_id in entities})


def entity_pairs(keys: Any) -> list[tuple[str, str]]:
    """`entity_keys` back to (kind, crm_id) pairs, sorted, each once."""
    return sorted({(kind, crm_id) for kind, _, crm_id in (key.partition(":") for key in keys)})


@dataclass(frozen=True)
class Hold:
    """An entity a history import took (`ImportStore.take_for_backfill`), to hand back to
    `release_backfilled`. Plain values only: `state` is the whole entity state as taken, as
    `EntityStore.get_entity` returns it."""

    integration_id: str
    kind: str
    crm_id: str
    event_time: int
    owner: str
    state: dict


class IntegrationStore(Protocol):
    """Integrations' configuration: the config itself, status and attribute mappings, cursors."""

    def get_integration(self, integration_id: str, *, max_age: float = 0) -> dict | None:
        """The integration's config, or None. `max_age` > 0 accepts a copy this store object read at
        most that many seconds ago (the webhook path saves a round trip on warm Lambdas); another
        process's write then shows after at most `max_age`. Writes through this same object are seen
        at once. Always a fresh copy, cached or not."""

    def put_integration(self, integration_id: str, config: dict) -> None:
        """Create or replace the integration's config."""

    def delete_integration(self, integration_id: str) -> bool:
        """Delete the integration with everything under it: mappings, cursors, history import job,
        entity state, uploads, products. False if it had no config."""

    def list_integration_ids(self) -> list[str]:
        """Every integration that has a config, sorted."""

    def integrations_on_counter(self, counter_id: int) -> list[str]:
        """Every integration whose config names this Metrika counter (`counter_id`), sorted: they share
        its order ids and its one status list (see `chalicelib.shared_counter`)."""

    def get_status_mapping(self, integration_id: str) -> dict | None:
        """{"entries": [...], "pushed_at": int | None}, or None when none was saved."""

    def put_status_mapping(self, integration_id: str, entries: list[dict], pushed_at: int) -> None:
        """Replace the status mapping."""

    def get_attribute_mapping(self, integration_id: str) -> list[dict]:
        """The custom attribute mapping entries ([] when none was saved)."""

    def put_attribute_mapping(self, integration_id: str, entries: list[dict]) -> None:
        """Replace the attribute mapping."""

    def get_cursor(self, integration_id: str, name: str) -> int | None:
        """A named position (e.g. where reconciliation stopped), or None."""

    def put_cursor(self, integration_id: str, name: str, value: int) -> None:
        """Set a named position."""


class EntityStore(Protocol):
    """Per-entity delivery state: which entity changed, whether a message for it is on its way, and
    what was last sent."""

    def mark_dirty(self, integration_id: str, ref: EntityRef, *, now: float, lease_seconds: float,
                   future_skew: float) -> bool:
        """Record that `ref` changed. True when THIS call took the queue lease: the caller must now
        send a message for the entity (and call `release_queue_lease` if it cannot).

        The event is recorded (event_time, dirty, last_action) unless it is stale: a stored event
        time newer than `ref.event_time` wins, except one more than `future_skew` seconds after `now`
        (a bogus future time, overwritten so the entity is not frozen). Equal times pass. A stale event
        writes nothing and returns False.

        When recorded, `seq` counts one more (even at an equal time: see `mark_clean`'s `version`), and:
        no lease → take it (until `now + lease_seconds`), True. A live lease (not before
        `now`) → False: the pending message covers this change too, so a burst costs one message. An
        expired lease (its message was lost) → taken over, True. Of concurrent callers, exactly one
        gets True for one missing or expired lease."""

    def release_queue_lease(self, integration_id: str, kind: str, crm_id: str) -> None:
        """Drop the entity's queue lease: its message could not be sent, so the next event (or the
        stuck sweep) queues one. Nothing happens to an entity without state."""

    def claim(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        """The worker takes the entity for delivery: drops the queue lease (from now on a new event
        queues a new message) and a history import's hold, and stamps `claimed_at` (the stuck sweep
        leaves a fresh claim alone). Returns the state (as `get_entity`), or None when the entity has no
        state (e.g. its integration was deleted). One write: the worker claims only for a message SQS
        handed out again (a worker died on it); a first receive reads (`delivery_states`)."""

    def delivery_states(self, integration_id: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        """The state of each of `keys` that has one (as `get_entity`), keyed as asked: the worker's read
        before a delivery, in place of a claim. One bulk read (strongly consistent), no write: the queue
        lease stays while the delivery runs (an event meanwhile records its time and counts `seq`, and
        queues nothing), and the delivery closes the entity with the `seq` it read (`mark_clean`'s
        `version`) or, if that fails, renews the lease it saw and queues (`renew_queue_lease`)."""

    def renew_queue_lease(self, integration_id: str, kind: str, crm_id: str, *, seen: float | None,
                          until: float) -> bool:
        """A delivery could not close the entity (recorded since its read): take the queue lease until
        `until`, only if the entity is dirty and its lease is still the one the delivery read (`seen`,
        None: none). True: no one else took a lease since, so no other message is on its way and the
        caller must send one (if it dies first, the lease runs out and the stuck sweep queues it; SQS
        also hands the caller's own message out again). False: whoever took the lease queued."""

    def mark_clean(self, integration_id: str, kind: str, crm_id: str, *, event_time: int, content_hash: str,
                   row_hashes: dict[str, str] | None, uploading_id: str | None, last_order: str | None = None,
                   facts: dict | None = None, version: int | None = None) -> bool:
        """Delivered the state seen at `event_time`: dirty=False, content_hash, row_hashes (None removes
        them: unknown), uploading_id ("" for None), sent_at=now, attempts=0, last_order ("" for None), facts (when
        given); last_error and dead_lettered_at removed. Only if the entity is as the delivery saw it: the
        stored event time is still `event_time` and, with `version` (the `seq` of the state as read,
        0 when it had none), `seq` is still that (nothing recorded since, even in the same second): then
        the queue lease and a history import's hold are removed too, in the same write. Without
        `version` (the entity was claimed): no lease was taken since (an event recorded meanwhile, even
        one with the same time, takes a lease and queues its own message). False otherwise; it stays
        dirty."""

    def mark_failed(self, integration_id: str, kind: str, crm_id: str, *, event_time: int, error: dict,
                    version: int | None = None) -> bool:
        """Park the entity (a permanent error that needs a person): dirty=False, last_error=error,
        failed_at=now, content_hash and dead_lettered_at removed (rows may have gone up before the
        refusal). Same condition, answer and `version` as `mark_clean`."""

    def note_attempt(self, integration_id: str, kind: str, crm_id: str, *, attempts: int, error: dict,
                     lease_until: float, row_hashes: dict[str, str] | None = None) -> bool:
        """A retryable failure whose retry message is queued: attempts, last_error, the queue lease
        until `lease_until`, and `row_hashes` when given (rows Metrika already accepted, so the retry
        skips them; the whole-content hash is then stale and removed); dead_lettered_at removed (a new
        message is on its way). Only while the entity is dirty (True): one delivered or parked meanwhile
        — by a duplicate of the message — is left as it is (False), since its retry message will find
        nothing to do and a lease left on it would make the next event queue nothing."""

    def forget_content(self, integration_id: str, kind: str, crm_id: str) -> None:
        """Forget what was sent (content_hash, last_order, row_hashes), so the next delivery sends the
        entity even if unchanged (replay). Nothing happens to an entity without state."""

    def get_entity(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        """{"kind", "crm_id", **attributes}, or None."""

    def list_entities(self, integration_id: str) -> list[dict]:
        """Every entity's state (as `get_entity`): orders, then contacts, each ordered by crm_id as a
        string."""

    def stuck_entities(self, integration_id: str, *, now: float) -> list[dict]:
        """Dirty entities whose queue lease is absent or expired (before `now`): their message was lost
        or never sent. A history import's hold carries a lease too, so a held entity is listed only
        once that lease has expired (a crashed import); an entity claimed in the last
        CLAIM_GRACE_SECONDS is being delivered and is not listed; nor is a dead-lettered one
        (`mark_dead_lettered`): every receive of its message failed, so it waits for an operator's
        redrive or replay instead of going round again. Same order as `list_entities`."""

    def existing_entities(self, integration_id: str, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (kind, crm_id) have state."""

    def content_hashes(self, integration_id: str, kind: str, crm_ids: list[str]) -> dict[str, str]:
        """crm_id → last sent content hash, for those of `crm_ids` that have one."""

    def delivered_versions(self, integration_id: str, kind: str, crm_ids: list[str]) -> dict[str, dict]:
        """crm_id → {"event_time", "content_hash"} for those of `crm_ids` whose state says Metrika holds
        them as last recorded: not dirty, a content hash kept, not held by a history import. Others
        (absent, dirty, parked, replayed, held) are left out. One bulk read (strongly consistent)."""

    def mark_resend(self, integration_id: str, kind: str, crm_id: str) -> int | None:
        """Metrika reported an upload that carried this entity as failed: forget what was sent and owe a
        delivery, in one atomic write. `seq` counts one more; content_hash removed; row_hashes set to {} (Metrika holds none of
        its rows; an absent map would fall back to `last_order`); dirty=True; a history import's hold
        (`owner`) dropped; and, unless a live lease exists, a lease that has already run out
        (queued_until=0). So a delivery that read the old state cannot close the entity (`mark_clean`,
        `mark_failed` and `release_backfilled` fail), the caller's `mark_dirty` takes the lease over and
        queues a message, and if the caller dies first the stuck sweep finds it. last_order and facts
        stay (a later deletion can still be reported). Returns the entity's event_time (to queue it
        with), or None when it has no state (nothing is created)."""

    def mark_dead_lettered(self, integration_id: str, kind: str, crm_id: str) -> bool:
        """The worker is on the last receive of a message for this entity: should it fail again, SQS moves
        the message to the dead-letter queue. Sets `dead_lettered_at` = now, only on a dirty entity (a
        clean one owes nothing); True when set. The flag goes with whatever settles the entity or puts a
        new message on its way: `mark_clean`, `mark_failed`, `note_attempt`, `release_backfilled` and
        `clear_dead_lettered` remove it. Nothing is created for an entity without state."""

    def clear_dead_lettered(self, integration_id: str, kind: str, crm_id: str) -> None:
        """The message flagged on its last receive was not worked on but queued again as a new message
        (the invocation was short of time), so it will not reach the dead-letter queue: `dead_lettered_at`
        removed. Nothing else changes; nothing is created for an entity without state."""

    def note_contacts_sent(self, integration_id: str, content_hashes: dict[str, str]) -> None:
        """Contacts that went up with a deal: remember their content hash (a contact without state gets
        event time 0, not dirty), so neither an import nor an unchanged webhook sends them again. Only
        where nothing is pending (dirty) or held for the contact; there its own delivery decides."""


class UploadStore(Protocol):
    """Uploads Metrika accepted: each waits (SENT, "pending") until confirmation reads its final status,
    then stays on record UPLOAD_RECORD_TTL for the status page. Confirmation reads only the pending
    uploads (`pending_uploads`) and the status page only those and the last few final ones
    (`recent_uploads`): neither reads the history, so their cost does not grow with it. Every record
    expires (pending ones after PENDING_UPLOAD_TTL)."""

    def record_upload(self, integration_id: str, uploading_id: str, *, kind: str, rows: int,
                      entities: list[tuple[str, str]] = ()) -> None:
        """A new pending upload: status "SENT", sent_at=now, expires_at=now + PENDING_UPLOAD_TTL, and the
        entities ((kind, crm_id)) whose rows it carried, kept apart from the upload's record
        (`upload_entities`) until it is confirmed (and expiring CARRIED_TTL after now, should a crash
        leave them). The entities are written first: a pending upload always has its whole list. Any
        number of entities fits (DynamoDB splits them over several items below 400 KB each). Recording
        the same id again while it is pending replaces the pending record (Metrika gives every upload a
        new id: recording a confirmed upload's id again is not expected, and the stores may differ)."""

    def uploads(self, integration_id: str) -> list[dict]:
        """Every upload on record, pending and final: [{"uploading_id", "kind", "rows", "status", "sent_at",
        ("elements_count", "confirmed_at", "resent", "expires_at")}], ordered by uploading_id; without the
        entities. Reads the whole history: for tools and tests. Confirmation and the status page use
        `pending_uploads` and `recent_uploads`."""

    def pending_uploads(self, integration_id: str) -> list[dict]:
        """The uploads still SENT (as `uploads` lists them), oldest sent first (then by uploading_id). Its
        cost depends on how many are pending, not on how many were confirmed. Uploads recorded by older
        code (one record per upload, whatever its status) are found too."""

    def recent_uploads(self, integration_id: str, *, limit: int) -> list[dict]:
        """The `limit` final (confirmed) uploads sent last, newest first (by sent_at, then uploading_id):
        one read of at most `limit` records, however long the history. ValueError unless 0 <= limit <= 1000."""

    def upload_entities(self, integration_id: str, uploading_id: str) -> list[tuple[str, str]]:
        """The (kind, crm_id) of every entity the upload carried, sorted, each once; [] when none were
        recorded or the upload is confirmed (a process that died while confirming, after the upload stopped
        being pending, may leave its list until it expires: nothing reads it for an upload not pending)."""

    def confirm_upload(self, integration_id: str, uploading_id: str, status: str, elements_count: int | None, *,
                       resent: int | None = None) -> None:
        """The pending upload's final status: status, elements_count (0 for None), confirmed_at=now,
        `resent` (entities queued again) when given, expires_at=now + UPLOAD_RECORD_TTL; it is no longer
        pending and its entity list is dropped, in that order (a crash in between leaves it pending with
        its list, and confirming it again gives one record). An upload that is not pending (unknown, or
        confirmed already) is left as it is."""


class ProductStore(Protocol):
    """Metrika's product list as this service last pushed it."""

    def products(self, integration_id: str) -> dict[str, str]:
        """product id → display name ("" when none): the whole list in one read (a delivery checks the
        products its orders name against it, so the cost of the check does not grow with them)."""

    def put_products(self, integration_id: str, names: dict[str, str]) -> None:
        """Add or rename products."""


class QuotaStore(Protocol):
    """Limits shared by every process: request spacing (per CRM account, per stage), and Metrika's daily
    budgets and concurrency leases (per token, shared by every stage that uses the token: DynamoStore
    keeps them in the one quota table)."""

    def reserve_slot(self, scope: str, interval: float, now: float) -> float:
        """The time at which the caller may send to `scope`: all callers are spaced at least
        `interval` seconds apart. An idle scope answers `now`."""

    def count_request(self, quota_key: str, day: str, budget: int) -> int | None:
        """Count one request against `budget` for `day`: the count including this one, or None (and
        nothing counted) when the budget is spent. Atomic: concurrent callers never exceed it. The
        counter expires at `day_counter_expiry(day)` (DynamoDB's TTL in the shared quota table)."""

    def requests_on(self, quota_key: str, day: str) -> int:
        """Requests counted for `day` (0 when none)."""

    def acquire_lease(self, scope: str, slots: int, owner: str, now: float, ttl: float) -> int | None:
        """Take one of `slots` leases for `ttl` seconds (a semaphore across processes): the slot, or
        None when all are held. A lease that expired (a crashed holder) is free again. One slot is
        never given to two callers at once."""

    def release_lease(self, scope: str, slot: int, owner: str) -> None:
        """Free the slot if `owner` still holds it (an expired lease taken over is not ours to free)."""


class CustomerStore(Protocol):
    """What the CRM says about each customer (a contact row's `uniq_id` as sent), source by source, and
    what Metrika holds of it (`chalicelib.customers`). A record: {"sources": {source id: part},
    "sent": hash of the row Metrika last accepted, or None, "version": count of writes (0: none)}."""

    def customers(self, integration_id: str, uniq_ids: list[str]) -> dict[str, dict]:
        """uniq_id → record, for those of `uniq_ids` that have one (a strongly consistent read)."""

    def record_customer(self, integration_id: str, uniq_id: str, *, put: dict[str, dict], drop: list[str],
                        sent: str | None, version: int) -> bool:
        """Set each source in `put` (each replaces only itself), remove each in `drop`, set `sent` (None
        removes it) and count a version, only if the record is still at `version` (0: none yet): no other
        delivery recorded the customer since the caller read it. False (nothing written) otherwise: the
        caller's row may lack the other delivery's change, so the caller reads again and sends again.
        Sources are stored apart, so a write never rewrites a source it does not name."""


class ImportStore(Protocol):
    """The history import: its job, and its hold on the entities it sends."""

    def get_backfill(self, integration_id: str) -> dict | None:
        """The import job, or None."""

    def put_backfill(self, integration_id: str, job: dict, *, expect_run: str | None = None) -> bool:
        """Save the job. With `expect_run`: only if the stored job is that run and still "running", so
        a stop (or a new run) wins over a step finishing late. False when it lost."""

    def take_for_backfill(self, integration_id: str, kind: str, crm_id: str, event_time: int, content_hash: str, *,
                          absent: bool = False, now: float, lease_seconds: float) -> Hold | None:
        """The import takes an entity it read at `event_time`, unless the live path has it: the entity
        is dirty, or its state is as new or newer, or this content was already sent. An entity this
        import left held (an interrupted run) is taken again, unless an event newer than `event_time`
        was recorded since. Taking sets event_time, dirty, the
        import's owner mark and a queue lease until `now + lease_seconds`; while it is live, webhooks
        record newer events without queueing (see `release_backfilled`), and once it expired (a
        crashed import) a webhook takes the lease over and queues. Taking counts one more `seq`. None
        when not taken.

        `absent`: the caller just found no state, so a cheaper create-if-absent is tried first."""

    def release_backfilled(self, hold: Hold, *, content_hash: str | None, row_hashes: dict[str, str] | None = None,
                           uploading_id: str | None, last_order: str | None, facts: dict | None,
                           error: dict | None = None) -> bool:
        """End the hold: the state as taken, dirty=False, without lease and owner, and either sent
        (content_hash, row_hashes (None removes them), uploading_id, sent_at=now, attempts=0,
        last_order, facts when given; last_error removed) or, with `error`, parked (last_error,
        failed_at=now, content_hash removed); dead_lettered_at removed either way. Only if no newer
        event came and nobody claimed the entity since the hold (event time and owner unchanged) and
        nothing was recorded since (`seq` as held: an event in the hold's own second is no longer absorbed,
        the live path delivers it): one atomic check-and-write, which counts one more `seq` (a delivery
        that read the held state cannot close it). False otherwise: the entity stays dirty, and the caller must queue a
        message for it."""


class CrmAccountStore(Protocol):
    """What a CRM account says about itself (amoCRM's `country` and `currency`), read from the CRM once and
    kept here, so a delivery does not ask the CRM again. Keyed by the account (`scope`, derived from its
    base URL by the CRM source), not by integration: a new base URL is another account, read afresh."""

    def get_crm_account(self, scope: str) -> dict | None:
        """The account's facts as last put, or None."""

    def put_crm_account(self, scope: str, account: dict) -> None:
        """Replace the account's facts."""

    def expire_crm_account(self, scope: str) -> None:
        """Mark the account's kept facts stale (`read_at` 0), keeping the facts; nothing when none are
        kept. One write, no read: the API marks them on every save of an amoCRM integration."""


class InboxStore(Protocol):
    """Webhook bodies naming more entities than the acknowledgement records one by one: recorded whole,
    in batches of refs, and expanded into entity state by the worker (`chalicelib.ingest`). A batch
    stays until it has been expanded, so a lost queue message costs time, not the events."""

    def put_inbox(self, integration_id: str, batches: dict[str, list[EntityRef]], *, now: float) -> None:
        """Record each batch of refs under its id (a batch of that id is replaced), with `recorded_at` =
        `now`. Either every batch is written, or an error is raised and some may have been (the caller
        deletes them). A batch is one item: a few hundred refs, far from DynamoDB's 400 KB item limit."""

    def get_inbox(self, integration_id: str, batch_id: str) -> list[EntityRef] | None:
        """The batch's refs as recorded, in order; None when there is no such batch (expanded, deleted)."""

    def delete_inbox(self, integration_id: str, batch_ids: list[str]) -> None:
        """Forget these batches; ids without a batch are ignored."""

    def stale_inbox(self, integration_id: str, *, before: float) -> list[str]:
        """Ids of the batches recorded before `before` (their message was lost or keeps failing), oldest
        first."""


def summary(items: list[dict], *, complete: bool) -> dict:
    """`ConsoleStore.entity_summary` of entity items as read (both stores count alike)."""
    return {"scanned": len(items), "complete": complete,
            "backlog": sum(1 for e in items if e.get("dirty") is True),
            "retrying": sum(1 for e in items if e.get("dirty") is True and e.get("attempts")),
            "parked": sum(1 for e in items if e.get("last_error") and e.get("dirty") is not True),
            "dead_lettered": sum(1 for e in items if e.get("dead_lettered_at")),
            "last_sent_at": max((e.get("sent_at") or 0 for e in items), default=0) or None}


class ConsoleStore(Protocol):
    """The web console's own items: console links (config table, `CONSOLE_LINK#<link id>` under the
    integration) and a bounded health summary of an integration's entities."""

    def put_console_link(self, integration_id: str, link_id: str, link: dict) -> bool:
        """Store a link: {"hash": sha-256 hex of its token, "label", "created_at"}. False (and nothing
        kept) when the integration has no config, even one deleted while the link was being put: a link
        its integration's DELETE missed would open a later integration of the same id."""

    def get_console_link(self, integration_id: str, link_id: str) -> dict | None:
        """The link as stored (with `link_id`), or None (never made, revoked, integration deleted)."""

    def console_links(self, integration_id: str) -> list[dict]:
        """Every link of the integration, as stored, each with its `link_id`."""

    def delete_console_link(self, integration_id: str, link_id: str) -> bool:
        """Revoke a link; False if there was none."""

    def console_entities(self, integration_id: str, *, limit: int) -> tuple[list[dict], bool]:
        """At most `limit` of the integration's entities, orders first (as `list_entities`), each with
        only what the console's stages and delivery views count: kind, crm_id, dirty, last_error, facts,
        sent_at (those it has); and whether every entity was read."""

    def entity_summary(self, integration_id: str, *, limit: int) -> dict:
        """Counts over at most `limit` of the integration's entities (bounded time for a list of
        integrations): {"scanned", "complete" (all were read), "backlog" (dirty), "retrying" (dirty with
        attempts), "parked" (an error, not dirty), "dead_lettered", "last_sent_at" (or None)}."""


class TokenStore(Protocol):
    """An installed integration's OAuth tokens (`chalicelib.oauth`), in an item of their own beside the
    config (never inside it: a PUT of the config must not overwrite a refreshed token). The item:
    `access_token`, `refresh_token`, `expires_at` (epoch s), any CRM-specific extras, `version` (int,
    +1 on every stored pair), `refreshed_at` (store clock, when the pair was stored), while a refresh is
    under way `refreshing_until` and `lease_owner`, and after a refused refresh `failure`
    ({"code", "message", "at"}). `delete_integration` deletes it with the rest."""

    def get_tokens(self, integration_id: str) -> dict | None:
        """The tokens item (strongly consistent), or None."""

    def put_tokens(self, integration_id: str, tokens: dict) -> int:
        """An install's pair: set the given fields, version + 1 (1 for the first), refreshed_at = now;
        lease and failure removed, so a refresh under way cannot store its older pair over it. Returns
        the new version. Unconditional."""

    def take_refresh_lease(self, integration_id: str, *, version: int, owner: str, now: float, until: float) -> bool:
        """Elect the refresher: only if the item is at `version` and no lease is live (absent, or before
        `now`), set `refreshing_until` = `until` and `lease_owner`. Of concurrent callers at most one
        gets True."""

    def finish_refresh(self, integration_id: str, *, version: int, tokens: dict) -> bool:
        """Store a refreshed pair: only if the item is still at `version` (whoever holds the lease now:
        the pair the CRM answered is the one it honours), set the fields, version + 1, refreshed_at =
        now; lease and failure removed. False (nothing written) when the version moved on."""

    def release_refresh(self, integration_id: str, *, version: int, owner: str, failure: dict | None) -> bool:
        """End a refresh that stored nothing: only if the item is at `version` and `owner` holds the
        lease, remove the lease and, with `failure`, record it. False (nothing written) otherwise."""


class StateStore(IntegrationStore, EntityStore, UploadStore, ProductStore, QuotaStore, ImportStore, CrmAccountStore,
                 InboxStore, CustomerStore, TokenStore, ConsoleStore, Protocol):
    """Everything the app keeps: what `DynamoStore` and `MemoryStore` implement."""

