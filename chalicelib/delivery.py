"""The one delivery sink: entities' rows in, one outcome per entity out.

    validate → each customer's complete row from its recorded sources → skip what Metrika already
    holds → chunk → upload (contacts first, through the quota governor) → record the customers'
    sources → Accepted / Retry / Parked per entity

The worker (live webhooks) and the history import both deliver through `Sink.deliver`; what they do
with the outcomes (mark clean, re-queue, release a hold) is theirs. The sink writes nothing about
entity state: results are values. It records each upload Metrika accepted as soon as it is accepted
(the confirm job checks it later), each customer's sources once its row is in Metrika, and keeps the
product list filled.

Why a contact row is the customer's complete record: one customer is described by its contact and by
each of its deals (their ClientIDs), and contacts go with merge mode SAVE, which replaces the record
("Data upload modes", https://yandex.com/dev/metrika/en/data-import/modes), so that a value removed in
the CRM leaves Metrika. Each row sent is therefore built from every source the store knows for the
customer, with the sources this delivery read replaced by what the CRM says now (`chalicelib.customers`);
the sources are recorded once Metrika accepted the row. An `add_lead` and an `add_contact` of one new
deal, landing in one batch, so give one row for their customer: Metrika applies rows with the same id
within one upload in random order ("Customer data format",
https://yandex.com/dev/metrika/en/data-import/contacts-data), and there is only ever one per id.

Why progress is kept per row: an entity counts as delivered only when all its rows were accepted.
When the contacts go up and the orders fail, the contacts' hashes come back in `Retry.row_hashes`,
the caller stores them, and the retry sends only the orders — so a retry needs one lucky request,
not two, and burns no budget on rows Metrika already has.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Union
from zoneinfo import ZoneInfo

from .crm import CONTACT, ORDER, EntityRows
from .customers import CustomerPlan, merge_contacts, part_of, plan_customers, source_id
from .errors import BridgeError, Misconfigured, Transient
from .logs import log_event
from .normalize import keep_valid, normalize_client_id
from .parallel import each
from .shared_counter import counter_products, id_prefix, scoped_id, scoped_rows

EntityKey = tuple[str, str]  # (kind, crm id)

MATCHING_WINDOW_DAYS = 21
# Few Metrika requests left today: wait for more rows so each request carries a full chunk.
LOW_BUDGET = 250
BATCH_HARDER_SECONDS = 300
_ROW_LOCATION = re.compile(r"^(contacts|orders)\[(\d+)\]")
# The order an entity's state keeps (`Accepted.last_order`, re-sent as CANCELLED should the deal be
# deleted) carries its products only while they take at most this many bytes of JSON (~70 products with
# amoCRM's or Bitrix24's numeric ids). The state item is rewritten by every webhook, claim and delivery,
# and DynamoDB bills each write by the item's whole size in 1 KB units, an update by the larger of the
# item before and after ("DynamoDB read and write operations",
# https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/read-write-operations.html), and refuses
# items over 400 KB: products kept whole made the item grow with the deal (6 KB at 500 products).
KEPT_PRODUCTS_BYTES = 1024
# In a retry's `row_hashes` (`_Ready.progress`): a customer whose row this resend (`Pending.resend`) has
# not got into Metrika yet, so the next attempt still sends it whatever the customer's record says.
RESEND_PENDING = "resend"


# --- inputs and outcomes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Pending:
    """One entity to deliver: its rows as the CRM gave them, and what Metrika already holds.

    `sent`: row key (`contact:<uniq_id>` / `order:<id>`) → hash of that row as Metrika last accepted
    it (this entity's own `row_hashes`, and for the history import the customers' own deliveries).
    `content_hash`: the entity's whole content as last delivered; equal content is not sent again.
    `customers_before`: the customers (`uniq_id`) its rows went to when last delivered
    (`previous_customers`); those it no longer has lose its source (a deleted deal, a deal moved to
    another contact). Contact rows are sent or skipped by what the store says Metrika holds for the
    customer, whoever sent it, not by `sent`; `resend` (what Metrika holds of the entity is unknown, as
    after a replay: `copy_unknown`) sends its customers' rows even so."""

    key: EntityKey
    rows: EntityRows
    sent: Mapping[str, str] = field(default_factory=dict)
    content_hash: str | None = None
    validated: tuple[list[dict], list[dict]] | None = None  # rows already through `validated_rows`
    customers_before: tuple[str, ...] = ()
    resend: bool = False


