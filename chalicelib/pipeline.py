"""Ingest (verify → parse → mark dirty → queue → answer) and deliver (claim → snapshot from the CRM →
validate → upload contacts then orders → mark clean or park). See ../shared/docs/architecture.md.

Chalice's `on_sqs_message` has no partial batch response (webhook-practice reference §2.5), so the
worker never fails a batch for one entity: retryable errors re-queue that entity's own message with a
delay, permanent ones park the entity with the reason. Only an unexpected crash fails the batch, and
SQS's redrive moves a message that keeps crashing to the dead-letter queue.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable
from zoneinfo import ZoneInfo

from .crm import (ORDER, CrmSource, EntityRef, EntityRows, PermanentSourceError, RetryableSourceError, WebhookError,
                  is_crm_contact)
from .crm.amocrm.webhook import parse_amocrm_webhook
from .crm.bitrix24.webhook import parse_bitrix24_event
from .errors import ApiError, invalid, not_found
from .logs import log_event
from .metrika.cdp import MetrikaError

MAX_SQS_BATCH = 10
DELETED_DEAL_STATUS = "CANCELLED"
RECONCILE_OVERLAP = 120  # seconds
LOW_BUDGET = 250  # Metrika requests left today below which the worker waits to fill its chunks
BATCH_HARDER_SECONDS = 300
MATCHING_WINDOW_DAYS = 21
RECONCILE_FIRST_WINDOW = 24 * 3600  # a first run looks back one day
MAX_DELAY_SECONDS = 900  # SQS's own limit for DelaySeconds
# Seconds a warm Lambda answers webhooks from its copy of the integration (one DynamoDB read less per
# webhook); a changed config, or a deleted integration, shows in the other Lambdas after that long.
INTEGRATION_MAX_AGE = 5.0
BACKFILL = "backfill"  # message kind of a history-import step (its `crm_id` is the run id)


def secrets_match(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; an unset expected secret never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class EventQueue:
    """SQS adapter: messages are `{integration_id, kind, crm_id}` JSON; the URL is looked up once."""

    def __init__(self, client: Any, queue_name: str) -> None:
        self._sqs = client
        self._name = queue_name
        self._url: str | None = None

    def send(self, messages: list[dict], delay_seconds: int = 0) -> None:
        if self._url is None:
            self._url = self._sqs.get_queue_url(QueueName=self._name)["QueueUrl"]
        for start in range(0, len(messages), MAX_SQS_BATCH):
            chunk = messages[start:start + MAX_SQS_BATCH]
            result = self._sqs.send_message_batch(QueueUrl=self._url, Entries=[
                {"Id": str(i), "MessageBody": json.dumps(m, sort_keys=True), "DelaySeconds": delay_seconds}
                for i, m in enumerate(chunk)])
            if result.get("Failed"):
                raise RuntimeError(f"SQS refused {len(result['Failed'])} message(s)")


# --- ingest ------------------------------------------------------------------------------------------

class Ingest:
    def __init__(self, store: Any, queue: EventQueue, max_body_bytes: int) -> None:
        self._store, self._queue, self._max_body = store, queue, max_body_bytes

    def amocrm(self, integration_id: str, raw: bytes, query: dict[str, str]) -> dict:
        """amoCRM signs nothing: the unguessable `?secret=` and the account id are the checks
        (amoCRM reference §9)."""
        connection = self._verified(integration_id, "amocrm", raw, lambda c: secrets_match(
            query.get("secret"), c.get("webhook_secret")))
        if connection is None:
            raise ApiError(403, "forbidden", "wrong or missing ?secret= for this integration's webhook URL")
        webhook = self._parse(parse_amocrm_webhook, raw)
        expected_account = connection.get("account_id")
        if expected_account and webhook.account_id != expected_account:
            raise ApiError(403, "forbidden", f"webhook comes from account {webhook.account_id}, "
                                             f"this integration serves account {expected_account}")
        return self._record(integration_id, "amocrm", webhook.refs, ignored=webhook.ignored)

    def bitrix24(self, integration_id: str, raw: bytes) -> dict:
        """Bitrix24: `auth[application_token]` in constant time, then member id and domain when
        configured (Bitrix24 reference §5)."""
        self._integration(integration_id, "bitrix24", raw, max_age=INTEGRATION_MAX_AGE)  # 413, 404 before parsing
        event = self._parse(parse_bitrix24_event, raw)
        connection = self._verified(integration_id, "bitrix24", raw, lambda c: secrets_match(
            event.application_token, c.get("application_token")))
        if connection is None:
            raise ApiError(403, "forbidden", "auth[application_token] does not match this integration")
        for key, value in (("member_id", event.member_id), ("domain", event.domain)):
            if connection.get(key) and value != connection[key]:
                raise ApiError(403, "forbidden", f"auth[{key}] does not match this integration")
        return self._record(integration_id, "bitrix24", event.refs, ignored=0 if event.refs else 1)

    def _verified(self, integration_id: str, crm: str, raw: bytes, secret_matches: Callable[[dict], bool]) -> dict | None:
        """The integration's connection if the webhook's secret matches, else None. The config may come
        from this Lambda's copy of the last seconds; a mismatch is checked again against a fresh read,
        so a rotated secret works at once (the old one may still pass here for those seconds)."""
        connection = self._integration(integration_id, crm, raw, max_age=INTEGRATION_MAX_AGE)["connection"]
        if secret_matches(connection):
            return connection
        connection = self._integration(integration_id, crm, raw)["connection"]
        return connection if secret_matches(connection) else None

    def _integration(self, integration_id: str, crm: str, raw: bytes, max_age: float = 0) -> dict:
        if len(raw) > self._max_body:
            raise ApiError(413, "payload_too_large", f"webhook body is {len(raw)} bytes; the limit is {self._max_body}")
        integration = self._store.get_integration(integration_id, max_age=max_age)
        if integration is None:
            raise not_found(f"integration {integration_id!r}")
        if integration["crm"] != crm:
            raise invalid(f"integration {integration_id!r} is a {integration['crm']} integration: "
                          f"send its webhooks to /webhooks/{integration['crm']}/{integration_id}")
        return integration

    @staticmethod
    def _parse(parser: Callable[[bytes], Any], raw: bytes) -> Any:
        try:
            return parser(raw)
        except WebhookError as exc:
            raise invalid(str(exc)) from exc

    def requeue(self, integration_id: str, refs: list[EntityRef]) -> dict:
        return self._record(integration_id, "requeue", refs, ignored=0)

    def requeue_held(self, integration_id: str, entries: list[dict]) -> int:
        """Queue again the entities held because their stage was not mapped, now that it is."""
        mapped = {e["crm_status"] for e in entries}
        held = [EntityRef(e["kind"], e["crm_id"], e["event_time"], "remapped") for e in self._store.list_entities(integration_id)
                if (e.get("last_error") or {}).get("code") == "unmapped_stage"
                and e["last_error"].get("crm_status") in mapped]
        return self._record(integration_id, "requeue", held, ignored=0)["queued"] if held else 0

    def reconcile(self, integration_id: str, source: CrmSource, *, now: int, since: int | None = None) -> dict:
        """Feed entities changed since the stored cursor through the same path as webhooks, so a lost
        webhook costs minutes, not a deal (Bitrix24 never retries; amoCRM hooks can be disabled).
        The window overlaps the last run by RECONCILE_OVERLAP to absorb clock skew; entities already
        recorded at that time are skipped by the usual stale-event check."""
        integration = self._store.get_integration(integration_id)
        if integration is None:
            raise not_found(f"integration {integration_id!r}")
        cursor = since if since is not None else self._store.get_cursor(integration_id, "reconcile")
        start = (cursor if cursor is not None else now - RECONCILE_FIRST_WINDOW) - RECONCILE_OVERLAP
        refs = source.changed_since(integration, start)
        result = self._record(integration_id, "reconcile", refs, ignored=0)
        self._store.put_cursor(integration_id, "reconcile", now)
        return {"since": start, "found": len(refs), "queued": result["queued"]}

    def _record(self, integration_id: str, crm: str, refs: list[EntityRef], ignored: int) -> dict:
        to_queue = [r for r in _dedupe(refs) if self._store.mark_dirty(integration_id, r)]
        messages = [{"integration_id": integration_id, "kind": r.kind, "crm_id": r.crm_id} for r in to_queue]
        if messages:
            try:
                self._queue.send(messages)
            except Exception as exc:
                # Let the CRM's retry (or the next event) queue them: without this they would look queued.
                for ref in to_queue:
                    self._store.mark_unqueued(integration_id, ref.kind, ref.crm_id)
                log_event("webhook_queue_failed", integration_id=integration_id, error=type(exc).__name__)
                raise ApiError(503, "queue_unavailable", "could not queue the event; please retry") from exc
        log_event("webhook", integration_id=integration_id, crm=crm, entities=len(refs), queued=len(messages),
                  ignored=ignored)
        return {"accepted": len(refs), "queued": len(messages), "ignored": ignored}


def _dedupe(refs: Iterable[EntityRef]) -> list[EntityRef]:
    """One ref per entity, the newest (a body may carry `update` and `status` for one lead)."""
    newest: dict[tuple[str, str], EntityRef] = {}
    for ref in refs:
        key = (ref.kind, ref.crm_id)
        if key not in newest or ref.event_time >= newest[key].event_time:
            newest[key] = ref
    return list(newest.values())


# --- deliver -----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    uploaded: int = 0
    skipped: int = 0
    parked: int = 0
    retried: int = 0
    superseded: int = 0
    requests: int = 0
    backfill_steps: int = 0


class Worker:
    def __init__(self, store: Any, queue: EventQueue, metrika_for: Callable[[dict], Any],
                 sources: dict[str, CrmSource], *, row_limit: int = 1000, retry_limit: int = 12,
                 retry_base: float = 1.0, batch_harder_seconds: int = BATCH_HARDER_SECONDS) -> None:
        self._store, self._queue, self._metrika_for = store, queue, metrika_for
        self._sources, self._row_limit, self._retry_limit = sources, row_limit, retry_limit
        self._retry_base, self._batch_harder_seconds = retry_base, batch_harder_seconds

    def handle(self, bodies: Iterable[str]) -> Outcome:
        """Process one SQS batch of message bodies: entity deliveries first, then history-import steps."""
        outcome = Outcome()
        groups: dict[str, dict[tuple[str, str], None]] = {}
        steps: list[dict] = []
        for body in bodies:
            message = json.loads(body)
            if message["kind"] == BACKFILL:
                steps.append(message)
                continue
            groups.setdefault(message["integration_id"], {})[(message["kind"], message["crm_id"])] = None
        for integration_id, keys in groups.items():
            self._deliver(integration_id, list(keys), outcome)
        if steps:
            from .backfill import Backfill
            backfill = Backfill(self._store, self._queue, self._metrika_for, self._sources, row_limit=self._row_limit)
            for message in steps:
                backfill.step(message["integration_id"], message["crm_id"])
                outcome.backfill_steps += 1
        return outcome

    def _deliver(self, integration_id: str, keys: list[tuple[str, str]], outcome: Outcome) -> None:
        integration = self._store.get_integration(integration_id)
        if integration is None:
            log_event("delivery_dropped", integration_id=integration_id, reason="integration deleted")
            return
        claimed = {}
        for kind, crm_id in keys:
            state = self._store.claim(integration_id, kind, crm_id)
            if state is not None and state.get("dirty"):
                claimed[(kind, crm_id)] = state
        if not claimed:
            return
        source = self._sources.get(integration["crm"])
        if source is None:
            error = {"message": f"enrichment from {integration['crm']} is not available in this build"}
            for key, state in claimed.items():
                self._park(integration_id, key, state, error, outcome)
            return
        refs = [EntityRef(kind, crm_id, state["event_time"], state.get("last_action", "update"))
                for (kind, crm_id), state in claimed.items()]
        mapping = (self._store.get_status_mapping(integration_id) or {}).get("entries", [])
        attributes = self._store.get_attribute_mapping(integration_id)
        try:
            rows = source.snapshot(integration, mapping, refs, attributes)
        except RetryableSourceError as exc:
            self._retry(integration_id, claimed, {"message": str(exc), "source": integration["crm"]}, outcome)
            return
        except PermanentSourceError as exc:
            for key, state in claimed.items():
                self._park(integration_id, key, state, {"message": str(exc), "source": integration["crm"]}, outcome)
            return
        self._upload(integration_id, integration, claimed, rows, outcome, attributes, source)

    def _upload(self, integration_id: str, integration: dict, claimed: dict, rows: dict, outcome: Outcome,
                attributes: list[dict], source: CrmSource) -> None:
        # Imported here, not at module level: the webhook path never validates rows, so a cold start
        # that answers a webhook does not pay for marshmallow.
        from marshmallow import ValidationError
        ready: dict[tuple[str, str], tuple[list[dict], list[dict], str, str | None]] = {}
        products: dict[str, dict] = {}
        for key, state in claimed.items():
            entity = rows.get(key) or EntityRows(error={"message": "the CRM returned nothing for this entity"})
            if entity.gone:
                entity = deletion_rows(state, integration.get("deleted_deal_status", DELETED_DEAL_STATUS))
                if entity is None:  # nothing in Metrika to change
                    self._finish(integration_id, key, state, "gone", state.get("uploading_id"), outcome,
                                 state.get("last_order"))
                    continue
            if entity.error:
                self._park(integration_id, key, state, entity.error, outcome)
                continue
            try:
                contacts, orders = validated_rows(integration, attributes, entity)
            except ValidationError as exc:
                self._park(integration_id, key, state, {"message": "row failed validation", "fields": exc.messages}, outcome)
                continue
            products.update(entity.products)
            content_hash = content_hash_of(contacts, orders)
            if content_hash == state.get("content_hash"):
                outcome.skipped += 1
                self._finish(integration_id, key, state, content_hash, state.get("uploading_id"), outcome,
                             state.get("last_order"))
                continue
            last_order = state.get("last_order") or None
            if orders and last_order and json.loads(last_order) == orders[0]:
                orders = []  # only the customer changed (a contact edit): the order stands as sent
            elif orders:
                last_order = json.dumps(orders[0], sort_keys=True, ensure_ascii=False)
            ready[key] = (contacts, orders, content_hash, last_order)
        if not ready:
            return
        metrika = self._metrika_for(integration)
        counter_id = integration["counter_id"]
        csv_kinds = csv_kinds_for(attributes)
        ordered = {p for v in ready.values() for o in v[1] for p in o.get("products") or {}}
        if ordered:
            sync_products(self._store, metrika, source, integration_id, integration,
                          {p: products.get(p, {}) for p in ordered})
        remaining = metrika.remaining_budget()
        rows = sum(len(v[0]) + len(v[1]) for v in ready.values())
        if remaining is not None and remaining < LOW_BUDGET and rows < self._row_limit:
            # Few requests left today: wait for more rows so each request carries a full chunk.
            self._retry(integration_id, {k: claimed[k] for k in ready}, {"message": f"batching harder: {remaining} "
                        "Metrika requests left today"}, outcome, self._batch_harder_seconds, count_attempt=False)
            return
        while ready:
            try:
                self._complete(integration_id, integration, claimed, ready, self._send(metrika, counter_id, ready, csv_kinds), outcome)
                return
            except MetrikaError as exc:
                # Keep what got through: entities whose every row was accepted are done.
                sent = getattr(exc, "sent", ([], set(), set()))
                done = {k: v for k, v in ready.items() if {c["uniq_id"] for c in v[0]} <= sent[1]
                        and {o["id"] for o in v[1]} <= sent[2]}
                if done:
                    self._complete(integration_id, integration, claimed, done, sent[0], outcome)
                ready = {k: v for k, v in ready.items() if k not in done}
                if exc.retryable:
                    self._retry(integration_id, {k: claimed[k] for k in ready}, exc.describe(), outcome,
                                exc.retry_after, count_attempt=not exc.daily_quota)
                    return
                # Metrika names the rows it refused (`orders[3].createDateTime`): park only their
                # entities and send the rest again; without locations the whole batch is refused.
                rejected = rejected_keys(exc, ready)
                for key in rejected or list(ready):
                    self._park(integration_id, key, claimed[key], exc.describe(), outcome)
                if not rejected:
                    return
                ready = {k: v for k, v in ready.items() if k not in rejected}

    def _complete(self, integration_id: str, integration: dict, claimed: dict, ready: dict,
                  uploads: list[tuple[str, str, int]], outcome: Outcome) -> None:
        for kind, uploading_id, count in uploads:
            self._store.record_upload(integration_id, uploading_id, kind=kind, rows=count)
        outcome.requests += len(uploads)
        log_event("upload", integration_id=integration_id, entities=len(ready), requests=len(uploads),
                  rows=sum(count for _, _, count in uploads))
        for key, (contacts, orders, content_hash, last_order) in ready.items():
            outcome.uploaded += 1
            self._finish(integration_id, key, claimed[key], content_hash, uploads[-1][1] if uploads else None,
                         outcome, last_order, delivery_facts(contacts, orders, last_order, integration["timezone"]))
        # The deals' customers went up too: a history import or an unchanged contact webhook need not
        # send them again.
        self._store.note_contacts_sent(integration_id, {
            c["uniq_id"]: content_hash_of([c], []) for key, (contacts, *_rest) in ready.items() if key[0] == ORDER
            for c in contacts if is_crm_contact(c["uniq_id"])})

    def _send(self, metrika: Any, counter_id: int, ready: dict, csv_kinds: set[str]) -> list[tuple[str, str, int]]:
        return send_rows(metrika, counter_id, ready, self._row_limit, csv_kinds)

    def _finish(self, integration_id: str, key: tuple[str, str], state: dict, content_hash: str,
                uploading_id: str | None, outcome: Outcome, last_order: str | None = None,
                facts: dict | None = None) -> None:
        if not self._store.mark_clean(integration_id, *key, event_time=state["event_time"], content_hash=content_hash,
                                      uploading_id=uploading_id, last_order=last_order, facts=facts):
            outcome.superseded += 1  # a newer event arrived and queued its own message

    def _park(self, integration_id: str, key: tuple[str, str], state: dict, error: dict, outcome: Outcome) -> None:
        outcome.parked += 1
        self._store.mark_failed(integration_id, *key, event_time=state["event_time"], error=error)
        log_event("entity_parked", integration_id=integration_id, kind=key[0], crm_id=key[1],
                  reason=error.get("message"))

    def _retry(self, integration_id: str, claimed: dict, error: dict, outcome: Outcome,
               retry_after: float | None = None, count_attempt: bool = True) -> None:
        """Exponential backoff with jitter; past the retry limit the entity is parked, visible. Waiting
        for the quota (or batching harder) is not a failed attempt."""
        again, most_attempts = [], 0
        for key, state in claimed.items():
            attempts = int(state.get("attempts") or 0) + (1 if count_attempt else 0)
            if attempts > self._retry_limit:
                self._park(integration_id, key, state, {**error, "message": f"gave up after {attempts - 1} "
                                                                            f"retries: {error.get('message')}"}, outcome)
            else:
                most_attempts = max(most_attempts, attempts)
                self._store.note_attempt(integration_id, *key, attempts=attempts, error=error)
                again.append({"integration_id": integration_id, "kind": key[0], "crm_id": key[1]})
        if again:
            outcome.retried += len(again)
            base = min(MAX_DELAY_SECONDS, self._retry_base * 2 ** min(most_attempts, 10))
            delay = int(max(retry_after or 0, random.uniform(base / 2, base)))
            self._queue.send(again, delay_seconds=min(MAX_DELAY_SECONDS, delay))


def send_rows(metrika: Any, counter_id: int, ready: dict, row_limit: int, csv_kinds: set[str]) -> list[tuple[str, str, int]]:
    """Contacts first (Metrika links orders to sessions through their contacts, CDP reference §6.1),
    then orders; chunks of at most `row_limit` rows; CSV for the kinds that carry custom attributes.
    `ready` maps entity keys to (contacts, orders, …). A failure carries what was sent before it."""
    uploads: list[tuple[str, str, int]] = []
    sent: dict[str, set] = {"contacts": set(), "orders": set()}
    for kind, id_field, index in (("contacts", "uniq_id", 0), ("orders", "id", 1)):
        upload = metrika.upload_contacts if kind == "contacts" else metrika.upload_orders
        for chunk in _chunks((row for v in ready.values() for row in v[index]), id_field, row_limit):
            try:
                uploads.append((kind, upload(counter_id, chunk, as_csv=kind in csv_kinds)["uploading_id"], len(chunk)))
            except MetrikaError as exc:
                exc.chunk = (kind, id_field, index, chunk)
                exc.sent = (uploads, sent["contacts"], sent["orders"])
                raise
            sent[kind] |= {row[id_field] for row in chunk}
    return uploads


def attribute_specs(attributes: list[dict], entity: str) -> dict[str, dict]:
    """The attribute mapping's entries for `contact` or `order`, by Metrika name, as the row schemas
    take them."""
    return {a["name"]: {"type": a["type"], "multivalued": a.get("multivalued", False), "crm_field": a["crm_field"]}
            for a in attributes if a["entity"] == entity}


def csv_kinds_for(attributes: list[dict]) -> set[str]:
    """Rows of an entity with mapped attributes go as CSV, the documented carrier of attribute values
    (CDP reference §5.4); the others stay JSON."""
    return {"contacts" if a["entity"] == "contact" else "orders" for a in attributes}


def validated_rows(integration: dict, attributes: list[dict], entity: EntityRows) -> tuple[list[dict], list[dict]]:
    """One entity's raw rows → the rows as sent: validated, normalised, hashed when the integration
    says so. Raises marshmallow's ValidationError. Shared by the live worker and the history import,
    so both compute the same content hash for the same CRM state."""
    from .metrika.schemas import ContactRow, OrderRow, hash_identifiers
    time_zone = integration["timezone"]
    contact_schema = ContactRow(time_zone=time_zone, attributes=attribute_specs(attributes, "contact"))
    order_schema = OrderRow(time_zone=time_zone, attributes=attribute_specs(attributes, "order"))
    contacts = [contact_schema.dump(contact_schema.load(c)) for c in entity.contacts]
    orders = [order_schema.dump(order_schema.load(o)) for o in entity.orders]
    if integration.get("hash_pii"):
        contacts = [hash_identifiers(c) for c in contacts]
    return contacts, orders


def sync_products(store: Any, metrika: Any, source: Any, integration_id: str, integration: dict,
                  wanted: dict[str, dict]) -> int:
    """Tell Metrika's product list about products that orders reference and it has not heard of
    (CDP reference §8.3), named from the snapshot's hints or, failing those, by the CRM. The list is
    always sent whole (replace or add is undocumented). Best effort: a failure leaves the products
    unknown, to be tried with the next order that names them; orders never wait for it."""
    unknown = [p for p in wanted if p not in store.known_products(integration_id, list(wanted))]
    if not unknown:
        return 0
    names = {p: (wanted[p] or {}).get("name") for p in unknown}
    missing = {p: wanted[p] for p in unknown if not names[p]}
    try:
        if missing and hasattr(source, "product_names"):
            names.update(source.product_names(integration, missing))
        listed = {**store.products(integration_id), **{p: (n or p)[:4096] for p, n in names.items()}}
        metrika.save_products(integration["counter_id"], [{"name": p, "humanized": n} for p, n in sorted(listed.items())])
    except (MetrikaError, RetryableSourceError, PermanentSourceError) as exc:
        log_event("product_sync_failed", integration_id=integration_id, products=len(unknown), error=str(exc)[:300])
        return 0
    store.put_products(integration_id, {p: listed[p] for p in unknown})
    log_event("product_sync", integration_id=integration_id, added=len(unknown), listed=len(listed))
    return len(unknown)


def delivery_facts(contacts: list[dict], orders: list[dict], last_order: str | None, time_zone: str) -> dict:
    """What the status endpoint reports: which identifiers the order's customer carried, and whether
    the order was already past Metrika's 21-day matching window when sent (CDP reference §13)."""
    customer = contacts[0] if contacts else {}
    order = orders[0] if orders else (json.loads(last_order) if last_order else None)
    if order is None:
        return {}
    created = datetime.strptime(order["create_date_time"], "%Y-%m-%d %H:%M:%S")
    return {"order": True, "with_client_id": bool(customer.get("client_ids")),
            "with_phone": bool(customer.get("phones") or customer.get("phones_md5")),
            "with_email": bool(customer.get("emails") or customer.get("emails_md5")),
            "late": (datetime.now(ZoneInfo(time_zone)).replace(tzinfo=None) - created).days > MATCHING_WINDOW_DAYS}


