"""`StateStore` in process memory: the same contract as `DynamoStore` (one contract test suite runs
against both), for tests and tools that need no DynamoDB.

Values are kept as DynamoDB keeps them (numbers as Decimal, times rounded to 0.1 ms), so every
comparison a condition makes gives the same answer as DynamoDB's, and come out as `DynamoStore` hands
them out (ints, floats where not integral), always as fresh copies. One re-entrant lock makes every
method atomic, which is what DynamoDB's conditional writes give the other implementation.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from decimal import Decimal
from typing import Any, Callable

from chalicelib.crm import EntityRef

from . import (BACKFILL_OWNER, CARRIED_TTL, CLAIM_GRACE_SECONDS, LEGACY_ATTRIBUTES, PENDING_UPLOAD_TTL,
               UPLOAD_RECORD_TTL, Hold, check_recent_limit, day_counter_expiry, entity_keys, entity_pairs)
from . import plain as _plain
from . import stored_time as _decimal
from . import summary as _summary

_CONSOLE_FIELDS = ("dirty", "last_error", "facts", "sent_at")  # ConsoleStore.console_entities
_KINDS = ("order", "contact")  # list_entities' order, as DynamoStore's sort keys give it


def _model(value: Any) -> Any:
    """A value as DynamoDB would store it, copied: numbers become Decimal; what DynamoDB refuses
    (NaN, infinities, non-string map keys, other types) raises TypeError here too."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError("Infinity and NaN not supported")
        return Decimal(repr(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TypeError("Infinity and NaN not supported")
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("map keys must be strings")
        return {k: _model(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_model(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {_model(v) for v in value}
    raise TypeError(f"Unsupported type {type(value)!r} for value {value!r}")


def _set(item: dict, **values: Any) -> None:
    """Set attributes; None leaves an attribute out, as DynamoStore's item building does."""
    item.update({k: _model(v) for k, v in values.items() if v is not None})


class MemoryStore:
    """`chalicelib.store.StateStore` in memory. `clock` gives the timestamps merely recorded
    (sent_at, failed_at …); decisions take `now` from the caller."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._integrations: dict[str, dict] = {}  # id → {"config", "updated_at"}
        self._status_mappings: dict[str, dict] = {}  # id → {"entries", "pushed_at"}
        self._attribute_mappings: dict[str, dict] = {}  # id → {"entries", "updated_at"}
        self._backfills: dict[str, dict] = {}  # id → job
        self._cursors: dict[str, dict[str, Any]] = {}  # id → name → value
        self._entities: dict[str, dict[tuple[str, str], dict]] = {}  # id → (kind, crm_id) → attributes
        self._products: dict[str, dict[str, Any]] = {}  # id → product id → name
        # Pending (SENT) uploads and final ones apart, as DynamoStore keeps them: reading the pending ones
        # never walks the history.
        self._pending: dict[str, dict[str, dict]] = {}  # id → uploading id → attributes
        self._uploads: dict[str, dict[str, dict]] = {}  # id → uploading id → attributes of a final upload
        # id → (sent_at, uploading id) of each final upload, sorted: DynamoStore's time-ordered sort key, so
        # reading the last few costs as little here as there
        self._upload_order: dict[str, list[tuple[Decimal, str]]] = {}
        self._carried: dict[str, dict[str, list[str]]] = {}  # id → uploading id → "kind:crm_id" entity keys
        self._next_at: dict[str, Decimal] = {}  # rate scope → next free time
        self._requests: dict[tuple[str, str], Decimal] = {}  # (quota key, day) → count
        self._slots: dict[tuple[str, int], tuple[str, Decimal]] = {}  # (scope, slot) → (owner, expires at)
        self._crm_accounts: dict[str, dict] = {}  # account scope → facts
        self._inbox: dict[str, dict[str, tuple[Decimal, list[EntityRef]]]] = {}  # id → batch id → (recorded at, refs)
        self._customers: dict[str, dict[str, dict]] = {}  # id → uniq_id → {"sources", "sent", "version"}
        self._console_links: dict[str, dict[str, dict]] = {}  # id → link id → {"hash", "label", "created_at"}
        self._tokens: dict[str, dict] = {}  # id → the OAuth tokens item (TokenStore)
        # The `expires_at` DynamoDB's TTL acts on, for items the protocol does not return (the entities an
        # upload carried, day counters): kept, never acted on; `expiry` reads it for the contract tests.
        self._expiry: dict[tuple[str, ...], int] = {}

    def expiry(self, kind: str, *key: str) -> int | None:
        """The `expires_at` DynamoStore would have written: ("carried", integration id, uploading id) or
        ("day", quota key, day). For the contract tests."""
        with self._lock:
            return self._expiry.get((kind, *key))

    # --- IntegrationStore ----------------------------------------------------------------------------

    def get_integration(self, integration_id: str, *, max_age: float = 0) -> dict | None:
        # No per-process copy to keep: this store is the source itself, so every read is current
        # (which `max_age` allows).
        with self._lock:
            item = self._integrations.get(integration_id)
            return _plain(item["config"]) if item else None

    def put_integration(self, integration_id: str, config: dict) -> None:
        with self._lock:
            self._integrations[integration_id] = {"config": _model(config), "updated_at": _model(self._now())}

    def delete_integration(self, integration_id: str) -> bool:
        with self._lock:
            existed = integration_id in self._integrations
            for key in [k for k in self._expiry if k[0] == "carried" and k[1] == integration_id]:
                del self._expiry[key]
            for table in (self._integrations, self._status_mappings, self._attribute_mappings, self._backfills,
                          self._cursors, self._entities, self._products, self._pending, self._uploads, self._upload_order, self._carried,
                          self._inbox, self._customers, self._tokens, self._console_links):
                table.pop(integration_id, None)
            return existed

    def list_integration_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._integrations)

    def integrations_on_counter(self, counter_id: int) -> list[str]:
        with self._lock:
            return sorted(i for i, item in self._integrations.items()
                          if item["config"].get("counter_id") == _model(counter_id))

    def get_status_mapping(self, integration_id: str) -> dict | None:
        with self._lock:
            item = self._status_mappings.get(integration_id)
            return {"entries": _plain(item["entries"]), "pushed_at": _plain(item.get("pushed_at"))} if item else None

    def put_status_mapping(self, integration_id: str, entries: list[dict], pushed_at: int) -> None:
        with self._lock:
            item: dict = {}
            _set(item, entries=entries, pushed_at=pushed_at)
            self._status_mappings[integration_id] = item

    def get_attribute_mapping(self, integration_id: str) -> list[dict]:
        with self._lock:
            item = self._attribute_mappings.get(integration_id)
            return _plain(item["entries"]) if item else []

    def put_attribute_mapping(self, integration_id: str, entries: list[dict]) -> None:
        with self._lock:
            self._attribute_mappings[integration_id] = {"entries": _model(entries), "updated_at": _model(self._now())}

    def get_cursor(self, integration_id: str, name: str) -> int | None:
        with self._lock:
            return _plain(self._cursors.get(integration_id, {}).get(name))

    def put_cursor(self, integration_id: str, name: str, value: int) -> None:
        with self._lock:
            self._cursors.setdefault(integration_id, {})[name] = _model(value)

    # --- EntityStore ---------------------------------------------------------------------------------

    def mark_dirty(self, integration_id: str, ref: EntityRef, *, now: float, lease_seconds: float,
                   future_skew: float) -> bool:
        with self._lock:
            entities = self._entities.setdefault(integration_id, {})
            key = (ref.kind.lower(), ref.crm_id)
            item = entities.get(key)
            seen = _model(ref.event_time)
            if item is not None and "event_time" in item:
                stored = item["event_time"]
                if not (stored <= seen or stored > _decimal(now + future_skew)):
                    return False  # stale: a newer event is already recorded
            item = entities.setdefault(key, {})
            held = item.get("queued_until")
            _set(item, event_time=seen, dirty=True, last_action=ref.action, seq=item.get("seq", 0) + 1)
            if held is not None and held >= _decimal(now):
                return False  # the pending message covers this change
            item["queued_until"] = _decimal(now + lease_seconds)  # no lease, or an expired one taken over
            return True

    def release_lease(self, scope: str, slot: int, owner: str) -> None:
        with self._lock:
            if self._slots.get((scope, slot), ("",))[0] == owner:
                del self._slots[(scope, slot)]

    def release_queue_lease(self, integration_id: str, kind: str, crm_id: str) -> None:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            if item is not None:
                item.pop("queued_until", None)

    def claim(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            if item is None:
                return None
            item.pop("queued_until", None)
            item.pop("owner", None)
            _set(item, claimed_at=self._now())
            return self._view(kind, crm_id, item)

    def delivery_states(self, integration_id: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        with self._lock:
            found = {}
            for kind, crm_id in dict.fromkeys(keys):
                item = self._item(integration_id, kind, crm_id)
                if item is not None:
                    found[(kind, crm_id)] = self._view(kind, crm_id, item)
            return found

    def renew_queue_lease(self, integration_id: str, kind: str, crm_id: str, *, seen: float | None,
                          until: float) -> bool:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            if item is None or item.get("dirty") is not True or _plain(item.get("queued_until")) != seen:
                return False
            item["queued_until"] = _decimal(until)
            return True

    def mark_clean(self, integration_id: str, kind: str, crm_id: str, *, event_time: int, content_hash: str,
                   row_hashes: dict[str, str] | None, uploading_id: str | None, last_order: str | None = None,
                   facts: dict | None = None, version: int | None = None) -> bool:
        with self._lock:
            item = self._current(integration_id, kind, crm_id, event_time, version)
            if item is None:
                return False
            _set(item, dirty=False, content_hash=content_hash, row_hashes=row_hashes, uploading_id=uploading_id or "",
                 sent_at=self._now(), attempts=0, last_order=last_order or "", facts=facts)
            item.pop("last_error", None)
            item.pop("dead_lettered_at", None)
            if row_hashes is None:
                item.pop("row_hashes", None)
            return True

    def mark_failed(self, integration_id: str, kind: str, crm_id: str, *, event_time: int, error: dict,
                    version: int | None = None) -> bool:
        with self._lock:
            item = self._current(integration_id, kind, crm_id, event_time, version)
            if item is None:
                return False
            _set(item, dirty=False, last_error=error, failed_at=self._now())
            item.pop("content_hash", None)
            item.pop("dead_lettered_at", None)
            return True

    def note_attempt(self, integration_id: str, kind: str, crm_id: str, *, attempts: int, error: dict,
                     lease_until: float, row_hashes: dict[str, str] | None = None) -> bool:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            if item is None or item.get("dirty") is not True:
                return False  # delivered (or parked) meanwhile: its retry message will find nothing to do
            _set(item, attempts=attempts, last_error=error, queued_until=_decimal(lease_until), row_hashes=row_hashes)
            item.pop("dead_lettered_at", None)
            if row_hashes is not None:
                item.pop("content_hash", None)
            return True

    def forget_content(self, integration_id: str, kind: str, crm_id: str) -> None:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            for name in ("content_hash", "last_order", "row_hashes"):
                if item is not None:
                    item.pop(name, None)

    def get_entity(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            return self._view(kind, crm_id, item) if item is not None else None

    def list_entities(self, integration_id: str) -> list[dict]:
        with self._lock:
            return [self._view(kind, crm_id, item) for (kind, crm_id), item in self._ordered(integration_id)]

    def stuck_entities(self, integration_id: str, *, now: float) -> list[dict]:
        with self._lock:
            return [self._view(kind, crm_id, item) for (kind, crm_id), item in self._ordered(integration_id)
                    if item.get("dirty") is True
                    and ("queued_until" not in item or item["queued_until"] < _decimal(now))
                    and ("claimed_at" not in item or item["claimed_at"] < _decimal(now - CLAIM_GRACE_SECONDS))
                    and "dead_lettered_at" not in item]

    def existing_entities(self, integration_id: str, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        with self._lock:
            entities = self._entities.get(integration_id, {})
            return {(kind.lower(), crm_id) for kind, crm_id in keys if (kind.lower(), crm_id) in entities}

    def content_hashes(self, integration_id: str, kind: str, crm_ids: list[str]) -> dict[str, str]:
        with self._lock:
            entities = self._entities.get(integration_id, {})
            return {crm_id: item["content_hash"] for crm_id in crm_ids
                    if (item := entities.get((kind.lower(), crm_id))) is not None and item.get("content_hash")}

    def delivered_versions(self, integration_id: str, kind: str, crm_ids: list[str]) -> dict[str, dict]:
        with self._lock:
            entities = self._entities.get(integration_id, {})
            found = {}
            for crm_id in crm_ids:
                item = entities.get((kind.lower(), crm_id))
                if item is not None and not item.get("dirty") and item.get("content_hash") and not item.get("owner"):
                    found[crm_id] = {"event_time": _plain(item.get("event_time", _decimal(0))),
                                     "content_hash": item["content_hash"]}
            return found

    def mark_resend(self, integration_id: str, kind: str, crm_id: str) -> int | None:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            if item is None:
                return None
            _set(item, dirty=True, row_hashes={}, seq=item.get("seq", 0) + 1)
            item.setdefault("queued_until", _decimal(0))  # run out: the caller's mark_dirty takes it over
            item.pop("content_hash", None)
            item.pop("owner", None)
            return int(item.get("event_time", 0))

    def mark_dead_lettered(self, integration_id: str, kind: str, crm_id: str) -> bool:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            if item is None or item.get("dirty") is not True:
                return False
            _set(item, dead_lettered_at=self._now())
            return True

    def clear_dead_lettered(self, integration_id: str, kind: str, crm_id: str) -> None:
        with self._lock:
            item = self._item(integration_id, kind, crm_id)
            if item is not None:
                item.pop("dead_lettered_at", None)

    def note_contacts_sent(self, integration_id: str, content_hashes: dict[str, str]) -> None:
        with self._lock:
            entities = self._entities.setdefault(integration_id, {})
            for crm_id, content_hash in content_hashes.items():
                item = entities.get(("contact", crm_id))
                if item is None:
                    item = entities[("contact", crm_id)] = {}
                elif not (item.get("dirty") is False and "owner" not in item):
                    continue  # pending or held: its own delivery decides
                _set(item, content_hash=content_hash)
                item.setdefault("event_time", Decimal(0))
                item.setdefault("dirty", False)

    # --- UploadStore ---------------------------------------------------------------------------------

    def record_upload(self, integration_id: str, uploading_id: str, *, kind: str, rows: int,
                      entities: list[tuple[str, str]] = ()) -> None:
        with self._lock:
            now = self._now()
            item: dict = {}
            _set(item, kind=kind, rows=rows, status="SENT", sent_at=now, expires_at=now + PENDING_UPLOAD_TTL)
            if entities:
                self._carried.setdefault(integration_id, {})[uploading_id] = entity_keys(entities)
                self._expiry[("carried", integration_id, uploading_id)] = now + CARRIED_TTL
            self._pending.setdefault(integration_id, {})[uploading_id] = item

    def uploads(self, integration_id: str) -> list[dict]:
        with self._lock:
            uploads = {**self._uploads.get(integration_id, {}), **self._pending.get(integration_id, {})}
            return [{"uploading_id": uploading_id, **_plain(uploads[uploading_id])} for uploading_id in sorted(uploads)]

    def pending_uploads(self, integration_id: str) -> list[dict]:
        with self._lock:
            pending = self._pending.get(integration_id, {})
            return sorted(({"uploading_id": uploading_id, **_plain(item)} for uploading_id, item in pending.items()),
                          key=lambda u: (u["sent_at"], u["uploading_id"]))

    def recent_uploads(self, integration_id: str, *, limit: int) -> list[dict]:
        check_recent_limit(limit)
        with self._lock:
            final, order = self._uploads.get(integration_id, {}), self._upload_order.get(integration_id, [])
            return [{"uploading_id": uploading_id, **_plain(final[uploading_id])}
                    for _, uploading_id in reversed(order[len(order) - limit:] if limit else [])]

    def upload_entities(self, integration_id: str, uploading_id: str) -> list[tuple[str, str]]:
        with self._lock:
            return entity_pairs(self._carried.get(integration_id, {}).get(uploading_id, []))

    def confirm_upload(self, integration_id: str, uploading_id: str, status: str, elements_count: int | None, *,
                       resent: int | None = None) -> None:
        with self._lock:
            item = self._pending.get(integration_id, {}).pop(uploading_id, None)
            if item is None:
                return  # not pending: unknown, or confirmed already
            now = self._now()
            _set(item, status=status, elements_count=elements_count or 0, confirmed_at=now, resent=resent,
                 expires_at=now + UPLOAD_RECORD_TTL)
            final = self._uploads.setdefault(integration_id, {})
            order = self._upload_order.setdefault(integration_id, [])
            if uploading_id in final:  # recorded again after it was confirmed: one record, the newer
                order.remove((final[uploading_id]["sent_at"], uploading_id))
            final[uploading_id] = item
            bisect.insort(order, (item["sent_at"], uploading_id))
            self._carried.get(integration_id, {}).pop(uploading_id, None)
            self._expiry.pop(("carried", integration_id, uploading_id), None)

    # --- ProductStore --------------------------------------------------------------------------------

    def products(self, integration_id: str) -> dict[str, str]:
        with self._lock:
            products = self._products.get(integration_id, {})
            return {p: _plain(products[p]) if products[p] is not None else "" for p in sorted(products)}

    def put_products(self, integration_id: str, names: dict[str, str]) -> None:
        with self._lock:
            self._products.setdefault(integration_id, {}).update({p: _model(n) for p, n in names.items()})

    # --- CustomerStore -------------------------------------------------------------------------------

    def customers(self, integration_id: str, uniq_ids: list[str]) -> dict[str, dict]:
        with self._lock:
            records = self._customers.get(integration_id, {})
            return {u: {"sources": _plain(records[u]["sources"]), "sent": records[u].get("sent"),
                        "version": _plain(records[u]["version"])} for u in uniq_ids if u in records}

    def record_customer(self, integration_id: str, uniq_id: str, *, put: dict[str, dict], drop: list[str],
                        sent: str | None, version: int) -> bool:
        with self._lock:
            records = self._customers.setdefault(integration_id, {})
            record = records.get(uniq_id)
            if (record["version"] if record else Decimal(0)) != _model(version):
                return False
            sources = {**(record["sources"] if record else {}), **{sid: _model(part) for sid, part in put.items()}}
            for sid in drop:
                sources.pop(sid, None)
            records[uniq_id] = {"sources": sources, "version": _model(version + 1), "sent": sent}
            return True

    # --- QuotaStore ----------------------------------------------------------------------------------

    def reserve_slot(self, scope: str, interval: float, now: float) -> float:
        with self._lock:
            next_at = self._next_at.get(scope)
            if next_at is None or next_at <= _decimal(now):
                self._next_at[scope] = _decimal(now + interval)
                return now
            self._next_at[scope] = next_at + _decimal(interval)
            return float(self._next_at[scope]) - interval

    def count_request(self, quota_key: str, day: str, budget: int) -> int | None:
        expires_at = day_counter_expiry(day)  # before counting: a day it cannot read counts nothing
        with self._lock:
            count = self._requests.get((quota_key, day))
            if count is not None and not count < budget:
                return None
            self._requests[(quota_key, day)] = (count or Decimal(0)) + 1
            self._expiry[("day", quota_key, day)] = expires_at
            return int(self._requests[(quota_key, day)])

    def requests_on(self, quota_key: str, day: str) -> int:
        with self._lock:
            return int(self._requests.get((quota_key, day), 0))

    def acquire_lease(self, scope: str, slots: int, owner: str, now: float, ttl: float) -> int | None:
        with self._lock:
            for slot in range(slots):
                held = self._slots.get((scope, slot))
                if held is None or held[1] < _decimal(now):
                    self._slots[(scope, slot)] = (owner, _decimal(now + ttl))
                    return slot
            return None

    # --- CrmAccountStore -----------------------------------------------------------------------------

    def get_crm_account(self, scope: str) -> dict | None:
        with self._lock:
            account = self._crm_accounts.get(scope)
            return _plain(account) if account is not None else None

    def put_crm_account(self, scope: str, account: dict) -> None:
        with self._lock:
            self._crm_accounts[scope] = _model(account)

    def expire_crm_account(self, scope: str) -> None:
        with self._lock:
            if scope in self._crm_accounts:
                self._crm_accounts[scope]["read_at"] = 0

    # --- ImportStore ---------------------------------------------------------------------------------

    def get_backfill(self, integration_id: str) -> dict | None:
        with self._lock:
            job = self._backfills.get(integration_id)
            return _plain(job) if job is not None else None

    def put_backfill(self, integration_id: str, job: dict, *, expect_run: str | None = None) -> bool:
        with self._lock:
            if expect_run is not None:
                stored = self._backfills.get(integration_id) or {}
                if not (stored.get("run_id") == expect_run and stored.get("state") == "running"):
                    return False
            self._backfills[integration_id] = _model(job)
            return True

    def take_for_backfill(self, integration_id: str, kind: str, crm_id: str, event_time: int, content_hash: str, *,
                          absent: bool = False, now: float, lease_seconds: float) -> Hold | None:
        # `absent` only saves DynamoDB a write; here the one check below decides either way.
        with self._lock:
            entities = self._entities.setdefault(integration_id, {})
            key = (kind.lower(), crm_id)
            item = entities.get(key)
            seen = _model(event_time)
            if not (item is None or "event_time" not in item
                    or (item.get("owner") == BACKFILL_OWNER and item["event_time"] <= seen)
                    or (item.get("dirty") is False and item["event_time"] < seen
                        and item.get("content_hash", None) != content_hash)):
                return None  # the live path has it, or this content was already sent
            item = entities.setdefault(key, {})
            _set(item, event_time=seen, dirty=True, queued_until=_decimal(now + lease_seconds),
                 last_action="backfill", owner=BACKFILL_OWNER, seq=item.get("seq", 0) + 1)
            state = self._view(kind, crm_id, item)
            return Hold(integration_id=integration_id, kind=state["kind"], crm_id=crm_id,
                        event_time=state["event_time"], owner=state["owner"], state=state)

    def release_backfilled(self, hold: Hold, *, content_hash: str | None, row_hashes: dict[str, str] | None = None,
                           uploading_id: str | None, last_order: str | None, facts: dict | None,
                           error: dict | None = None) -> bool:
        with self._lock:
            item = self._item(hold.integration_id, hold.kind, hold.crm_id)
            if item is None or item.get("event_time") != _model(hold.event_time) or item.get("owner") != hold.owner:
                return False  # a newer event came meanwhile, or a worker claimed the entity
            if item.get("seq", 0) != int(hold.state.get("seq") or 0):
                return False  # recorded since the hold, even in its second: the live path delivers it
            # The whole state as held, like DynamoStore's conditional put.
            state = {k: v for k, v in hold.state.items()
                     if k not in ("kind", "crm_id", "owner", "queued_until", "dead_lettered_at", *LEGACY_ATTRIBUTES)}
            now = self._now()
            if error is not None:
                state.update(last_error=error, failed_at=now)
                state.pop("content_hash", None)
            else:
                state.pop("last_error", None)
                state.pop("row_hashes", None)
                state.update(content_hash=content_hash, row_hashes=row_hashes, uploading_id=uploading_id or "",
                             sent_at=now, attempts=0, last_order=last_order or "")
                if facts is not None:
                    state["facts"] = facts
            state["dirty"] = False
            state["seq"] = int(hold.state.get("seq") or 0) + 1  # a delivery that read the held state cannot close it
            replaced: dict = {}
            _set(replaced, **state)
            self._entities[hold.integration_id][(hold.kind.lower(), hold.crm_id)] = replaced
            return True

    # --- InboxStore ----------------------------------------------------------------------------------

    def put_inbox(self, integration_id: str, batches: dict[str, list[EntityRef]], *, now: float) -> None:
        with self._lock:
            inbox = self._inbox.setdefault(integration_id, {})
            for batch_id, refs in batches.items():
                inbox[batch_id] = (_decimal(now), [EntityRef(r.kind, r.crm_id, int(r.event_time), r.action) for r in refs])

    def get_inbox(self, integration_id: str, batch_id: str) -> list[EntityRef] | None:
        with self._lock:
            batch = self._inbox.get(integration_id, {}).get(batch_id)
            return list(batch[1]) if batch is not None else None

    def delete_inbox(self, integration_id: str, batch_ids: list[str]) -> None:
        with self._lock:
            for batch_id in batch_ids:
                self._inbox.get(integration_id, {}).pop(batch_id, None)

    def stale_inbox(self, integration_id: str, *, before: float) -> list[str]:
        with self._lock:
            batches = self._inbox.get(integration_id, {})
            return [b for _, b in sorted((at, b) for b, (at, _) in batches.items() if at < _decimal(before))]

    # --- ConsoleStore --------------------------------------------------------------------------------

    def put_console_link(self, integration_id: str, link_id: str, link: dict) -> bool:
        with self._lock:
            if integration_id not in self._integrations:
                return False
            self._console_links.setdefault(integration_id, {})[link_id] = _model(link)
            return True

    def get_console_link(self, integration_id: str, link_id: str) -> dict | None:
        with self._lock:
            link = self._console_links.get(integration_id, {}).get(link_id)
            return {"link_id": link_id, **_plain(link)} if link is not None else None

    def console_links(self, integration_id: str) -> list[dict]:
        with self._lock:
            return [{"link_id": link_id, **_plain(link)}
                    for link_id, link in sorted(self._console_links.get(integration_id, {}).items())]

    def delete_console_link(self, integration_id: str, link_id: str) -> bool:
        with self._lock:
            return self._console_links.get(integration_id, {}).pop(link_id, None) is not None

    def console_entities(self, integration_id: str, *, limit: int) -> tuple[list[dict], bool]:
        with self._lock:
            ordered = self._ordered(integration_id)
            return [{"kind": kind, "crm_id": crm_id, **{k: v for k, v in _plain(item).items() if k in _CONSOLE_FIELDS}}
                    for (kind, crm_id), item in ordered[:limit]], len(ordered) <= limit

    def entity_summary(self, integration_id: str, *, limit: int) -> dict:
        with self._lock:
            ordered = self._ordered(integration_id)
            return _summary([_plain(item) for _, item in ordered[:limit]], complete=len(ordered) <= limit)

    # --- TokenStore ----------------------------------------------------------------------------------

    def get_tokens(self, integration_id: str) -> dict | None:
        with self._lock:
            item = self._tokens.get(integration_id)
            return _plain(item) if item is not None else None

    def put_tokens(self, integration_id: str, tokens: dict) -> int:
        with self._lock:
            item = self._tokens.setdefault(integration_id, {})
            return self._store_pair(item, tokens)

    def take_refresh_lease(self, integration_id: str, *, version: int, owner: str, now: float, until: float) -> bool:
        with self._lock:
            item = self._tokens.get(integration_id)
            if item is None or item.get("version") != _model(version):
                return False
            if "refreshing_until" in item and item["refreshing_until"] >= _decimal(now):
                return False
            item["refreshing_until"] = _decimal(until)
            item["lease_owner"] = owner
            return True

    def finish_refresh(self, integration_id: str, *, version: int, tokens: dict) -> bool:
        with self._lock:
            item = self._tokens.get(integration_id)
            if item is None or item.get("version") != _model(version):
                return False
            self._store_pair(item, tokens)
            return True

    def release_refresh(self, integration_id: str, *, version: int, owner: str, failure: dict | None) -> bool:
        with self._lock:
            item = self._tokens.get(integration_id)
            if item is None or item.get("version") != _model(version) or item.get("lease_owner") != owner:
                return False
            item.pop("refreshing_until", None)
            item.pop("lease_owner", None)
            _set(item, failure=failure)
            return True

    def _store_pair(self, item: dict, tokens: dict) -> int:
        version = int(item.get("version", 0)) + 1
        modelled = _model({k: v for k, v in tokens.items() if v is not None})  # before any change: a value DynamoDB refuses changes nothing
        for name in ("refreshing_until", "lease_owner", "failure"):
            item.pop(name, None)
        item.update(modelled)
        _set(item, version=version, refreshed_at=self._now())
        return version

    # --- helpers -------------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _item(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        """The stored attributes themselves (callers hold the lock; never hand them out)."""
        return self._entities.get(integration_id, {}).get((kind.lower(), crm_id))

    def _current(self, integration_id: str, kind: str, crm_id: str, event_time: int,
                 version: int | None) -> dict | None:
        """The entity if it is as the delivery saw it: the same event time and no event recorded since.
        `version` (the `seq` read): nothing that owes a delivery was written since; the lease and a
        history import's hold are the delivery's to end, so they go. None (claimed): no lease taken
        since the claim."""
        item = self._item(integration_id, kind, crm_id)
        if item is None or item.get("event_time") != _model(event_time):
            return None  # newer
        if version is None:
            return None if "queued_until" in item else item  # recorded since the claim (even at the same time)
        if item.get("seq", 0) != version:
            return None  # recorded (or resent, or taken by an import) since the read, even at the same time
        item.pop("queued_until", None)
        item.pop("owner", None)
        return item

    def _ordered(self, integration_id: str) -> list[tuple[tuple[str, str], dict]]:
        entities = self._entities.get(integration_id, {})
        return [(key, entities[key]) for kind in _KINDS for key in sorted(k for k in entities if k[0] == kind)]

    @staticmethod
    def _view(kind: str, crm_id: str, item: dict) -> dict:
        return {"kind": kind.lower(), "crm_id": crm_id, **_plain(item)}