@dataclass(frozen=True)
class Accepted:
    """Every row of the entity is in Metrika (sent now, or already there)."""

    content_hash: str
    row_hashes: dict[str, str]
    uploading_id: str | None  # the last upload that carried a row of it; None when nothing was sent
    last_order: str | None  # the order as sent (JSON), so a later deletion can be reported
    facts: dict | None  # identifiers and lateness of the order, for the status page
    # The entity's customers as their CRM contacts read (a deal's row without the deal's own ClientIDs),
    # validated: the worker notes them as sent for the contacts themselves.
    contacts: list[dict]
    contacts_sent: int = 0
    orders_sent: int = 0
    # The customers (`uniq_id`) whose complete row this delivery sent for the entity: only their contacts
    # are worth noting as sent. Of a customer whose row Metrika already held, the delivery that sent that
    # row (or the contact's own) noted it, and its record says Metrika holds it either way.
    customers_sent: frozenset = frozenset()


@dataclass(frozen=True)
class Retry:
    """Rows of the entity are still to send, for a reason that passes. `row_hashes`: what Metrika holds
    of it now (the retry sends only the rest)."""

    error: dict
    after: float | None
    count_attempt: bool
    row_hashes: dict[str, str]
    contacts_sent: int = 0
    orders_sent: int = 0


@dataclass(frozen=True)
class Parked:
    """Cannot be delivered until a person acts (data, mapping or configuration); `error` says why."""

    error: dict


Outcome = Union[Accepted, Retry, Parked]


@dataclass(frozen=True)
class Upload:
    kind: str  # "contacts" or "orders"
    uploading_id: str
    rows: int


@dataclass
class Delivery:
    """What one `deliver` call did: an outcome per entity and the uploads Metrika accepted."""

    outcomes: dict[EntityKey, Outcome] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)


# --- pure helpers -------------------------------------------------------------------------------------

def content_hash_of(contacts: list[dict], orders: list[dict]) -> str:
    return hashlib.sha256(json.dumps([contacts, orders], sort_keys=True, default=str).encode()).hexdigest()


def row_key(kind: str, row: dict) -> str:
    return f"contact:{row['uniq_id']}" if kind == CONTACT else f"order:{row['id']}"


def row_hash(kind: str, row: dict) -> str:
    """A contact row hashes as a contact entity's whole content does, so a customer sent by its own
    delivery is recognised inside a deal's delivery (and the other way round)."""
    return content_hash_of([row], []) if kind == CONTACT else content_hash_of([], [row])


def entity_row_hashes(contacts: list[dict], orders: list[dict]) -> dict[str, str]:
    return {**{row_key(CONTACT, c): row_hash(CONTACT, c) for c in contacts},
            **{row_key(ORDER, o): row_hash(ORDER, o) for o in orders}}


def previous_customers(state: Mapping[str, Any]) -> tuple[str, ...]:
    """The customers an entity's rows went to when it was last delivered: the contact keys of its row
    hashes, and the customer of the order last sent (entities sent before row hashes existed)."""
    customers = [key.partition(":")[2] for key in (state.get("row_hashes") or {}) if key.startswith(f"{CONTACT}:")]
    if state.get("last_order"):
        customer = json.loads(state["last_order"]).get("client_uniq_id")
        if customer:
            customers.append(str(customer))
    return tuple(dict.fromkeys(customers))


def copy_unknown(state: Mapping[str, Any]) -> bool:
    """The entity was sent, and what was sent has been forgotten since: send all of it again, its
    customers included. `forget_content` (a replay) drops the hashes and the last order; `mark_resend`
    (an upload Metrika listed FAILED) leaves `row_hashes` empty and keeps `last_order` for deletions;
    a retry of such a delivery marks the customers still owed (RESEND_PENDING)."""
    if RESEND_PENDING in (state.get("row_hashes") or {}).values():
        return True
    if not state.get("sent_at") or state.get("content_hash"):
        return False
    return state.get("row_hashes") == {} or not (state.get("row_hashes") or state.get("last_order"))


