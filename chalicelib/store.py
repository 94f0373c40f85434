"""DynamoDB access: the one module that knows key shapes.

Two tables (names from settings, prefixed by stage):

* config — `pk = INTEGRATION#<id>`; `sk = CONFIG` (the integration), `STATUS_MAPPING`, `ATTRIBUTES`,
  `BACKFILL` (the history import job) or `CURSOR#<name>`.
* state  — `pk = INTEGRATION#<id>`; `sk = ORDER#<crm id>` or `CONTACT#<crm id>`: per-entity delivery
  state (newest event time, dirty, queued, last content hash, last uploading id, last error);
  `PRODUCT#<product id>`: products in Metrika's product list; `UPLOAD#<id>`: uploads to confirm.

The low-level client with boto3's type (de)serialisers keeps cold starts cheaper than the resource API.
"""
from __future__ import annotations

import copy
import time
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from .crm import EntityRef

_SER = TypeSerializer()
_DES = TypeDeserializer()

CONFIG = "CONFIG"
STATUS_MAPPING = "STATUS_MAPPING"
ATTRIBUTES = "ATTRIBUTES"
BACKFILL = "BACKFILL"
BACKFILL_OWNER = "backfill"


def _pk(integration_id: str) -> str:
    return f"INTEGRATION#{integration_id}"


def _entity_sk(kind: str, crm_id: str) -> str:
    return f"{kind.upper()}#{crm_id}"


def _to_item(values: dict[str, Any]) -> dict:
    return {k: _SER.serialize(v) for k, v in values.items() if v is not None}


def _from_item(item: dict | None) -> dict | None:
    if item is None:
        return None
    return _plain({k: _DES.deserialize(v) for k, v in item.items()})