def deletion_rows(state: dict, deleted_status: str | None) -> EntityRows | None:
    """Metrika has no delete (CDP reference §1): a deleted deal is re-sent, as last sent, with the
    integration's `deleted_deal_status` (CANCELLED by default). None when there is nothing to change:
    never sent, a contact, already in that status, or the integration keeps deleted deals as they were."""
    last = state.get("last_order")
    if state.get("kind") != ORDER or not last or not deleted_status:
        return None
    order = json.loads(last)
    if order.get("order_status") == deleted_status:
        return None
    order.update(order_status=deleted_status, update_date_time=datetime.now(timezone.utc))
    order.pop("finish_date_time", None)
    return EntityRows(orders=[order])


_ROW_LOCATION = re.compile(r"^(contacts|orders)\[(\d+)\]")


def rejected_keys(exc: MetrikaError, ready: dict) -> set:
    """Entities whose rows Metrika's error locations point at, in the chunk that failed."""
    kind, id_field, index, chunk = getattr(exc, "chunk", (None, None, None, []))
    ids = set()
    for error in exc.errors:
        match = _ROW_LOCATION.match(str(error.get("location") or ""))
        if match and match[1] == kind and int(match[2]) < len(chunk):
            ids.add(chunk[int(match[2])][id_field])
    return {key for key, value in ready.items() if any(row[id_field] in ids for row in value[index])} if ids else set()


def content_hash_of(contacts: list[dict], orders: list[dict]) -> str:
    return hashlib.sha256(json.dumps([contacts, orders], sort_keys=True).encode()).hexdigest()


def _chunks(rows: Iterable[dict], key: str, size: int) -> Iterable[list[dict]]:
    """Chunks of at most `size` rows with no id twice: Metrika applies duplicate ids within one upload
    in random order (CDP reference §5.3), so the last row for an id wins here instead."""
    by_id = {row[key]: row for row in rows}
    values = list(by_id.values())
    for start in range(0, len(values), size):
        yield values[start:start + size]