def kept_order(order: dict) -> str:
    """The order as the entity's state keeps it (JSON): as sent, without its products when they take
    more than KEPT_PRODUCTS_BYTES. Such an order, deleted in the CRM, is re-sent as CANCELLED without
    products (merge mode SAVE: Metrika's record of it then lists none; "Data upload modes",
    https://yandex.com/dev/metrika/en/data-import/modes)."""
    products = order.get("products")
    if products and len(json.dumps(products, ensure_ascii=False).encode()) > KEPT_PRODUCTS_BYTES:
        order = {k: v for k, v in order.items() if k != "products"}
    return json.dumps(order, sort_keys=True, ensure_ascii=False)


def newest_order(rows: list[dict]) -> dict:
    """Orders are sent whole (merge mode SAVE): of two rows for one order, the newest stands."""
    return sorted(rows, key=lambda r: str(r.get("update_date_time") or ""))[-1]


def attribute_specs(attributes: list[dict], entity: str) -> dict[str, dict]:
    """The attribute mapping's entries for `contact` or `order`, by Metrika name, as the row schemas
    take them."""
    return {a["name"]: {"type": a["type"], "multivalued": a.get("multivalued", False), "crm_field": a["crm_field"]}
            for a in attributes if a["entity"] == entity}


def csv_kinds_for(attributes: list[dict]) -> set[str]:
    """Rows of an entity with mapped attributes go as CSV, the documented carrier of attribute values
    ("Upload contacts (CSV)", https://yandex.com/dev/metrika/en/management/openapi/schema/uploadContacts);
    the others stay JSON."""
    return {"contacts" if a["entity"] == "contact" else "orders" for a in attributes}


def validated_rows(integration: dict, attributes: list[dict], entity: EntityRows) -> tuple[list[dict], list[dict]]:
    """One entity's raw rows → the rows as sent: validated, normalised, hashed when the integration
    says so. Raises marshmallow's ValidationError."""
    from .metrika.schemas import ContactRow, OrderRow, hash_identifiers  # marshmallow stays off the webhook path
    time_zone = integration["timezone"]
    contact_schema = ContactRow(time_zone=time_zone, attributes=attribute_specs(attributes, "contact"))
    order_schema = OrderRow(time_zone=time_zone, attributes=attribute_specs(attributes, "order"))
    contacts = [contact_schema.dump(contact_schema.load(c)) for c in entity.contacts]
    orders = [order_schema.dump(order_schema.load(o)) for o in entity.orders]
    if integration.get("hash_pii") is True:
        contacts = [hash_identifiers(c) for c in contacts]
    # Ids as Metrika knows them on a counter several integrations share (the one place they are set).
    return scoped_rows(id_prefix(integration), contacts, orders)


def delivery_facts(contacts: list[dict], orders: list[dict], time_zone: str,
                   now: datetime | None = None) -> dict | None:
    """What the status endpoint reports: which identifiers the order's customer carried, and whether
    the order was already past Metrika's 21-day matching window when sent ("Загрузка данных о
    клиентах", https://yandex.ru/dev/metrika/ru/data-import/contacts)."""
    if not orders:
        return None
    order = orders[0]
    customer = next((c for c in contacts if c.get("uniq_id") == order.get("client_uniq_id")),
                    contacts[0] if contacts else {})
    created = datetime.strptime(order["create_date_time"], "%Y-%m-%d %H:%M:%S")
    local_now = (now or datetime.now(ZoneInfo(time_zone))).astimezone(ZoneInfo(time_zone)).replace(tzinfo=None)
    return {"order": True, "with_client_id": bool(customer.get("client_ids")),
            "with_phone": bool(customer.get("phones") or customer.get("phones_md5")),
            "with_email": bool(customer.get("emails") or customer.get("emails_md5")),
            "late": (local_now - created).days > MATCHING_WINDOW_DAYS}


# --- the sink ----------------------------------------------------------------------------------------