def _plain(value: Any) -> Any:
    """DynamoDB numbers come back as Decimal: give callers ints (our numbers are ids, counts, times)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _decimal(seconds: float) -> Decimal:
    return Decimal(str(round(seconds, 4)))


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class Store:
    def __init__(self, client: Any, config_table: str, state_table: str) -> None:
        self._db = client
        self._config = config_table
        self._state = state_table
        self._integrations: dict[str, tuple[float, dict]] = {}  # id → (read at, config), see get_integration

    # --- integrations and status mappings -----------------------------------------------------------

    def get_integration(self, integration_id: str, *, max_age: float = 0) -> dict | None:
        """The integration's config. `max_age` > 0 accepts this process's copy read at most that many
        seconds ago (the webhook path: it saves a round trip on warm Lambdas; callers treat it as read-only).
        Writes through this Store drop the copy; another process's write shows after `max_age`."""
        cached = self._integrations.get(integration_id)
        if max_age and cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        item = self._get(self._config, _pk(integration_id), CONFIG)
        if item is None:
            self._integrations.pop(integration_id, None)
            return None
        self._integrations[integration_id] = (time.monotonic(), item["config"])
        return copy.deepcopy(item["config"])  # the caller's to change; the cached copy stays as read

    def put_integration(self, integration_id: str, config: dict) -> None:
        self._db.put_item(TableName=self._config, Item=_to_item(
            {"pk": _pk(integration_id), "sk": CONFIG, "config": config, "updated_at": int(time.time())}))
        self._integrations.pop(integration_id, None)  # after the write: a read meanwhile cannot keep the old one

    def delete_integration(self, integration_id: str) -> bool:
        """Delete the integration, its mapping and its delivery state. False if there was none."""
        pk = _pk(integration_id)
        existed = self._get(self._config, pk, CONFIG) is not None
        for table in (self._config, self._state):
            for keys in self._keys_under(table, pk):
                self._db.delete_item(TableName=table, Key=keys)
        self._integrations.pop(integration_id, None)
        return existed

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
            {"pk": _pk(integration_id), "sk": ATTRIBUTES, "entries": entries, "updated_at": int(time.time())}))

    def get_backfill(self, integration_id: str) -> dict | None:
        item = self._get(self._config, _pk(integration_id), BACKFILL)
        return item["job"] if item else None

    def put_backfill(self, integration_id: str, job: dict, *, expect_run: str | None = None) -> bool:
        """Save the job. With `expect_run`, only if the stored job is still that run and not stopped, so
        a stop (or a new run) always wins over a step finishing late. False when it lost."""
        kwargs: dict[str, Any] = {}
        if expect_run is not None:
            kwargs = {"ConditionExpression": "job.run_id = :run AND job.#s = :running",
                      "ExpressionAttributeNames": {"#s": "state"},
                      "ExpressionAttributeValues": _to_item({":run": expect_run, ":running": "running"})}
        try:
            self._db.put_item(TableName=self._config, Item=_to_item(
                {"pk": _pk(integration_id), "sk": BACKFILL, "job": job}), **kwargs)
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def known_products(self, integration_id: str, product_ids: list[str]) -> set[str]:
        """Which of these products Metrika's product list already has (batched reads, 100 keys each)."""
        return {i["sk"].partition("#")[2] for i in self._batch_get(integration_id, [f"PRODUCT#{p}" for p in product_ids], "sk")}

    def content_hashes(self, integration_id: str, kind: str, crm_ids: list[str]) -> dict[str, str]:
        """Last sent content hash of these entities (those that have one)."""
        return {i["sk"].partition("#")[2]: i["content_hash"]
                for i in self._batch_get(integration_id, [_entity_sk(kind, c) for c in crm_ids], "sk, content_hash")
                if i.get("content_hash")}

    def _batch_get(self, integration_id: str, sort_keys: list[str], projection: str) -> list[dict]:
        items: list[dict] = []
        unique = list(dict.fromkeys(sort_keys))
        for start in range(0, len(unique), 100):
            keys = [_to_item({"pk": _pk(integration_id), "sk": sk}) for sk in unique[start:start + 100]]
            request = {self._state: {"Keys": keys, "ProjectionExpression": projection, "ConsistentRead": True}}
            while request:
                answer = self._db.batch_get_item(RequestItems=request)
                items += [_from_item(i) for i in answer.get("Responses", {}).get(self._state, [])]
                request = answer.get("UnprocessedKeys") or None
        return items

    def products(self, integration_id: str) -> dict[str, str]:
        """The product list as last pushed to Metrika: product id → display name."""
        return {i["sk"].partition("#")[2]: i.get("humanized", "")
                for i in map(_from_item, self._query(self._state, _pk(integration_id), begins_with="PRODUCT#"))}

    def put_products(self, integration_id: str, names: dict[str, str]) -> None:
        items = [{"PutRequest": {"Item": _to_item({"pk": _pk(integration_id), "sk": f"PRODUCT#{p}", "humanized": n})}}
                 for p, n in names.items()]
        for start in range(0, len(items), 25):
            request = {self._state: items[start:start + 25]}
            while request:
                request = self._db.batch_write_item(RequestItems=request).get("UnprocessedItems") or None

    def get_cursor(self, integration_id: str, name: str) -> int | None:
        item = self._get(self._config, _pk(integration_id), f"CURSOR#{name}")
        return item["value"] if item else None

    def put_cursor(self, integration_id: str, name: str, value: int) -> None:
        self._db.put_item(TableName=self._config, Item=_to_item(
            {"pk": _pk(integration_id), "sk": f"CURSOR#{name}", "value": value}))

    def list_integration_ids(self) -> list[str]:
        """Every integration (for scheduled jobs). A scan: the config table holds a few items each."""
        kwargs: dict[str, Any] = {"TableName": self._config, "FilterExpression": "sk = :config",
                                  "ProjectionExpression": "pk", "ExpressionAttributeValues": _to_item({":config": CONFIG})}
        ids: list[str] = []
        while True:
            page = self._db.scan(**kwargs)
            ids += [item["pk"]["S"].partition("#")[2] for item in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return sorted(ids)
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # --- per-entity delivery state -------------------------------------------------------------------

    def mark_dirty(self, integration_id: str, ref: EntityRef) -> bool:
        """Record that `ref` changed. Returns True when the caller must queue a message for it.

        An older event never overwrites newer state (equal times pass: two changes can share a second,
        and the worker's re-read plus the content hash make the extra pass harmless). A message is
        queued only when none is pending for the entity, so a burst of updates costs one message.
        """
        try:
            old = self._db.update_item(
                TableName=self._state,
                Key=_to_item({"pk": _pk(integration_id), "sk": _entity_sk(ref.kind, ref.crm_id)}),
                UpdateExpression="SET event_time = :t, dirty = :yes, queued = :yes, last_action = :a, "
                                 "received_at = :now",
                ConditionExpression="attribute_not_exists(event_time) OR event_time <= :t",
                ExpressionAttributeValues=_to_item({":t": ref.event_time, ":yes": True, ":a": ref.action,
                                                    ":now": int(time.time())}),
                ReturnValues="ALL_OLD",
            ).get("Attributes", {})
        except ClientError as exc:
            if _conditional_failed(exc):
                return False  # stale: a newer event is already recorded
            raise
        return not (old.get("queued", {}).get("BOOL", False))

    def existing_entities(self, integration_id: str, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (kind, crm_id) have delivery state (batched reads, 100 keys each)."""
        return {(k.lower(), c) for k, _, c in (i["sk"].partition("#") for i in
                self._batch_get(integration_id, [_entity_sk(kind, crm_id) for kind, crm_id in keys], "sk"))}

    def take_for_backfill(self, integration_id: str, kind: str, crm_id: str, event_time: int,
                          content_hash: str, *, absent: bool = False) -> dict | None:
        """The history import takes an entity it read at `event_time`, unless the live path has it: a
        message is pending (dirty), the state is as new or newer, or the same content was already sent.
        While taken, `queued` stays set, so webhooks only record newer times without queueing; the
        import queues the entity itself if it was overtaken (see `release_backfilled`). An entity left
        taken by an interrupted run is taken again. Returns the item as taken, in DynamoDB's typed form
        (hand it back to `release_backfilled`), or None.

        `absent`: a read just found no state, so try the cheaper conditional put first (an import of a
        fresh install makes one per entity); if a webhook wrote meanwhile, the update below decides."""
        key = {"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)}
        if absent:
            item = _to_item({**key, "event_time": event_time, "dirty": True, "queued": True, "last_action": "backfill",
                             "owner": BACKFILL_OWNER})
            try:
                self._db.put_item(TableName=self._state, Item=item, ConditionExpression="attribute_not_exists(pk)")
                return item
            except ClientError as exc:
                if not _conditional_failed(exc):
                    raise
        try:
            return self._db.update_item(
                TableName=self._state, Key=_to_item(key),
                UpdateExpression="SET event_time = :t, dirty = :yes, queued = :yes, last_action = :a, #o = :owner",
                ConditionExpression="attribute_not_exists(event_time) OR #o = :owner OR "
                                    "(dirty = :no AND event_time < :t AND (attribute_not_exists(content_hash) "
                                    "OR content_hash <> :h))",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues=_to_item({":t": event_time, ":yes": True, ":no": False, ":a": "backfill",
                                                    ":owner": BACKFILL_OWNER, ":h": content_hash}),
                ReturnValues="ALL_NEW")["Attributes"]
        except ClientError as exc:
            if _conditional_failed(exc):
                return None
            raise

    def release_backfilled(self, held: dict, *, content_hash: str | None, uploading_id: str | None,
                           last_order: str | None, facts: dict | None, error: dict | None = None) -> bool:
        """End the import's hold on `held` (the item `take_for_backfill` returned): clean (sent, or `error`
        parks it) when no newer event came and no worker claimed it meanwhile. False otherwise: the
        entity stays dirty and the caller must queue it.

        One conditional put of the whole item rather than an update: while the hold is unchanged
        (same event time, still ours) no other writer has touched the item, and a put is the cheapest
        conditional write (an import makes one per entity)."""
        now = int(time.time())
        item = {k: v for k, v in held.items() if k != "owner"}
        if error is not None:
            changes: dict[str, Any] = {"last_error": error, "failed_at": now}
        else:
            item.pop("last_error", None)
            changes = {"content_hash": content_hash, "uploading_id": uploading_id or "", "sent_at": now,
                       "attempts": 0, "last_order": last_order or "", **({"facts": facts} if facts else {})}
        item.update(_to_item({**changes, "dirty": False, "queued": False}))
        # False: a newer event came meanwhile. The entity stays dirty and taken until the caller's message
        # is claimed by a worker (`claim` drops the hold), so a crash before queueing leaves it to the
        # next run of the import rather than stuck.
        try:
            self._db.put_item(TableName=self._state, Item=item, ConditionExpression="event_time = :seen AND #o = :owner",
                              ExpressionAttributeNames={"#o": "owner"},
                              ExpressionAttributeValues={":seen": held["event_time"], ":owner": held["owner"]})
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def note_contacts_sent(self, integration_id: str, content_hashes: dict[str, str]) -> None:
        """Contacts that went up with a deal: remember their content (as the contact's own delivery
        would) so that neither a history import nor an unchanged contact webhook sends them again.
        Only where nothing is pending or held for the contact; otherwise its own delivery decides."""
        for crm_id, content_hash in content_hashes.items():
            try:
                self._db.update_item(
                    TableName=self._state, Key=_to_item({"pk": _pk(integration_id), "sk": _entity_sk("contact", crm_id)}),
                    # A contact first seen here gets event time 0: any real change of it is newer.
                    UpdateExpression="SET content_hash = :h, event_time = if_not_exists(event_time, :zero), "
                                     "dirty = if_not_exists(dirty, :no)",
                    ConditionExpression="attribute_not_exists(pk) OR (dirty = :no AND attribute_not_exists(#o))",
                    ExpressionAttributeNames={"#o": "owner"},
                    ExpressionAttributeValues=_to_item({":h": content_hash, ":no": False, ":zero": 0}))
            except ClientError as exc:
                if not _conditional_failed(exc):
                    raise

    def mark_unqueued(self, integration_id: str, kind: str, crm_id: str) -> None:
        """The message for this entity could not be sent: let the next event queue one."""
        self._db.update_item(TableName=self._state,
                             Key=_to_item({"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)}),
                             UpdateExpression="SET queued = :no", ExpressionAttributeValues=_to_item({":no": False}))

    def claim(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        """The worker takes the entity: from now on a new event queues a new message."""
        try:
            item = self._db.update_item(
                TableName=self._state, Key=_to_item({"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)}),
                UpdateExpression="SET queued = :no REMOVE #o", ConditionExpression="attribute_exists(pk)",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues=_to_item({":no": False}), ReturnValues="ALL_NEW")
        except ClientError as exc:
            if _conditional_failed(exc):
                return None  # the integration was deleted after the message was queued
            raise
        return _entity(item["Attributes"])

    def mark_clean(self, integration_id: str, kind: str, crm_id: str, *, event_time: int,
                   content_hash: str, uploading_id: str | None, last_order: str | None = None,
                   facts: dict | None = None) -> bool:
        """Done with the state seen at `event_time`. False if a newer event arrived meanwhile (the
        entity stays dirty; that event queued its own message). `last_order` (JSON of the order as
        sent) lets a later deletion be reported when the CRM no longer has the deal."""
        facts_update = ", facts = :f" if facts else ""
        return self._finish(integration_id, kind, crm_id, event_time,
                            "SET dirty = :no, content_hash = :h, uploading_id = :u, sent_at = :now, "
                            f"attempts = :zero, last_order = :o{facts_update} REMOVE last_error",
                            {":h": content_hash, ":u": uploading_id or "", ":zero": 0, ":o": last_order or "",
                             **({":f": facts} if facts else {})})

    def record_upload(self, integration_id: str, uploading_id: str, *, kind: str, rows: int) -> None:
        """An upload Metrika accepted, until the confirm job reads its final validation status."""
        self._db.put_item(TableName=self._state, Item=_to_item({
            "pk": _pk(integration_id), "sk": f"UPLOAD#{uploading_id}", "kind": kind, "rows": rows,
            "status": "SENT", "sent_at": int(time.time())}))

    def uploads(self, integration_id: str) -> list[dict]:
        items = self._query(self._state, _pk(integration_id), begins_with="UPLOAD#")
        return [{"uploading_id": i["sk"].partition("#")[2], **{k: v for k, v in i.items() if k not in ("pk", "sk")}}
                for i in map(_from_item, items)]

    def confirm_upload(self, integration_id: str, uploading_id: str, status: str, elements_count: int | None) -> None:
        self._db.update_item(TableName=self._state, Key=_to_item({"pk": _pk(integration_id), "sk": f"UPLOAD#{uploading_id}"}),
                             UpdateExpression="SET #s = :s, elements_count = :n, confirmed_at = :now",
                             ExpressionAttributeNames={"#s": "status"},
                             ExpressionAttributeValues=_to_item({":s": status, ":n": elements_count or 0,
                                                                 ":now": int(time.time())}))

    def mark_failed(self, integration_id: str, kind: str, crm_id: str, *, event_time: int, error: dict) -> bool:
        """Park the entity: a permanent error that needs a person (fix data or mapping, then replay)."""
        return self._finish(integration_id, kind, crm_id, event_time,
                            "SET dirty = :no, last_error = :e, failed_at = :now", {":e": error})

    def forget_content(self, integration_id: str, kind: str, crm_id: str) -> None:
        """Make the next delivery send the entity even if its rows did not change (replay)."""
        self._db.update_item(TableName=self._state, Key=_to_item({"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)}),
                             UpdateExpression="REMOVE content_hash, last_order")

    def note_attempt(self, integration_id: str, kind: str, crm_id: str, *, attempts: int, error: dict) -> None:
        """A retryable failure: the entity stays dirty and its retry message is on the queue."""
        self._db.update_item(
            TableName=self._state, Key=_to_item({"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)}),
            UpdateExpression="SET attempts = :n, last_error = :e, queued = :yes",
            ExpressionAttributeValues=_to_item({":n": attempts, ":e": error, ":yes": True}))

    def reserve_slot(self, scope: str, interval: float, now: float) -> float:
        """A shared rate limiter: the time at which the caller may send, spacing all callers of
        `scope` at least `interval` seconds apart, across processes."""
        key = _to_item({"pk": f"RATE#{scope}", "sk": "NEXT"})
        try:  # idle: the slot is now
            self._db.update_item(TableName=self._state, Key=key, UpdateExpression="SET next_at = :next",
                                 ConditionExpression="attribute_not_exists(next_at) OR next_at <= :now",
                                 ExpressionAttributeValues=_to_item({":next": _decimal(now + interval),
                                                                     ":now": _decimal(now)}))
            return now
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
        busy = self._db.update_item(TableName=self._state, Key=key, UpdateExpression="SET next_at = next_at + :i",
                                    ExpressionAttributeValues=_to_item({":i": _decimal(interval)}),
                                    ReturnValues="UPDATED_NEW")
        return float(busy["Attributes"]["next_at"]["N"]) - interval

    def count_request(self, quota_key: str, day: str, budget: int) -> int | None:
        """Count one Metrika request against the token's budget for `day` (UTC). None when spent."""
        try:
            answer = self._db.update_item(
                TableName=self._state, Key=_to_item({"pk": f"QUOTA#{quota_key}", "sk": f"DAY#{day}"}),
                UpdateExpression="ADD n :one", ConditionExpression="attribute_not_exists(n) OR n < :budget",
                ExpressionAttributeValues=_to_item({":one": 1, ":budget": budget}), ReturnValues="UPDATED_NEW")
        except ClientError as exc:
            if _conditional_failed(exc):
                return None
            raise
        return int(answer["Attributes"]["n"]["N"])

    def requests_on(self, quota_key: str, day: str) -> int:
        item = self._get(self._state, f"QUOTA#{quota_key}", f"DAY#{day}")
        return item["n"] if item else 0

    def acquire_lease(self, scope: str, slots: int, owner: str, now: float, ttl: float) -> int | None:
        """Take one of `slots` leases (a semaphore shared by every process); an expired lease (a crashed
        holder) is free again. Returns the slot, or None when all are held."""
        for slot in range(slots):
            try:
                self._db.put_item(
                    TableName=self._state, Item=_to_item({"pk": f"LEASE#{scope}", "sk": f"SLOT#{slot}", "owner": owner,
                                                          "expires_at": _decimal(now + ttl)}),
                    ConditionExpression="attribute_not_exists(expires_at) OR expires_at < :now",
                    ExpressionAttributeValues=_to_item({":now": _decimal(now)}))
                return slot
            except ClientError as exc:
                if not _conditional_failed(exc):
                    raise
        return None

    def release_lease(self, scope: str, slot: int, owner: str) -> None:
        try:
            self._db.delete_item(TableName=self._state, Key=_to_item({"pk": f"LEASE#{scope}", "sk": f"SLOT#{slot}"}),
                                 ConditionExpression="#o = :owner", ExpressionAttributeNames={"#o": "owner"},
                                 ExpressionAttributeValues=_to_item({":owner": owner}))
        except ClientError as exc:
            if not _conditional_failed(exc):  # expired and taken over: not ours to free
                raise

    def get_entity(self, integration_id: str, kind: str, crm_id: str) -> dict | None:
        item = self._db.get_item(TableName=self._state, ConsistentRead=True,
                                 Key=_to_item({"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)})).get("Item")
        return _entity(item) if item else None

    def list_entities(self, integration_id: str) -> list[dict]:
        """Per-entity state of an integration (orders first, then contacts)."""
        items = (self._query(self._state, _pk(integration_id), begins_with="ORDER#")
                 + self._query(self._state, _pk(integration_id), begins_with="CONTACT#"))
        return [_entity(i) for i in items]

    # --- helpers -------------------------------------------------------------------------------------

    def _finish(self, integration_id: str, kind: str, crm_id: str, event_time: int, update: str,
                values: dict) -> bool:
        try:
            self._db.update_item(
                TableName=self._state, Key=_to_item({"pk": _pk(integration_id), "sk": _entity_sk(kind, crm_id)}),
                UpdateExpression=update, ConditionExpression="event_time = :seen",
                ExpressionAttributeValues=_to_item({**values, ":seen": event_time, ":no": False,
                                                    ":now": int(time.time())}))
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def _get(self, table: str, pk: str, sk: str) -> dict | None:
        return _from_item(self._db.get_item(TableName=table, Key=_to_item({"pk": pk, "sk": sk}),
                                            ConsistentRead=True).get("Item"))

    def _query(self, table: str, pk: str, projection: str | None = None, begins_with: str | None = None) -> list[dict]:
        values = {":pk": pk, **({":prefix": begins_with} if begins_with else {})}
        kwargs: dict[str, Any] = {"TableName": table, "ExpressionAttributeValues": _to_item(values),
                                  "KeyConditionExpression": "pk = :pk" + (" AND begins_with(sk, :prefix)" if begins_with else "")}
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
        return [{"pk": i["pk"], "sk": i["sk"]} for i in self._query(table, pk, projection="pk, sk")]


def _entity(item: dict) -> dict:
    data = _from_item(item)
    kind, _, crm_id = data.pop("sk").partition("#")
    data.pop("pk")
    return {"kind": kind.lower(), "crm_id": crm_id, **data}
