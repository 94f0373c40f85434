"""`StateStore` on DynamoDB: the one module that knows key shapes.

Three tables (names from settings): config and state per stage, quota shared by every stage:

* config — `pk = INTEGRATION#<id>`; `sk = CONFIG` (the integration), `STATUS_MAPPING`, `ATTRIBUTES`,
  `BACKFILL` (the history import job), `TOKENS` (OAuth tokens, `chalicelib.oauth`), `CURSOR#<name>` or
  `CONSOLE_LINK#<link id>` (a console link's token digest, label and time).
* state  — `pk = INTEGRATION#<id>`; `sk = ORDER#<crm id>` or `CONTACT#<crm id>`: per-entity delivery
  state (see `chalicelib.store`); `PRODUCT#<product id>`: products in Metrika's product list;
  `PENDING_UPLOAD#<id>`: an upload waiting for its final status (confirmation reads only these), then
  `UPLOAD_LOG#<sent_at, 12 digits>#<id>`: the final record, time-ordered so the status page reads the last
  few with one query; `CARRIED#<id>#<part>` the entities each carried (apart, so reading uploads stays
  cheap; in parts, so any number fits under 400 KB). Older code kept every upload as `UPLOAD#<id>`
  whatever its status: `pending_uploads` moves those still SENT to `PENDING_UPLOAD#` (see
  `_migrate_uploads`), final ones expire by their TTL. `CUSTOMER#<uniq_id>`: a
  customer's sources, one attribute each (`src:<source id>`), with `sent` and `version`. The CRM rate
  limiter lives in its own partitions: `RATE#<scope>`/`NEXT`.
  `INBOX#<batch id>` (state table): a large webhook body's refs until the worker has expanded them.
* quota  — one table for every stage (`metrika-crm-bridge-quota`): Metrika's limits are per token, so dev
  and prod sharing a token share them. `QUOTA#<key>`/`DAY#<day>` (the day's count `n`, `expires_at` 3
  days after the day) and `LEASE#<key>`/`SLOT#<n>` (an in-flight request until `expires_at`). The
  table's TTL attribute is `expires_at` (Unix seconds) for both.

The low-level client with boto3's type (de)serialisers keeps cold starts cheaper than the resource API.
Every call goes through `_Guarded`, which turns "DynamoDB cannot be reached or throttles us" into
`Unavailable`; anything else (a ValidationException is a bug or bad input) propagates unchanged.
"""
from __future__ import annotations

import copy
import json
import math
import time
from decimal import Decimal
from typing import Any, Callable

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import (ClientError, ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError,
                                 ReadTimeoutError)

from chalicelib.crm import EntityRef
from chalicelib.errors import Unavailable

from . import (BACKFILL_OWNER, CARRIED_TTL, CLAIM_GRACE_SECONDS, LEGACY_ATTRIBUTES, PENDING_UPLOAD_TTL,
               UPLOAD_RECORD_TTL, Hold, check_recent_limit, day_counter_expiry, entity_keys, entity_pairs)
from . import plain as _plain
from . import stored_time as _decimal
from . import summary as _summary

_SER = TypeSerializer()
_DES = TypeDeserializer()

CONFIG = "CONFIG"
STATUS_MAPPING = "STATUS_MAPPING"
ATTRIBUTES = "ATTRIBUTES"
BACKFILL = "BACKFILL"
TOKENS = "TOKENS"  # an installed integration's OAuth tokens (TokenStore)
MISSES_KEPT = 1024  # integration ids read and not found, kept per process (`get_integration`)
INBOX = "INBOX"
CUSTOMER = "CUSTOMER#"
PENDING_UPLOAD = "PENDING_UPLOAD#"
UPLOAD_LOG = "UPLOAD_LOG#"
LEGACY_UPLOAD = "UPLOAD#"  # older code's record of every upload (no begins_with overlap with the two above)
UPLOADS_MOVED = "UPLOADS_MOVED"  # when `_migrate_uploads` first moved an integration's older records
# Older code may still record uploads as `UPLOAD#` for a while after a deploy: a Lambda invocation that
# started before it runs its old code to the end, at most the worker's 300 s (.chalice/config.json). For
# an hour after the first move the older records are looked at again on every read of pending uploads;
# later never.
LEGACY_UPLOAD_GRACE = 3600
# Final records of older code copied into the new time-ordered form when moving, newest first, so the status
# page's last few do not start empty; the rest expire by their TTL (30 days after confirmation).
LEGACY_FINAL_COPIED = 100
SOURCE = "src:"  # a customer item's source attributes
CONSOLE_LINK = "CONSOLE_LINK#"  # config table: a console link's token digest (chalicelib/console_links.py)

_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
_UNAVAILABLE_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException",
                                "RequestLimitExceeded", "InternalServerError", "ServiceUnavailable"})
# Entity keys per CARRIED item: 5,000 of the longest ("contact:" + 19 digits) are ~140 KB, well under
# DynamoDB's 400 KB item limit.
CARRIED_PER_ITEM = 5000
# Batch calls hand back what DynamoDB did not process (throttling): retried with a short backoff, and
# after this many rounds without finishing the store counts as unavailable rather than looping forever.
BATCH_ROUNDS = 8


class _Guarded:
    """The boto3 client, with availability errors mapped to `Unavailable("store", …)` in one place.
    Attribute access mirrors the client (`self._db.update_item(...)`), so the IAM policy test can still
    read the operations this module uses from its source."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, operation: str) -> Callable[..., dict]:
        method = getattr(self._client, operation)

        def call(**kwargs: Any) -> dict:
            try:
                return method(**kwargs)
            except _UNREACHABLE as exc:
                raise Unavailable("store", f"{operation}: {type(exc).__name__}") from exc
            except ClientError as exc:
                code = _code(exc)
                # Any 5xx is DynamoDB failing: one whose body is not DynamoDB's JSON (a load balancer's
                # page) has botocore's code "500", "502", …, not one of the names above.
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                if code in _UNAVAILABLE_CODES or status >= 500:
                    raise Unavailable("store", f"{operation}: {code}") from exc
                raise  # ConditionalCheckFailed (handled by the caller), or a bug / bad input

        return call


class _IfCondition:
    """`_Guarded`, but a write whose ConditionExpression did not hold answers None instead of raising:
    `self._if_db.update_item(...)` is DynamoDB's answer, or None when the condition failed."""

    def __init__(self, db: _Guarded) -> None:
        self._db = db

    def __getattr__(self, operation: str) -> Callable[..., dict | None]:
        method = getattr(self._db, operation)

        def call(**kwargs: Any) -> dict | None:
            try:
                return method(**kwargs)
            except ClientError as exc:
                if _conditional_failed(exc):
                    return None
                raise

        return call


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _conditional_failed(exc: ClientError) -> bool:
    return _code(exc) == "ConditionalCheckFailedException"


def _pk(integration_id: str) -> str:
    return f"INTEGRATION#{integration_id}"


def _entity_sk(kind: str, crm_id: str) -> str:
    return f"{kind.upper()}#{crm_id}"