@dataclass
class _Ready:
    """An entity that passed validation. Its contact rows (`contacts`) are its customers' complete rows,
    attached once the customers are planned (`attach`)."""

    contacts: list[dict]
    orders: list[dict]
    content_hash: str
    hashes: dict[str, str]  # every row of it
    accepted: dict[str, str]  # rows in Metrika (before this call, or accepted during it)
    uploading_id: str | None = None
    contacts_sent: int = 0
    orders_sent: int = 0
    notes: dict | None = None  # what the translation left out (EntityRows.notes), kept in the facts
    parts: dict[str, dict[str, dict | None]] = field(default_factory=dict)  # customer → source → part now
    left: set[str] = field(default_factory=set)  # customers it no longer has
    noted: list[dict] = field(default_factory=list)  # for `Accepted.contacts`
    plans: dict[str, CustomerPlan] = field(default_factory=dict)  # its customers' plans, by uniq_id
    resend: bool = False  # `Pending.resend`
    customers_sent: set[str] = field(default_factory=set)  # customers whose row this delivery sent

    def unsent(self, kind: str) -> list[dict]:
        rows = self.contacts if kind == CONTACT else self.orders
        return [r for r in rows if self.accepted.get(row_key(kind, r)) != self.hashes[row_key(kind, r)]]

    def attach(self, key: EntityKey, plans: Mapping[str, CustomerPlan]) -> None:
        """Take the complete row of each customer it has or left; a row Metrika already holds (whoever
        sent it) counts as accepted."""
        for uniq_id in (*self.parts, *sorted(self.left)):
            plan = plans.get(uniq_id)
            if plan is None or key not in plan.owners:
                continue
            self.plans[uniq_id] = plan
            if plan.row is None:
                continue
            row_id = row_key(CONTACT, plan.row)
            self.contacts.append(plan.row)
            self.hashes[row_id] = plan.row_hash
            if plan.settled:
                self.accepted[row_id] = plan.row_hash

    def kept_hashes(self) -> dict[str, str]:
        """Row hashes once delivered: the customers it left are no longer its own."""
        gone = {row_key(CONTACT, {"uniq_id": c}) for c in self.left}
        return {k: h for k, h in self.hashes.items() if k not in gone}

    def progress(self) -> dict[str, str]:
        """What a retry needs: the rows Metrika holds, and every customer it has or still leaves (so the
        retry knows them as `customers_before`; contact rows are skipped by the customer's record, unless
        this is a resend, whose customers stay owed until accepted: RESEND_PENDING)."""
        customers = {row_key(CONTACT, {"uniq_id": c}): "" for c in self.left}
        customers.update({row_key(CONTACT, {"uniq_id": c}): RESEND_PENDING if self.resend else "" for c in self.parts})
        return {**customers, **self.accepted}


_COUNTER_LOCKS: dict[Any, threading.Lock] = {}
_COUNTER_LOCKS_LOCK = threading.Lock()


def counter_lock(counter_id: Any) -> threading.Lock:
    """This process's lock for a counter's product list (`Sink.sync_products`)."""
    with _COUNTER_LOCKS_LOCK:
        return _COUNTER_LOCKS.setdefault(counter_id, threading.Lock())


class Sink:
    """Delivers entities of one integration to its Metrika counter.

    `store` needs `record_upload` and the product methods; `metrika` is a `MetrikaClient` (its
    governor holds the in-flight slots and the daily budget); `name_products(integration, products)`
    asks the CRM for product names the rows did not carry."""

    def __init__(self, store: Any, metrika: Any, *, row_limit: int = 1000,
                 name_products: Callable[[dict, dict[str, dict]], dict[str, str]] | None = None,
                 batch_harder: bool = False, batch_harder_seconds: int = BATCH_HARDER_SECONDS) -> None:
        self._store, self._metrika, self._row_limit = store, metrika, row_limit
        self._name_products = name_products
        self._batch_harder, self._batch_harder_seconds = batch_harder, batch_harder_seconds

    def deliver(self, integration_id: str, integration: dict, pending: Iterable[Pending], *,
                attributes: list[dict] = ()) -> Delivery:
        result = Delivery()
        prepared: dict[EntityKey, _Ready] = {}
        ready: dict[EntityKey, _Ready] = {}
        products: dict[str, dict] = {}
        for item in pending:
            outcome = self._prepare(integration, attributes, item)
            if isinstance(outcome, _Ready):
                prepared[item.key] = outcome
                products.update(item.rows.products)
            else:
                result.outcomes[item.key] = outcome
        plans = self._plan_customers(integration_id, prepared)
        # Customers whose complete row Metrika already holds: their sources are recorded now.
        self._record_customers(integration_id, [p for p in plans.values() if p.settled and p.to_record],
                               prepared, result)
        for key, entity in prepared.items():
            if key in result.outcomes:
                continue
            if entity.unsent(CONTACT) or entity.unsent(ORDER):
                ready[key] = entity
            else:
                result.outcomes[key] = self._accepted(integration, entity)
        if not ready:
            return result
        rows = sum(len(r.unsent(CONTACT)) + len(r.unsent(ORDER)) for r in ready.values())
        remaining = self._metrika.remaining_budget() if self._batch_harder else None
        if remaining is not None and remaining < LOW_BUDGET and rows < self._row_limit:
            error = {"kind": "transient", "message": f"batching harder: {remaining} Metrika requests left today"}
            for key, entity in ready.items():
                result.outcomes[key] = Retry(error, self._batch_harder_seconds, False, entity.progress())
            return result
        ordered = {p for r in ready.values() for o in r.unsent(ORDER) for p in o.get("products") or {}}
        if ordered:
            self.sync_products(integration_id, integration, {p: products.get(p, {}) for p in ordered})
        self._upload(integration_id, integration, ready, result, csv_kinds_for(list(attributes)))
        for key, entity in ready.items():
            if key not in result.outcomes:
                result.outcomes[key] = self._accepted(integration, entity)
        return result

    def _prepare(self, integration: dict, attributes: list[dict], item: Pending) -> _Ready | Parked:
        from marshmallow import ValidationError
        if item.rows.error:
            return Parked(item.rows.error)
        try:
            contacts, orders = item.validated or validated_rows(integration, attributes, item.rows)
            parts, noted = self._sources(integration, attributes, item, contacts)
        except ValidationError as exc:
            return Parked({"kind": "permanent", "message": "row failed validation", "fields": exc.messages})
        hashes = entity_row_hashes([], orders)  # contact rows: their customers' complete rows, once planned
        content_hash = content_hash_of(contacts, orders)  # what the CRM says of this entity alone
        if content_hash == item.content_hash:
            accepted = dict(hashes)  # delivered as it is
        else:
            accepted = {k: h for k, h in item.sent.items() if hashes.get(k) == h}
        # Customers it had under another id scheme (before a move onto a shared counter gave it a prefix)
        # are not its own on this counter: a raw id there is another integration's customer.
        prefix = id_prefix(integration)
        left = {c for c in item.customers_before if scoped_id(prefix, c) == c} - set(parts)
        return _Ready([], orders, content_hash, hashes, accepted, notes=item.rows.notes, parts=parts,
                      left=left, noted=noted, resend=item.resend)

    @staticmethod
    def _sources(integration: dict, attributes: list[dict], item: Pending,
                 contacts: list[dict]) -> tuple[dict[str, dict[str, dict | None]], list[dict]]:
        """What the entity says of each customer now, by source (`chalicelib.customers`): its own row is
        one source; a deal's row for a CRM contact is two, the contact as read now (`contact:<id>`) and
        the deal's ClientIDs (None when it has none). Also the customers' rows as their contacts read,
        for `Accepted.contacts`. `contacts` are the validated rows, in the order of the raw ones."""
        own = source_id(item.key)
        parts: dict[str, dict[str, dict | None]] = {}
        noted: list[dict] = []
        for raw, row in zip(item.rows.contacts, contacts):
            split = item.rows.contact_parts.get(str(raw.get("uniq_id")))
            if split is None:
                parts.setdefault(row["uniq_id"], {})[own] = part_of(row)
                noted.append(row)
                continue
            contact_row, deal_client_ids = split
            [contact], _ = validated_rows(integration, attributes, EntityRows(contacts=[contact_row]))
            contact = {**contact, "uniq_id": row["uniq_id"]}
            client_ids = keep_valid(deal_client_ids, normalize_client_id)
            parts.setdefault(row["uniq_id"], {}).update({
                source_id((CONTACT, str(raw["uniq_id"]))): part_of(contact),
                own: {"client_ids": client_ids} if client_ids else None})
            noted.append(contact)
        return parts, noted

    def _plan_customers(self, integration_id: str, prepared: dict[EntityKey, _Ready]) -> dict[str, CustomerPlan]:
        """One read of the customers' recorded sources; each entity takes its customers' complete rows."""
        wanted = sorted({c for entity in prepared.values() for c in (*entity.parts, *entity.left)})
        if not wanted:
            return {}
        plans = plan_customers(self._store.customers(integration_id, wanted),
                               {key: entity.parts for key, entity in prepared.items()},
                               {key: entity.left for key, entity in prepared.items() if entity.left})
        for entity in prepared.values():
            for uniq_id in entity.parts if entity.resend else ():
                if uniq_id in plans:
                    plans[uniq_id].sent = None  # as if Metrika had none of it: sent, then recorded
        for key, entity in prepared.items():
            entity.attach(key, plans)
        return plans

    def _record_customers(self, integration_id: str, plans: Iterable[CustomerPlan],
                          entities: Mapping[EntityKey, _Ready], result: Delivery) -> None:
        """Record the sources of customers whose row Metrika holds now. One conditional write each: if
        another delivery recorded the customer since we read it, our row may lack its change (or it
        ours), so nothing is recorded and the customer's entities are retried; the retry reads the CRM
        and the store again and sends the complete row."""
        todo = [plan for plan in plans if plan.to_record]
        recorded = each(lambda plan: self._store.record_customer(
            integration_id, plan.uniq_id, put=plan.put, drop=sorted(plan.drop), sent=plan.row_hash,
            version=plan.version), todo)
        for plan, ok in zip(todo, recorded):
            if ok:
                plan.version, plan.sent, plan.put, plan.drop = plan.version + 1, plan.row_hash, {}, set()
                continue
            log_event("customer_changed_meanwhile", integration_id=integration_id, entities=len(plan.owners))
            error = {"kind": "transient", "message": "the customer was changed by another delivery at the same "
                                                     "time: sent again with both changes"}
            for key in sorted(plan.owners):
                entity = entities.get(key)
                if entity is not None and key not in result.outcomes:
                    result.outcomes[key] = Retry(error, None, True, entity.progress(), entity.contacts_sent,
                                                 entity.orders_sent)

    def _accepted(self, integration: dict, entity: _Ready) -> Accepted:
        last_order = kept_order(entity.orders[0]) if entity.orders else None
        facts = delivery_facts(entity.contacts, entity.orders, integration["timezone"])
        if entity.notes is not None:  # replaces the last delivery's notes, so a corrected value clears them
            facts = {**(facts or {}), **entity.notes}
        return Accepted(entity.content_hash, entity.kept_hashes(), entity.uploading_id, last_order,
                        facts, entity.noted, entity.contacts_sent, entity.orders_sent,
                        frozenset(entity.customers_sent))

    def _upload(self, integration_id: str, integration: dict, ready: dict[EntityKey, _Ready], result: Delivery,
                csv_kinds: set[str]) -> None:
        """Contacts, then orders: orders are linked to visits through their contacts, so a contact must
        be in Metrika before its orders ("Order data format",
        https://yandex.com/dev/metrika/en/data-import/orders-data)."""
        for kind, plural in ((CONTACT, "contacts"), (ORDER, "orders")):
            while True:
                live = {k: e for k, e in ready.items() if k not in result.outcomes}
                by_id: dict[str, list[tuple[EntityKey, dict]]] = {}
                for key, entity in live.items():
                    for row in entity.unsent(kind):
                        by_id.setdefault(row_key(kind, row), []).append((key, row))
                if not by_id:
                    break
                chunk_ids = list(by_id)[:self._row_limit]
                chunk = [self._merged(kind, [row for _, row in by_id[i]]) for i in chunk_ids]
                upload = self._metrika.upload_contacts if kind == CONTACT else self._metrika.upload_orders
                try:
                    uploading_id = upload(integration["counter_id"], chunk, as_csv=plural in csv_kinds)["uploading_id"]
                except Transient as exc:
                    self._retry_all(live, exc, result)
                    return
                except Misconfigured as exc:  # the token or counter: nothing of this integration can go
                    for key, entity in live.items():
                        if entity.unsent(CONTACT) or entity.unsent(ORDER):
                            result.outcomes[key] = Parked(exc.describe())
                    return
                except BridgeError as exc:  # refused: park the rows' entities Metrika names, send the rest
                    named = self._refused(exc, plural, chunk_ids)
                    owners = {key for i in (named or chunk_ids) for key, _ in by_id[i]}
                    for key in owners:
                        result.outcomes[key] = Parked(exc.describe())
                    log_event("upload_refused", integration_id=integration_id, kind=plural,
                              entities=len(owners), located=bool(named))
                    continue
                # With the entities it carried: should Metrika report it FAILED, they are sent again.
                self._store.record_upload(integration_id, uploading_id, kind=plural, rows=len(chunk),
                                          entities=sorted({key for i in chunk_ids for key, _ in by_id[i]}))
                result.uploads.append(Upload(plural, uploading_id, len(chunk)))
                for i in chunk_ids:
                    for key, row in by_id[i]:
                        entity = ready[key]
                        entity.accepted[i] = entity.hashes[i]
                        entity.uploading_id = uploading_id
                        if kind == CONTACT:
                            entity.contacts_sent += 1
                            entity.customers_sent.add(row["uniq_id"])
                        else:
                            entity.orders_sent += 1
                if kind == CONTACT:  # accepted: now their sources may be recorded
                    self._record_customers(integration_id, [ready[by_id[i][0][0]].plans[row["uniq_id"]]
                                                            for i, row in zip(chunk_ids, chunk)], ready, result)

    @staticmethod
    def _merged(kind: str, rows: list[dict]) -> dict:
        if len(rows) == 1:
            return rows[0]
        return merge_contacts(rows) if kind == CONTACT else newest_order(rows)

    @staticmethod
    def _refused(exc: BridgeError, plural: str, chunk_ids: list[str]) -> list[str]:
        """Row keys of the chunk that Metrika's error locations point at (`orders[3].createDateTime`)."""
        named = []
        for location in exc.locations:
            match = _ROW_LOCATION.match(location)
            if match and match[1] == plural and int(match[2]) < len(chunk_ids):
                named.append(chunk_ids[int(match[2])])
        return named

    @staticmethod
    def _retry_all(live: dict[EntityKey, _Ready], exc: Transient, result: Delivery) -> None:
        """Every entity with rows still to send waits; one whose rows all went up (a contact, before the
        orders failed) is delivered, and the caller's `deliver` marks it Accepted."""
        for key, entity in live.items():
            if not (entity.unsent(CONTACT) or entity.unsent(ORDER)):
                continue
            result.outcomes[key] = Retry(exc.describe(), exc.retry_after, exc.counts_attempt, entity.progress(),
                                         entity.contacts_sent, entity.orders_sent)

    def sync_products(self, integration_id: str, integration: dict, wanted: dict[str, dict]) -> int:
        """Tell Metrika's product list about products that orders reference and it has not heard of
        ("createProducts", https://yandex.ru/dev/metrika/ru/management/openapi/schema/createProducts),
        named from the rows' hints or, failing those, by the CRM. The list is always sent whole (the
        docs do not say whether a save replaces or adds). Best effort: orders never wait for it, and a
        failure leaves the products unknown, to be tried with the next order that names them.

        One read of the integration's list (`products`: one query, whatever the number of products the
        batch names), then set lookups; the same read is the integration's part of the list sent."""
        own = self._store.products(integration_id)
        unknown = [p for p in wanted if p not in own]
        if not unknown:
            return 0
        names = {p: (wanted[p] or {}).get("name") for p in unknown}
        missing = {p: wanted[p] for p in unknown if not names[p]}
        try:
            if missing and self._name_products is not None:
                names.update(self._name_products(integration, missing))
        except BridgeError as exc:
            log_event("product_sync_failed", integration_id=integration_id, products=len(unknown), error=exc.message[:300])
            return 0
        # Read the counter's list, send it, record ours: one sync per counter at a time in this process, or
        # two integrations of the counter worked on side by side (chalicelib/worker.py) each send a list
        # without the other's new products, and the one sent last drops them for good.
        with counter_lock(integration["counter_id"]):
            try:
                listed = {**counter_products(self._store, integration_id, integration["counter_id"], own=own),
                          **{p: (n or p)[:4096] for p, n in names.items()}}
                self._metrika.save_products(integration["counter_id"],
                                            [{"name": p, "humanized": n} for p, n in sorted(listed.items())])
            except BridgeError as exc:
                log_event("product_sync_failed", integration_id=integration_id, products=len(unknown),
                          error=exc.message[:300])
                return 0
            self._store.put_products(integration_id, {p: listed[p] for p in unknown})
        log_event("product_sync", integration_id=integration_id, added=len(unknown), listed=len(listed))
        return len(unknown)