def _dynamo(value: Any) -> Any:
    """Plain values as the serialiser wants them: floats become Decimal (what `_plain` hands out as a
    float must be writable back, e.g. a `Hold`'s lease time or a fact like a revenue of 12.5)."""
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else value  # NaN/inf: the serialiser refuses
    if isinstance(value, dict):
        return {k: _dynamo(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dynamo(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {_dynamo(v) for v in value}
    return value


def _to_item(values: dict[str, Any]) -> dict:
    """Typed attribute values; None drops the attribute (top level only)."""
    return {k: _SER.serialize(_dynamo(v)) for k, v in values.items() if v is not None}


def _from_item(item: dict | None) -> dict | None:
    if item is None:
        return None
    return _plain({k: _DES.deserialize(v) for k, v in item.items()})


def _console_link(item: dict | None) -> dict:
    assert item is not None
    return {"link_id": item["sk"].removeprefix(CONSOLE_LINK),
            **{k: v for k, v in item.items() if k not in ("pk", "sk")}}

def _uploading_id(sk: str) -> str:
    """The uploading id in an upload's sort key, whichever form: `UPLOAD#<id>`, `PENDING_UPLOAD#<id>`,
    `UPLOAD_LOG#<sent_at>#<id>` (ids may hold `#`: only the form's own separators are cut)."""
    if sk.startswith(UPLOAD_LOG):
        return sk[len(UPLOAD_LOG):].partition("#")[2]
    return sk.partition("#")[2]


def _log_sk(sent_at: int, uploading_id: str) -> str:
    # 12 digits: sent_at is Unix seconds (year 2100 is 10 digits), so string order is time order.
    return f"{UPLOAD_LOG}{int(sent_at):012d}#{uploading_id}"


def _upload(item: dict) -> dict:
    """An upload's record as the protocol hands it out."""
    return {"uploading_id": _uploading_id(item["sk"]), **{k: v for k, v in item.items() if k not in ("pk", "sk")}}


def _entity(item: dict) -> dict:
    data = _from_item(item)
    assert data is not None
    kind, _, crm_id = data.pop("sk").partition("#")
    data.pop("pk")
    return {"kind": kind.lower(), "crm_id": crm_id, **data}


class DynamoStore:
    """`chalicelib.store.StateStore` on two DynamoDB tables. `clock` gives the timestamps merely
    recorded (sent_at, failed_at …); decisions take `now` from the caller."""

    def __init__(self, client: Any, config_table: str, state_table: str, *, quota_table: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = _Guarded(client)
        self._if_db = _IfCondition(self._db)  # conditional writes: None when the condition failed
        self._config = config_table
        self._state = state_table
        self._quota = quota_table
        self._clock = clock
        self._integrations: dict[str, tuple[float, dict]] = {}  # id → (read at, config), see get_integration
        self._misses: dict[str, float] = {}  # id read and not found → read at (at most MISSES_KEPT)
        self._uploads_moved: set[str] = set()  # integrations with no older upload records left (`_migrate_uploads`)
        self._rate_next: dict[str, float] = {}  # scope → the next slot after this process's last (reserve_slot)

    # --- IntegrationStore ----------------------------------------------------------------------------

    def get_integration(self, integration_id: str, *, max_age: float = 0) -> dict | None:
        cached = self._integrations.get(integration_id)
        if max_age and cached and time.monotonic() - cached[0] < max_age:
            return copy.deepcopy(cached[1])  # a caller changing its copy must not change the next one
        # A miss is kept as long as a config would be: a webhook's refusal then costs the same store reads
        # for an unknown id as for a known one with a wrong secret (`Ingest._authenticated`), so its time
        # does not tell an outsider which ids exist. Bounded: random ids must not grow the process.
        missed = self._misses.get(integration_id)
        if max_age and missed is not None and time.monotonic() - missed < max_age:
            return None
        item = self._get(self._config, _pk(integration_id), CONFIG)
        if item is None:
            self._integrations.pop(integration_id, None)
            if len(self._misses) >= MISSES_KEPT:
                self._misses.clear()
            self._misses[integration_id] = time.monotonic()
            return None
        self._misses.pop(integration_id, None)
        self._integrations[integration_id] = (time.monotonic(), item["config"])
        return copy.deepcopy(item["config"])  # the caller's to change; the cached copy stays as read

    def put_integration(self, integration_id: str, config: dict) -> None:
        self._db.put_item(TableName=self._config, Item=_to_item(
            {"pk": _pk(integration_id), "sk": CONFIG, "config": config, "updated_at": self._now()}))
        self._integrations.pop(integration_id, None)  # after the write: a read meanwhile cannot keep the old one
        self._misses.pop(integration_id, None)

    def delete_integration(self, integration_id: str) -> bool:
        pk = _pk(integration_id)
        existed = self._get(self._config, pk, CONFIG) is not None
        # CONFIG first, then the items under it listed (put_console_link relies on this order).
        self._db.delete_item(TableName=self._config, Key=_to_item({"pk": pk, "sk": CONFIG}))
        for table in (self._config, self._state):
            for keys in self._keys_under(table, pk):
                self._db.delete_item(TableName=table, Key=keys)
        self._integrations.pop(integration_id, None)
        self._uploads_moved.discard(integration_id)
        return existed

    def list_integration_ids(self) -> list[str]:
        # A scan: the config table holds a few items per integration, and only scheduled jobs ask.
        return self._integration_ids("sk = :config", {":config": CONFIG})

    def integrations_on_counter(self, counter_id: int) -> list[str]:
        # A scan, like list_integration_ids: admin writes (a config, a status mapping, the catalogue) ask,
        # and a worker's product sync (`shared_counter.counter_products`), when an order names a new product.
        # Strongly consistent: a PUT deciding an id prefix (under the counter's lease) must see a config
        # another PUT wrote a moment before (`shared_counter.saved_with_id_prefix`).
        return self._integration_ids("sk = :config AND #cfg.counter_id = :c", {":config": CONFIG, ":c": counter_id},
                                     names={"#cfg": "config"}, consistent=True)

    def _integration_ids(self, condition: str, values: dict, names: dict | None = None, *,
                         consistent: bool = False) -> list[str]:
        """Ids of the integrations whose config item matches `condition`, sorted (a paged scan)."""
        kwargs: dict[str, Any] = {"TableName": self._config, "FilterExpression": condition, "ProjectionExpression": "pk",
                                  "ExpressionAttributeValues": _to_item(values), "ConsistentRead": consistent}
        if names:
            kwargs["ExpressionAttributeNames"] = names
        ids: list[str] = []
        while True:
            page = self._db.scan(**kwargs)
            ids += [item["pk"]["S"].partition("#")[2] for item in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return sorted(ids)
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def get_status_mapping(self, integration_id: str) -> dict | None:
        item = self._get(self._config, _pk(integration_id), STATUS_MAPPING)
        return {"entries": item["entries"], "pushed_at": item.get("pushed_at")} if item else None

    def put_status_mapping(self, integration_id: str, entries: list[dict], pushed_at: int) -> None:
        self._db.put_item(TableName=self._config, Item=_to_item(
            {"pk": _pk(integration_id), "sk": STATUS_MAPPING, "entries": entries, "pushed_at": pushed_at}))

    def get_attribute_mapping(self, integration_id: str) -> list[dict]:
        item = self._get(self._config, _pk(integration_id), ATTRIBUTES)
        return item["entries"] if item else []

    def put_attribute_mapping(self, integration_id: str, entries: list[dict]) -> None:
        self._db.put_item(TableName=self._config, Item=_to_item(
            {"pk": _pk(integration_id), "sk": ATTRIBUTES, "entries": entries, "updated_at": self._now()}))

    def get_cursor(self, integration_id: str, name: str) -> int | None:
        item = self._get(self._config, _pk(integration_id), f"CURSOR#{name}")
        return item["value"] if item else None

    def put_cursor(self, integration_id: str, name: str, value: int) -> None:
        self._db.put_item(TableName=self._config, Item=_to_item(
            {"pk": _pk(integration_id), "sk": f"CURSOR#{name}", "value": value}))

    # --- EntityStore ---------------------------------------------------------------------------------

    def mark_dirty(self, integration_id: str, ref: EntityRef, *, now: float, lease_seconds: float,
                   future_skew: float) -> bool:
        key = self._entity_key(integration_id, ref.kind, ref.crm_id)
        lease = _decimal(now + lease_seconds)
        # One write in the common case: record the event and take the lease if there is none
        # (if_not_exists), and learn from the old item whether we took it or it was live or expired.
        answer = self._if_db.update_item(
            TableName=self._state, Key=key,
            # `seq` counts what owes a delivery: a delivery that read another count cannot close it.
            UpdateExpression="SET event_time = :t, dirty = :yes, last_action = :a, "
                             "queued_until = if_not_exists(queued_until, :lease) ADD seq :one",
            ConditionExpression="attribute_not_exists(event_time) OR event_time <= :t OR event_time > :future",
            ExpressionAttributeValues=_to_item({":t": ref.event_time, ":yes": True, ":a": ref.action, ":one": 1,
                                                ":lease": lease, ":future": _decimal(now + future_skew)}),
            ReturnValues="ALL_OLD")
        if answer is None:
            return False  # stale: a newer event is already recorded
        held = answer.get("Attributes", {}).get("queued_until")
        if held is None:
            return True  # if_not_exists set our lease
        if Decimal(held["N"]) >= _decimal(now):
            return False  # the pending message covers this change
        # The lease expired: its message was lost (a crash between lease and send). Of all callers that
        # saw this same expired value, the one whose conditional write lands takes it over.
        taken = self._if_db.update_item(TableName=self._state, Key=key, UpdateExpression="SET queued_until = :lease",
                                        ConditionExpression="queued_until = :old",
                                        ExpressionAttributeValues={**_to_item({":lease": lease}), ":old": held})
        return taken is not None

    def release_queue_lease(self, integration_id: str, kind: str, crm_id: str) -> None:
        # conditional: an update would otherwise create an item for an entity that has none
        self._if_db.update_item(TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
                                UpdateExpression="REMOVE queued_until", ConditionExpression="attribute_exists(pk)")

    def claim(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        answer = self._if_db.update_item(
            TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
            UpdateExpression="SET claimed_at = :now REMOVE queued_until, #o", ConditionExpression="attribute_exists(pk)",
            ExpressionAttributeNames={"#o": "owner"}, ExpressionAttributeValues=_to_item({":now": self._now()}),
            ReturnValues="ALL_NEW")
        if answer is None:
            return None  # e.g. the integration was deleted after the message was queued
        return _entity(answer["Attributes"])

    def delivery_states(self, integration_id: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        # One BatchGetItem per 100 keys (strongly consistent): the worker's read before a delivery.
        wanted = {_entity_sk(kind, crm_id): (kind, crm_id) for kind, crm_id in keys}
        found = {}
        for item in self._batch_get(integration_id, list(wanted), None):
            key = wanted.get(item["sk"])
            if key is not None:
                found[key] = {"kind": key[0].lower(), "crm_id": key[1],
                              **{k: v for k, v in item.items() if k not in ("pk", "sk")}}
        return found

    def renew_queue_lease(self, integration_id: str, kind: str, crm_id: str, *, seen: float | None,
                          until: float) -> bool:
        values: dict[str, Any] = {":until": _decimal(until), ":yes": True}
        if seen is None:
            condition = "dirty = :yes AND attribute_not_exists(queued_until)"
        else:
            condition, values[":seen"] = "dirty = :yes AND queued_until = :seen", _decimal(seen)
        return self._if_db.update_item(TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
                                       UpdateExpression="SET queued_until = :until", ConditionExpression=condition,
                                       ExpressionAttributeValues=_to_item(values)) is not None

    def mark_clean(self, integration_id: str, kind: str, crm_id: str, *, event_time: int, content_hash: str,
                   row_hashes: dict[str, str] | None, uploading_id: str | None, last_order: str | None = None,
                   facts: dict | None = None, version: int | None = None) -> bool:
        facts_update = ", facts = :f" if facts is not None else ""
        # None: which rows Metrika holds is unknown, so no stale hashes may survive to skip rows later.
        hashes_update, removed = (", row_hashes = :rh", "") if row_hashes is not None else ("", ", row_hashes")
        return self._finish(integration_id, kind, crm_id, event_time,
                            "SET dirty = :no, content_hash = :h, uploading_id = :u, sent_at = :now, attempts = :zero, "
                            f"last_order = :o{hashes_update}{facts_update} REMOVE last_error, dead_lettered_at{removed}",
                            {":h": content_hash, ":rh": row_hashes, ":u": uploading_id or "", ":zero": 0,
                             ":o": last_order or "", ":f": facts}, version)

    def mark_failed(self, integration_id: str, kind: str, crm_id: str, *, event_time: int, error: dict,
                    version: int | None = None) -> bool:
        # Rows may have gone up before the refusal: the old content hash no longer says what Metrika holds.
        return self._finish(integration_id, kind, crm_id, event_time,
                            "SET dirty = :no, last_error = :e, failed_at = :now REMOVE content_hash, dead_lettered_at",
                            {":e": error}, version)

    def note_attempt(self, integration_id: str, kind: str, crm_id: str, *, attempts: int, error: dict,
                     lease_until: float, row_hashes: dict[str, str] | None = None) -> bool:
        # Partial progress: Metrika now holds some new rows, so the whole-content hash is stale.
        progress = (", row_hashes = :rh", ", content_hash") if row_hashes is not None else ("", "")
        # Only on an entity that still owes a delivery (and never a new item): one delivered meanwhile
        # (a duplicate of the message) must not be left with a lease no message will end.
        return self._if_db.update_item(
            TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
            UpdateExpression=f"SET attempts = :n, last_error = :e, queued_until = :lease{progress[0]} "
                             f"REMOVE dead_lettered_at{progress[1]}", ConditionExpression="dirty = :yes",
            ExpressionAttributeValues=_to_item({":n": attempts, ":e": error, ":lease": _decimal(lease_until),
                                                ":rh": row_hashes, ":yes": True})) is not None

    def forget_content(self, integration_id: str, kind: str, crm_id: str) -> None:
        # conditional: an update would otherwise create an item for an entity that has none
        self._if_db.update_item(TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
                                UpdateExpression="REMOVE content_hash, last_order, row_hashes",
                                ConditionExpression="attribute_exists(pk)")

    def get_entity(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        item = self._db.get_item(TableName=self._state, ConsistentRead=True,
                                 Key=self._entity_key(integration_id, kind, crm_id)).get("Item")
        return _entity(item) if item else None

    def list_entities(self, integration_id: str) -> list[dict]:
        return [_entity(i) for prefix in ("ORDER#", "CONTACT#")
                for i in self._query(self._state, _pk(integration_id), begins_with=prefix)]

    def stuck_entities(self, integration_id: str, *, now: float) -> list[dict]:
        # A filtered query still reads the whole partition; fine for a periodic sweep.
        # A hold's lease is its queued_until, so "no live lease" covers "not held by a live import".
        live = {"FilterExpression": "dirty = :yes AND (attribute_not_exists(queued_until) OR queued_until < :now) "
                                    "AND (attribute_not_exists(claimed_at) OR claimed_at < :claimed) "
                                    "AND attribute_not_exists(dead_lettered_at)",
                "ExpressionAttributeValues": _to_item({":yes": True, ":now": _decimal(now),
                                                       ":claimed": _decimal(now - CLAIM_GRACE_SECONDS)})}
        return [_entity(i) for prefix in ("ORDER#", "CONTACT#")
                for i in self._query(self._state, _pk(integration_id), begins_with=prefix, **live)]

    def existing_entities(self, integration_id: str, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(k.lower(), c) for k, _, c in (i["sk"].partition("#") for i in
                self._batch_get(integration_id, [_entity_sk(kind, crm_id) for kind, crm_id in keys], "sk"))}

    def content_hashes(self, integration_id: str, kind: str, crm_ids: list[str]) -> dict[str, str]:
        return {i["sk"].partition("#")[2]: i["content_hash"]
                for i in self._batch_get(integration_id, [_entity_sk(kind, c) for c in crm_ids], "sk, content_hash")
                if i.get("content_hash")}

    def delivered_versions(self, integration_id: str, kind: str, crm_ids: list[str]) -> dict[str, dict]:
        # One BatchGetItem per 100 ids, only the attributes the answer needs (`owner` is a reserved word).
        items = self._batch_get(integration_id, [_entity_sk(kind, c) for c in crm_ids],
                                "sk, event_time, dirty, content_hash, #o", names={"#o": "owner"})
        return {i["sk"].partition("#")[2]: {"event_time": int(i.get("event_time") or 0), "content_hash": i["content_hash"]}
                for i in items if not i.get("dirty") and i.get("content_hash") and not i.get("owner")}

    def mark_resend(self, integration_id: str, kind: str, crm_id: str) -> int | None:
        # conditional: an update would otherwise create an item for an entity that has none
        answer = self._if_db.update_item(
            TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
            # queued_until 0: a lease that has run out, which the caller's mark_dirty takes over
            UpdateExpression="SET dirty = :yes, row_hashes = :none, queued_until = if_not_exists(queued_until, :out) "
                             "REMOVE content_hash, #o ADD seq :one",
            ConditionExpression="attribute_exists(pk)", ExpressionAttributeNames={"#o": "owner"},
            ExpressionAttributeValues=_to_item({":yes": True, ":none": {}, ":out": _decimal(0), ":one": 1}),
            ReturnValues="ALL_NEW")
        if answer is None:
            return None
        return int(_entity(answer["Attributes"]).get("event_time") or 0)

    def mark_dead_lettered(self, integration_id: str, kind: str, crm_id: str) -> bool:
        # conditional: only an entity that owes a delivery (and never a new item)
        answer = self._if_db.update_item(
            TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
            UpdateExpression="SET dead_lettered_at = :now", ConditionExpression="dirty = :yes",
            ExpressionAttributeValues=_to_item({":now": self._now(), ":yes": True}))
        return answer is not None

    def clear_dead_lettered(self, integration_id: str, kind: str, crm_id: str) -> None:
        # conditional: an absent flag (or entity) is left as it is, and no item is created
        self._if_db.update_item(TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
                                UpdateExpression="REMOVE dead_lettered_at",
                                ConditionExpression="attribute_exists(dead_lettered_at)")

    def note_contacts_sent(self, integration_id: str, content_hashes: dict[str, str]) -> None:
        for crm_id, content_hash in content_hashes.items():
            self._if_db.update_item(
                TableName=self._state, Key=self._entity_key(integration_id, "contact", crm_id),
                # A contact first seen here gets event time 0: any real change of it is newer.
                UpdateExpression="SET content_hash = :h, event_time = if_not_exists(event_time, :zero), "
                                 "dirty = if_not_exists(dirty, :no)",
                ConditionExpression="attribute_not_exists(pk) OR (dirty = :no AND attribute_not_exists(#o))",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues=_to_item({":h": content_hash, ":no": False, ":zero": 0}))

    # --- UploadStore ---------------------------------------------------------------------------------

    def record_upload(self, integration_id: str, uploading_id: str, *, kind: str, rows: int,
                      entities: list[tuple[str, str]] = ()) -> None:
        # The entities first: a pending upload always has its entity list (a crash in between leaves only
        # an orphan list, which expires).
        now = self._now()
        keys = entity_keys(entities)
        for part, start in enumerate(range(0, len(keys), CARRIED_PER_ITEM)):
            self._db.put_item(TableName=self._state, Item=_to_item({
                "pk": _pk(integration_id), "sk": f"CARRIED#{uploading_id}#{part}",
                "entities": keys[start:start + CARRIED_PER_ITEM], "expires_at": now + CARRIED_TTL}))
        self._db.put_item(TableName=self._state, Item=_to_item({
            "pk": _pk(integration_id), "sk": f"{PENDING_UPLOAD}{uploading_id}", "kind": kind, "rows": rows,
            "status": "SENT", "sent_at": now, "expires_at": now + PENDING_UPLOAD_TTL}))

    def uploads(self, integration_id: str) -> list[dict]:
        found: dict[str, dict] = {}
        for prefix in (LEGACY_UPLOAD, UPLOAD_LOG, PENDING_UPLOAD):  # a later form wins over an earlier one
            for item in map(_from_item, self._query(self._state, _pk(integration_id), begins_with=prefix)):
                if item is not None:
                    found[_uploading_id(item["sk"])] = _upload(item)
        return [found[uploading_id] for uploading_id in sorted(found)]

    def pending_uploads(self, integration_id: str) -> list[dict]:
        self._migrate_uploads(integration_id)
        items = self._query(self._state, _pk(integration_id), begins_with=PENDING_UPLOAD)
        return sorted((_upload(i) for i in map(_from_item, items) if i is not None),
                      key=lambda u: (u["sent_at"], u["uploading_id"]))

    def recent_uploads(self, integration_id: str, *, limit: int) -> list[dict]:
        check_recent_limit(limit)
        if limit == 0:
            return []  # DynamoDB refuses a Limit of 0
        # One page, newest first: `limit` small records are far below a query page's 1 MB. ScanIndexForward
        # false reads the partition's items in reverse sort-key order, strings in UTF-8 byte order ("Query",
        # https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_Query.html), so the 12-digit
        # sent_at in the key makes it newest first, and Limit stops the read after `limit` items.
        page = self._db.query(TableName=self._state, KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
                              ExpressionAttributeValues=_to_item({":pk": _pk(integration_id), ":prefix": UPLOAD_LOG}),
                              ScanIndexForward=False, Limit=limit)
        return [_upload(i) for i in map(_from_item, page.get("Items", [])) if i is not None]

    def upload_entities(self, integration_id: str, uploading_id: str) -> list[tuple[str, str]]:
        items = self._query(self._state, _pk(integration_id), begins_with=f"CARRIED#{uploading_id}#")
        return entity_pairs(key for item in map(_from_item, items) if item for key in item.get("entities", []))

    def confirm_upload(self, integration_id: str, uploading_id: str, status: str, elements_count: int | None, *,
                       resent: int | None = None) -> None:
        pk = _pk(integration_id)
        pending = self._get(self._state, pk, f"{PENDING_UPLOAD}{uploading_id}")
        if pending is None:
            return  # not pending: unknown, or confirmed already
        now = self._now()
        # Three steps, each safe to stop after: (1) the final record, keyed by the pending one's sent_at, so
        # confirming again writes the same item; (2) no longer pending; (3) its entities dropped (an
        # orphan list expires). Until (2) the upload is pending with its whole list, so the next run
        # confirms it again. UpdateItem, not PutItem: the API handler's confirm route may write it, and
        # its role has no PutItem on the state table.
        record = {"kind": pending.get("kind"), "rows": pending.get("rows"), "sent_at": pending["sent_at"],
                  "status": status, "elements_count": elements_count or 0, "confirmed_at": now,
                  "expires_at": now + UPLOAD_RECORD_TTL, "resent": resent}
        self._upsert(pk, _log_sk(pending["sent_at"], uploading_id), record)
        self._db.delete_item(TableName=self._state, Key=_to_item({"pk": pk, "sk": f"{PENDING_UPLOAD}{uploading_id}"}))
        for item in self._query(self._state, pk, projection="pk, sk", begins_with=f"CARRIED#{uploading_id}#"):
            self._db.delete_item(TableName=self._state, Key={"pk": item["pk"], "sk": item["sk"]})

    def _upsert(self, pk: str, sk: str, values: dict) -> None:
        """Write these attributes (None ones left out) into the item, created if absent."""
        values = {k: v for k, v in values.items() if v is not None}
        names = {f"#a{i}": name for i, name in enumerate(values)}
        self._db.update_item(TableName=self._state, Key=_to_item({"pk": pk, "sk": sk}),
                             UpdateExpression="SET " + ", ".join(f"#a{i} = :a{i}" for i in range(len(values))),
                             ExpressionAttributeNames=names,
                             ExpressionAttributeValues=_to_item({f":a{i}": v for i, v in enumerate(values.values())}))

    def _migrate_uploads(self, integration_id: str) -> None:
        """Move the uploads older code recorded as `UPLOAD#<id>`: each still SENT becomes pending (then its
        old record is deleted), and the newest LEGACY_FINAL_COPIED final ones are copied into the
        time-ordered form for the status page (their old records expire by their TTL). Every step can be
        repeated: a crash between them leaves an old record that the next read moves again (the pending
        record is written before the old one goes, so an upload is never lost between them). The marker
        `UPLOADS_MOVED` is written last; older records are looked for until LEGACY_UPLOAD_GRACE after it,
        then never (remembered by this store object, so a warm Lambda saves even the marker's read)."""
        if integration_id in self._uploads_moved:
            return
        pk = _pk(integration_id)
        now = self._now()
        marker = self._get(self._state, pk, UPLOADS_MOVED)
        if marker is not None and marker["moved_at"] + LEGACY_UPLOAD_GRACE < now:
            self._uploads_moved.add(integration_id)
            return
        legacy = [i for i in map(_from_item, self._query(self._state, pk, begins_with=LEGACY_UPLOAD)) if i is not None]
        if marker is None:  # the first move only: a re-read within the grace finds the same final ones
            final = sorted((i for i in legacy if i.get("status") != "SENT"),
                           key=lambda i: (i.get("sent_at", 0), i["sk"]), reverse=True)
            for item in final[:LEGACY_FINAL_COPIED]:
                self._upsert(pk, _log_sk(item.get("sent_at", 0), _uploading_id(item["sk"])),
                             {k: v for k, v in item.items() if k not in ("pk", "sk")})
        for item in legacy:
            if item.get("status") == "SENT":
                self._upsert(pk, f"{PENDING_UPLOAD}{_uploading_id(item['sk'])}",
                             {**{k: v for k, v in item.items() if k not in ("pk", "sk")},
                              "expires_at": now + PENDING_UPLOAD_TTL})
                self._db.delete_item(TableName=self._state, Key=_to_item({"pk": pk, "sk": item["sk"]}))
        if marker is None:
            self._upsert(pk, UPLOADS_MOVED, {"moved_at": now})

    # --- ProductStore --------------------------------------------------------------------------------

    def products(self, integration_id: str) -> dict[str, str]:
        return {i["sk"].partition("#")[2]: i.get("humanized", "")
                for i in map(_from_item, self._query(self._state, _pk(integration_id), begins_with="PRODUCT#"))
                if i is not None}

    def put_products(self, integration_id: str, names: dict[str, str]) -> None:
        self._write_all([{"PutRequest": {"Item": _to_item({"pk": _pk(integration_id), "sk": f"PRODUCT#{p}",
                                                            "humanized": n})}} for p, n in names.items()])

    # --- CustomerStore -------------------------------------------------------------------------------

    def customers(self, integration_id: str, uniq_ids: list[str]) -> dict[str, dict]:
        records = {}
        for item in self._batch_get(integration_id, [f"{CUSTOMER}{u}" for u in uniq_ids], None):
            records[item["sk"][len(CUSTOMER):]] = {
                "sources": {k[len(SOURCE):]: v for k, v in item.items() if k.startswith(SOURCE)},
                "sent": item.get("sent"), "version": item.get("version", 0)}
        return records

    def record_customer(self, integration_id: str, uniq_id: str, *, put: dict[str, dict], drop: list[str],
                        sent: str | None, version: int) -> bool:
        # One attribute per source, each set or removed by its own path: the write names only the sources
        # this delivery read. The version condition makes it all-or-nothing against a concurrent delivery.
        names = {"#v": "version", "#sent": "sent"}
        values: dict[str, Any] = {":next": version + 1, ":seen": version}
        sets, removes = ["#v = :next"], []
        for i, (sid, part) in enumerate(sorted(put.items())):
            names[f"#p{i}"], values[f":p{i}"] = SOURCE + sid, part
            sets.append(f"#p{i} = :p{i}")
        for i, sid in enumerate(sorted(set(drop) - set(put))):
            names[f"#d{i}"] = SOURCE + sid
            removes.append(f"#d{i}")
        if sent is None:
            removes.append("#sent")
        else:
            values[":sent"] = sent
            sets.append("#sent = :sent")
        condition = "attribute_not_exists(#v)" if version == 0 else "#v = :seen"
        if version == 0:
            values.pop(":seen")
        return self._if_db.update_item(
            TableName=self._state, Key=_to_item({"pk": _pk(integration_id), "sk": f"{CUSTOMER}{uniq_id}"}),
            UpdateExpression="SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else ""),
            ConditionExpression=condition, ExpressionAttributeNames=names,
            ExpressionAttributeValues=_to_item(values)) is not None

    # --- QuotaStore ----------------------------------------------------------------------------------

    def reserve_slot(self, scope: str, interval: float, now: float) -> float:
        key = _to_item({"pk": f"RATE#{scope}", "sk": "NEXT"})
        # A refused conditional write is billed as a write: when this process's own last slot for the
        # scope still lies ahead (the next request of one CRM read, a few ms later), the scope is busy,
        # so the busy path goes first and the usual case costs one write, not two.
        if self._rate_next.get(scope, 0.0) > now:
            slot = self._reserve_busy(key, interval, now)
            if slot is not None:
                self._rate_next[scope] = slot + interval
                return slot
        if self._if_db.update_item(TableName=self._state, Key=key, UpdateExpression="SET next_at = :next",
                                   ConditionExpression="attribute_not_exists(next_at) OR next_at <= :now",
                                   ExpressionAttributeValues=_to_item({":next": _decimal(now + interval),
                                                                       ":now": _decimal(now)})) is not None:
            self._rate_next[scope] = now + interval  # idle: the slot is now
            return now
        busy = self._db.update_item(TableName=self._state, Key=key, UpdateExpression="SET next_at = next_at + :i",
                                    ExpressionAttributeValues=_to_item({":i": _decimal(interval)}),
                                    ReturnValues="UPDATED_NEW")
        slot = float(busy["Attributes"]["next_at"]["N"]) - interval
        self._rate_next[scope] = slot + interval
        return slot

    def _reserve_busy(self, key: dict, interval: float, now: float) -> float | None:
        """The slot after the scope's next one, if the scope is busy (its next slot after `now`); None
        when it is idle (the idle path then decides)."""
        busy = self._if_db.update_item(TableName=self._state, Key=key, UpdateExpression="SET next_at = next_at + :i",
                                       ConditionExpression="next_at > :now",
                                       ExpressionAttributeValues=_to_item({":i": _decimal(interval),
                                                                           ":now": _decimal(now)}),
                                       ReturnValues="UPDATED_NEW")
        if busy is None:
            return None
        return float(busy["Attributes"]["next_at"]["N"]) - interval

    def count_request(self, quota_key: str, day: str, budget: int) -> int | None:
        answer = self._if_db.update_item(
            TableName=self._quota, Key=_to_item({"pk": f"QUOTA#{quota_key}", "sk": f"DAY#{day}"}),
            UpdateExpression="ADD n :one SET expires_at = :exp",
            ConditionExpression="attribute_not_exists(n) OR n < :budget",
            ExpressionAttributeValues=_to_item({":one": 1, ":budget": budget, ":exp": day_counter_expiry(day)}),
            ReturnValues="UPDATED_NEW")
        if answer is None:
            return None
        return int(answer["Attributes"]["n"]["N"])

    def requests_on(self, quota_key: str, day: str) -> int:
        item = self._get(self._quota, f"QUOTA#{quota_key}", f"DAY#{day}")
        return item["n"] if item else 0

    def acquire_lease(self, scope: str, slots: int, owner: str, now: float, ttl: float) -> int | None:
        for slot in range(slots):
            if self._if_db.put_item(
                    TableName=self._quota, Item=_to_item({"pk": f"LEASE#{scope}", "sk": f"SLOT#{slot}", "owner": owner,
                                                          "expires_at": _decimal(now + ttl)}),
                    ConditionExpression="attribute_not_exists(expires_at) OR expires_at < :now",
                    ExpressionAttributeValues=_to_item({":now": _decimal(now)})) is not None:
                return slot
        return None

    def release_lease(self, scope: str, slot: int, owner: str) -> None:
        # conditional: a slot that expired and was taken over is not ours to free
        self._if_db.delete_item(TableName=self._quota, Key=_to_item({"pk": f"LEASE#{scope}", "sk": f"SLOT#{slot}"}),
                                ConditionExpression="#o = :owner", ExpressionAttributeNames={"#o": "owner"},
                                ExpressionAttributeValues=_to_item({":owner": owner}))

    # --- CrmAccountStore -----------------------------------------------------------------------------

    def get_crm_account(self, scope: str) -> dict | None:
        item = self._get(self._state, f"ACCOUNT#{scope}", "INFO")
        return item["account"] if item else None

    def put_crm_account(self, scope: str, account: dict) -> None:
        # UpdateItem, not PutItem: the API reads accounts too (a reconciliation by route compares deals as
        # translated), and the API's role holds no PutItem on the state table, where a PutItem could
        # replace any entity's state.
        self._db.update_item(TableName=self._state, Key=_to_item({"pk": f"ACCOUNT#{scope}", "sk": "INFO"}),
                             UpdateExpression="SET account = :account, updated_at = :now",
                             ExpressionAttributeValues=_to_item({":account": account, ":now": self._now()}))

    def expire_crm_account(self, scope: str) -> None:
        # One UpdateItem, no read: a delivery keeping a fresh read in between is not overwritten with old facts.
        self._if_db.update_item(TableName=self._state, Key=_to_item({"pk": f"ACCOUNT#{scope}", "sk": "INFO"}),
                                UpdateExpression="SET account.read_at = :zero",
                                ConditionExpression="attribute_exists(pk)",
                                ExpressionAttributeValues=_to_item({":zero": 0}))

    # --- ImportStore ---------------------------------------------------------------------------------

    def get_backfill(self, integration_id: str) -> dict | None:
        item = self._get(self._config, _pk(integration_id), BACKFILL)
        return item["job"] if item else None

    def put_backfill(self, integration_id: str, job: dict, *, expect_run: str | None = None) -> bool:
        kwargs: dict[str, Any] = {}
        if expect_run is not None:
            kwargs = {"ConditionExpression": "job.run_id = :run AND job.#s = :running",
                      "ExpressionAttributeNames": {"#s": "state"},
                      "ExpressionAttributeValues": _to_item({":run": expect_run, ":running": "running"})}
        return self._if_db.put_item(TableName=self._config, Item=_to_item(
            {"pk": _pk(integration_id), "sk": BACKFILL, "job": job}), **kwargs) is not None

    def take_for_backfill(self, integration_id: str, kind: str, crm_id: str, event_time: int, content_hash: str, *,
                          absent: bool = False, now: float, lease_seconds: float) -> Hold | None:
        key = {"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)}
        lease = _decimal(now + lease_seconds)
        if absent:
            item = _to_item({**key, "event_time": event_time, "dirty": True, "queued_until": lease,
                             "last_action": "backfill", "owner": BACKFILL_OWNER, "seq": 1})
            if self._if_db.put_item(TableName=self._state, Item=item,
                                    ConditionExpression="attribute_not_exists(pk)") is not None:
                return self._hold(integration_id, item)
            # a webhook wrote meanwhile: the update below decides
        answer = self._if_db.update_item(
            TableName=self._state, Key=_to_item(key),
            UpdateExpression="SET event_time = :t, dirty = :yes, queued_until = :lease, last_action = :a, "
                             "#o = :owner ADD seq :one",
            ConditionExpression="attribute_not_exists(event_time) OR (#o = :owner AND event_time <= :t) OR "
                                "(dirty = :no AND event_time < :t AND (attribute_not_exists(content_hash) "
                                "OR content_hash <> :h))",
            ExpressionAttributeNames={"#o": "owner"},
            ExpressionAttributeValues=_to_item({":t": event_time, ":yes": True, ":no": False, ":a": "backfill",
                                                ":owner": BACKFILL_OWNER, ":h": content_hash, ":lease": lease,
                                                ":one": 1}),
            ReturnValues="ALL_NEW")
        if answer is None:
            return None
        return self._hold(integration_id, answer["Attributes"])

    def release_backfilled(self, hold: Hold, *, content_hash: str | None, row_hashes: dict[str, str] | None = None,
                           uploading_id: str | None, last_order: str | None, facts: dict | None,
                           error: dict | None = None) -> bool:
        # One conditional put of the whole item rather than an update: while the hold is unchanged (same
        # event time, still ours) no other writer has touched the item, and a put is the cheapest
        # conditional write (an import makes one per entity).
        now = self._now()
        state = {k: v for k, v in hold.state.items()
                 if k not in ("kind", "crm_id", "owner", "queued_until", "dead_lettered_at", *LEGACY_ATTRIBUTES)}
        if error is not None:
            state.update(last_error=error, failed_at=now)
            state.pop("content_hash", None)
        else:
            state.pop("last_error", None)
            state.pop("row_hashes", None)  # hashes of other content would let a later retry skip rows wrongly
            state.update(content_hash=content_hash, row_hashes=row_hashes, uploading_id=uploading_id or "",
                         sent_at=now, attempts=0, last_order=last_order or "")
            if facts is not None:
                state["facts"] = facts
        state["dirty"] = False
        state["seq"] = int(hold.state.get("seq") or 0) + 1  # a delivery that read the held state cannot close it
        item = _to_item({"pk": _pk(hold.integration_id), "sk": _entity_sk(hold.kind, hold.crm_id), **state})
        # Refused: a newer event came meanwhile (or a worker claimed it). The entity stays dirty and held
        # until the caller's message is claimed, so a crash before queueing leaves it to the stuck sweep
        # once the hold's lease expires, or to the next run of the import.
        # `seq` as held: nothing recorded since, not even in the hold's own second (a webhook then stays
        # the live path's to deliver), and the put's seq is then one no delivery can have read.
        held_seq = int(hold.state.get("seq") or 0)
        return self._if_db.put_item(TableName=self._state, Item=item,
                                    ConditionExpression="event_time = :seen AND #o = :owner AND "
                                                        + ("seq = :seq" if held_seq else "attribute_not_exists(seq)"),
                                    ExpressionAttributeNames={"#o": "owner"},
                                    ExpressionAttributeValues=_to_item({":seen": hold.event_time, ":owner": hold.owner,
                                                                        ":seq": held_seq or None})) is not None

    # --- InboxStore ----------------------------------------------------------------------------------

    def put_inbox(self, integration_id: str, batches: dict[str, list[EntityRef]], *, now: float) -> None:
        # One BatchWriteItem for up to 25 batches: a mass action costs one round trip, not one per entity.
        self._write_all([{"PutRequest": {"Item": _to_item({
            "pk": _pk(integration_id), "sk": f"{INBOX}#{batch_id}", "recorded_at": _decimal(now), "entities": len(refs),
            "refs": json.dumps([[r.kind, r.crm_id, int(r.event_time), r.action] for r in refs], separators=(",", ":"))})}}
            for batch_id, refs in batches.items()])

    def get_inbox(self, integration_id: str, batch_id: str) -> list[EntityRef] | None:
        item = self._get(self._state, _pk(integration_id), f"{INBOX}#{batch_id}")
        if item is None:
            return None
        return [EntityRef(kind, crm_id, int(event_time), action) for kind, crm_id, event_time, action in json.loads(item["refs"])]

    def delete_inbox(self, integration_id: str, batch_ids: list[str]) -> None:
        self._write_all([{"DeleteRequest": {"Key": _to_item({"pk": _pk(integration_id), "sk": f"{INBOX}#{batch_id}"})}}
                         for batch_id in dict.fromkeys(batch_ids)])

    def stale_inbox(self, integration_id: str, *, before: float) -> list[str]:
        items = self._query(self._state, _pk(integration_id), projection="sk, recorded_at", begins_with=f"{INBOX}#",
                            FilterExpression="recorded_at < :before",
                            ExpressionAttributeValues=_to_item({":before": _decimal(before)}))
        stale = sorted((i["recorded_at"], i["sk"].partition("#")[2]) for i in map(_from_item, items) if i is not None)
        return [batch_id for _, batch_id in stale]

    def _write_all(self, requests: list[dict]) -> None:
        """BatchWriteItem in groups of 25 (its limit); what DynamoDB hands back unprocessed is sent again."""
        for start in range(0, len(requests), 25):
            pending: dict | None = {self._state: requests[start:start + 25]}
            for attempt in range(BATCH_ROUNDS):
                if attempt:
                    _backoff(attempt)
                pending = self._db.batch_write_item(RequestItems=pending).get("UnprocessedItems") or None
                if not pending:
                    break
            else:
                raise Unavailable("store", "batch_write_item: items left unprocessed")

    # --- ConsoleStore --------------------------------------------------------------------------------

    def put_console_link(self, integration_id: str, link_id: str, link: dict) -> bool:
        key = {"pk": _pk(integration_id), "sk": CONSOLE_LINK + link_id}
        self._db.put_item(TableName=self._config, Item=_to_item({**key, **link}))
        # Checked after the put: delete_integration removes CONFIG first and only then lists the items to
        # delete (a consistent Query), so either that list holds this link, or CONFIG is gone by now.
        if self._get(self._config, key["pk"], CONFIG) is None:
            self._db.delete_item(TableName=self._config, Key=_to_item(key))
            return False
        return True

    def get_console_link(self, integration_id: str, link_id: str) -> dict | None:
        # The authorizer's one read per link token (then cached): GetItem on the config table.
        item = self._get(self._config, _pk(integration_id), CONSOLE_LINK + link_id)
        return _console_link(item) if item else None

    def console_links(self, integration_id: str) -> list[dict]:
        return [_console_link(_from_item(i)) for i in self._query(self._config, _pk(integration_id),
                                                                 begins_with=CONSOLE_LINK)]

    def delete_console_link(self, integration_id: str, link_id: str) -> bool:
        answer = self._db.delete_item(TableName=self._config, ReturnValues="ALL_OLD",
                                      Key=_to_item({"pk": _pk(integration_id), "sk": CONSOLE_LINK + link_id}))
        return "Attributes" in answer

    def console_entities(self, integration_id: str, *, limit: int) -> tuple[list[dict], bool]:
        items, complete = self._bounded_entities(integration_id, limit, "sk, #dirty, #error, #facts, #sent",
                                                 {"#dirty": "dirty", "#error": "last_error", "#facts": "facts",
                                                  "#sent": "sent_at"})
        entities = []
        for item in items:
            kind, _, crm_id = item.pop("sk").partition("#")
            entities.append({"kind": kind.lower(), "crm_id": crm_id, **item})
        return entities, complete

    def entity_summary(self, integration_id: str, *, limit: int) -> dict:
        items, complete = self._bounded_entities(integration_id, limit,
                                                 "dirty, attempts, last_error, dead_lettered_at, sent_at")
        return _summary(items, complete=complete)

    def _bounded_entities(self, integration_id: str, limit: int, projection: str,
                          names: dict | None = None) -> tuple[list[dict], bool]:
        # At most `limit` items read (Query's Limit counts items read), only the projected attributes.
        items: list[dict] = []
        complete = True
        for prefix in ("ORDER#", "CONTACT#"):
            kwargs: dict[str, Any] = {
                "TableName": self._state, "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
                "ExpressionAttributeValues": _to_item({":pk": _pk(integration_id), ":prefix": prefix}),
                "ProjectionExpression": projection, **({"ExpressionAttributeNames": names} if names else {})}
            while True:
                if len(items) >= limit:
                    page = self._db.query(**{**kwargs, "Limit": 1})
                    complete = complete and not page.get("Items")
                    break
                page = self._db.query(**{**kwargs, "Limit": limit - len(items)})
                items += [_from_item(i) for i in page.get("Items", [])]
                if "LastEvaluatedKey" not in page:
                    break
                kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return items, complete

    # --- TokenStore ----------------------------------------------------------------------------------

    def get_tokens(self, integration_id: str) -> dict | None:
        item = self._get(self._config, _pk(integration_id), TOKENS)
        if item is None:
            return None
        item.pop("pk"), item.pop("sk")
        return item

    def put_tokens(self, integration_id: str, tokens: dict) -> int:
        return self._store_pair(integration_id, tokens, None)  # type: ignore[return-value]

    def take_refresh_lease(self, integration_id: str, *, version: int, owner: str, now: float, until: float) -> bool:
        return self._update_tokens(
            integration_id, "SET refreshing_until = :until, lease_owner = :owner",
            "version = :v AND (attribute_not_exists(refreshing_until) OR refreshing_until < :now)",
            {":v": version, ":now": _decimal(now), ":until": _decimal(until), ":owner": owner}) is not None

    def finish_refresh(self, integration_id: str, *, version: int, tokens: dict) -> bool:
        return self._store_pair(integration_id, tokens, version) is not None

    def release_refresh(self, integration_id: str, *, version: int, owner: str, failure: dict | None) -> bool:
        update = "REMOVE refreshing_until, lease_owner" + (" SET failure = :failure" if failure is not None else "")
        return self._update_tokens(integration_id, update, "version = :v AND lease_owner = :owner",
                                   {":v": version, ":owner": owner, ":failure": failure}) is not None

    def _store_pair(self, integration_id: str, tokens: dict, expect_version: int | None) -> int | None:
        """Set the pair's fields, version + 1 and refreshed_at; drop lease and failure. With
        `expect_version`, only at that version (None when it moved on)."""
        tokens = {k: v for k, v in tokens.items() if v is not None}
        names = {f"#t{i}": name for i, name in enumerate(tokens)}
        values = {f":t{i}": value for i, value in enumerate(tokens.values())}
        sets = ", ".join(f"#t{i} = :t{i}" for i in range(len(tokens)))
        update = (f"SET {sets + ', ' if sets else ''}version = if_not_exists(version, :zero) + :one, refreshed_at = :at "
                  "REMOVE refreshing_until, lease_owner, failure")
        answer = self._update_tokens(integration_id, update, "version = :v" if expect_version is not None else None,
                                     {**values, ":zero": 0, ":one": 1, ":at": self._now(), ":v": expect_version},
                                     names=names)
        return None if answer is None else int(answer["Attributes"]["version"]["N"])

    def _update_tokens(self, integration_id: str, update: str, condition: str | None, values: dict,
                       names: dict | None = None) -> dict | None:
        """One UpdateItem on the tokens item; None when its condition failed. Values that are None are
        left out (a placeholder the expressions do not use must not be sent)."""
        kwargs: dict[str, Any] = {"TableName": self._config, "Key": _to_item({"pk": _pk(integration_id), "sk": TOKENS}),
                                  "UpdateExpression": update, "ExpressionAttributeValues": _to_item(values),
                                  "ReturnValues": "UPDATED_NEW"}
        if condition:
            kwargs["ConditionExpression"] = condition
        if names:
            kwargs["ExpressionAttributeNames"] = names
        return self._if_db.update_item(**kwargs)

    # --- helpers -------------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    @staticmethod
    def _entity_key(integration_id: str, kind: str, crm_id: str) -> dict:
        return _to_item({"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)})

    @staticmethod
    def _hold(integration_id: str, item: dict) -> Hold:
        """Plain values only: callers never see DynamoDB's typed form."""
        state = _entity(item)
        return Hold(integration_id=integration_id, kind=state["kind"], crm_id=state["crm_id"],
                    event_time=state["event_time"], owner=state["owner"], state=state)

    def _finish(self, integration_id: str, kind: str, crm_id: str, event_time: int, update: str,
                values: dict, version: int | None) -> bool:
        names: dict[str, str] = {}
        if version is None:
            # A lease taken since the claim means an event was recorded meanwhile, perhaps with the
            # same time: its own message is on the way, so this delivery must not close the entity.
            condition = "event_time = :seen AND attribute_not_exists(queued_until)"
        else:
            # Read, not claimed: nothing that owes a delivery was written since the read (`seq`, which
            # every event, resend and import hold counts, even at the same event time). The lease and
            # a hold are this delivery's to end: the next event takes a new lease and queues.
            condition = "event_time = :seen AND " + ("seq = :seq" if version else "attribute_not_exists(seq)")
            values = {**values, ":seq": version or None}
            update = update.replace(" REMOVE ", " REMOVE queued_until, #o, ", 1)
            names["#o"] = "owner"
        answer = self._if_db.update_item(
            TableName=self._state, Key=self._entity_key(integration_id, kind, crm_id),
            UpdateExpression=update, ConditionExpression=condition, **({"ExpressionAttributeNames": names} if names else {}),
            # _to_item drops None values: a placeholder the update does not use must not be sent
            ExpressionAttributeValues=_to_item({**values, ":seen": event_time, ":no": False, ":now": self._now()}))
        return answer is not None

    def _batch_get(self, integration_id: str, sort_keys: list[str], projection: str | None,
                   names: dict[str, str] | None = None) -> list[dict]:
        items: list[dict] = []
        unique = list(dict.fromkeys(sort_keys))
        for start in range(0, len(unique), 100):  # BatchGetItem takes at most 100 keys
            keys = [_to_item({"pk": _pk(integration_id), "sk": sk}) for sk in unique[start:start + 100]]
            request: dict | None = {self._state: {"Keys": keys, "ConsistentRead": True,
                                                  **({"ProjectionExpression": projection} if projection else {}),
                                                  **({"ExpressionAttributeNames": names} if names else {})}}
            for attempt in range(BATCH_ROUNDS):
                if attempt:
                    _backoff(attempt)
                answer = self._db.batch_get_item(RequestItems=request)
                items += [_from_item(i) for i in answer.get("Responses", {}).get(self._state, [])]
                request = answer.get("UnprocessedKeys") or None
                if not request:
                    break
            else:
                raise Unavailable("store", "batch_get_item: keys left unprocessed")
        return items

    def _get(self, table: str, pk: str, sk: str) -> dict | None:
        return _from_item(self._db.get_item(TableName=table, Key=_to_item({"pk": pk, "sk": sk}),
                                            ConsistentRead=True).get("Item"))

    def _query(self, table: str, pk: str, projection: str | None = None, begins_with: str | None = None,
               **filtered: Any) -> list[dict]:
        values = {":pk": pk, **({":prefix": begins_with} if begins_with else {})}
        kwargs: dict[str, Any] = {
            "TableName": table,
            "KeyConditionExpression": "pk = :pk" + (" AND begins_with(sk, :prefix)" if begins_with else ""),
            **filtered, "ExpressionAttributeValues": {**_to_item(values), **filtered.get("ExpressionAttributeValues", {})}}
        if projection:
            kwargs["ProjectionExpression"] = projection
        items: list[dict] = []
        while True:
            page = self._db.query(**kwargs)
            items += page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _keys_under(self, table: str, pk: str) -> list[dict]:
        return [{"pk": i["pk"], "sk": i["sk"]} for i in self._query(table, pk, projection="pk, sk", ConsistentRead=True)]


def _backoff(attempt: int) -> None:
    time.sleep(min(0.05 * 2 ** attempt, 1.0))
