"""What the CRM says about each customer now, source by source, and the complete row that follows.

Why: Metrika keeps what it was sent until it is sent something else, so a wrong ClientID, phone or
e-mail (a manager's own browser ClientID captured by a form into a deal) stays there unless a later
upload replaces it. One customer (a contact `uniq_id`) is described by several CRM entities at once:
the contact itself (its phones, e-mails, its own ClientID field) and each of its deals (the deal's, or
its lead's, ClientID field). Each is a *source*. The store keeps, per customer, each source's current
part (`CustomerStore`); every contact row sent is the merge of all of them, with the sources this
delivery read replaced by what the CRM says now, and goes with merge mode SAVE, which replaces the
record ("Data upload modes", https://yandex.com/dev/metrika/en/data-import/modes). So a value removed
from its source leaves Metrika with the next upload of that customer, while the values of the other
sources stay.

Sources are named after the entity that reads them: `contact:<id>` (the contact's own row, whether
its own delivery or a deal's delivery read it: the freshest read, by `update_date_time`, stands) and
`order:<id>` (a deal's ClientIDs; or, for a customer made from a deal without contact, the whole row).

Pure: no I/O; `delivery.Sink` reads and records through the store.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

LIST_FIELDS = ("client_ids", "phones", "emails", "phones_md5", "emails_md5", "user_ids")
CONTACT_SOURCE_PREFIX = "contact:"
# Past SOURCE_LIMIT deals per customer, further deals' identifiers join this shared source, which only
# grows (as APPEND did), up to OVERFLOW_VALUES: such values no longer leave Metrika when removed. A
# customer with more than 100 deals carrying ClientIDs is hardly a real one (a placeholder contact, say);
# the limit keeps one record write within DynamoDB's 4 KB update expression (a path per source set or
# removed) and the item far below its 400 KB.
OVERFLOW_SOURCE = "overflow"
SOURCE_LIMIT = 100
# And each list of a deal's part keeps its first SOURCE_VALUES values, the overflow's its newest
# OVERFLOW_VALUES (older ones fall out of the record, and so, with SAVE, out of Metrika): without them the
# overflow grew with every deal ever linked (~22 bytes a ClientID: some 18,000 deals' ClientIDs fill 400 KB,
# and then every write of the customer fails, holding its deals' orders for good), and one deal with
# thousands of values in its ClientID field could fill the item alone. Bounded, the record stays under
# ~250 KB: 100 deals × 50 ClientIDs, 5,000 in the overflow, and the contact's own row.
SOURCE_VALUES = 50
OVERFLOW_VALUES = 5000

EntityKey = tuple[str, str]  # (kind, crm id)


def source_id(key: EntityKey) -> str:
    return f"{key[0]}:{key[1]}"


def merge_contacts(rows: Iterable[Mapping[str, Any]]) -> dict:
    """Rows of one customer → one row: lists united (first seen first), scalars and each custom
    attribute from the newest row (by `update_date_time`; on a tie the later row)."""
    merged: dict[str, Any] = {}
    for row in sorted(rows, key=lambda r: str(r.get("update_date_time") or "")):
        for name, value in row.items():
            if name in LIST_FIELDS:
                merged[name] = list(dict.fromkeys([*merged.get(name, []), *value]))
            elif name == "attribute_values":
                merged[name] = {**merged.get(name, {}), **value}
            else:
                merged[name] = value
    return merged


def row_hash(row: Mapping[str, Any]) -> str:
    """Hash of a contact row as `delivery.row_hash` computes it for contacts."""
    return hashlib.sha256(json.dumps([[row], []], sort_keys=True, default=str).encode()).hexdigest()


def part_of(row: Mapping[str, Any]) -> dict:
    """A validated row as a source keeps it: everything but the id (the customer's key)."""
    return {k: v for k, v in row.items() if k != "uniq_id"}


def identifiers_only(part: Mapping[str, Any]) -> bool:
    """A part that names no customer by itself (a deal's ClientIDs): no name, dates or attributes. A
    row built from such parts alone must not go with SAVE, which would empty the rest of the record."""
    return all(name in LIST_FIELDS for name in part)


def _fresher(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """A contact read at least as new as the stored one (its `update_date_time`; unknown counts as new)."""
    new_time, old_time = new.get("update_date_time"), old.get("update_date_time")
    return new_time is None or old_time is None or str(new_time) >= str(old_time)


@dataclass
class CustomerPlan:
    """One customer in one delivery: what to record and what to send.

    `put`: sources to set (each replaces only itself); `drop`: sources to remove; `row`: the complete
    row to send (None: the sources left describe no customer, so nothing is sent and Metrika keeps what
    it has); `version` and `sent` (hash of the row Metrika last accepted for it) as read."""

    uniq_id: str
    version: int
    sent: str | None
    put: dict[str, dict] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    row: dict | None = None
    owners: set[EntityKey] = field(default_factory=set)  # the entities whose sources these are
    current: bool = False  # some entity of this delivery has the customer (not only left it)

    @property
    def row_hash(self) -> str | None:
        return row_hash(self.row) if self.row is not None else None

    @property
    def settled(self) -> bool:
        """Metrika already holds this row (or there is none to send)."""
        return self.row is None or self.sent == self.row_hash

    @property
    def to_record(self) -> bool:
        return bool(self.put or self.drop) or (self.row is not None and self.sent != self.row_hash)


def _capped(sid: str, part: Mapping[str, Any]) -> dict:
    """A part as the record keeps it: a deal's lists cut to SOURCE_VALUES (the contact's own row is the
    CRM's contact as it is, and bounded there)."""
    if sid.startswith(CONTACT_SOURCE_PREFIX):
        return dict(part)
    return {name: value[:SOURCE_VALUES] if name in LIST_FIELDS else value for name, value in part.items()}


def plan_customers(stored: Mapping[str, Mapping[str, Any]],
                   contributions: Mapping[EntityKey, Mapping[str, Mapping[str, dict | None]]],
                   left: Mapping[EntityKey, Iterable[str]], *, limit: int = SOURCE_LIMIT,
                   overflow_values: int = OVERFLOW_VALUES) -> dict[str, CustomerPlan]:
    """Every customer a delivery touches → its plan.

    `stored`: uniq_id → {"sources", "sent", "version"} as the store has them (absent: none yet).
    `contributions`: entity → uniq_id → source id → the part the CRM gives now (None: the source says
    nothing any more, e.g. a deal whose ClientID was cleared). `left`: entity → customers it no longer
    has (a deleted deal, a deal moved to another contact): its source is removed from them."""
    proposed: dict[str, dict[str, dict | None]] = {}
    owners: dict[str, set[EntityKey]] = {}
    for key, customers in contributions.items():
        for uniq_id, parts in customers.items():
            owners.setdefault(uniq_id, set()).add(key)
            mine = proposed.setdefault(uniq_id, {})
            for sid, part in parts.items():
                # Two entities read the same contact (its deal and itself): the newest read stands.
                if sid in mine and mine[sid] is not None and (part is None or not _fresher(part, mine[sid])):
                    continue
                mine[sid] = None if part is None else _capped(sid, part)
    leaving: dict[str, set[str]] = {}
    for key, customers in left.items():
        for uniq_id in customers:
            if uniq_id not in proposed or source_id(key) not in proposed[uniq_id]:
                leaving.setdefault(uniq_id, set()).add(source_id(key))
                owners.setdefault(uniq_id, set()).add(key)
    plans: dict[str, CustomerPlan] = {}
    for uniq_id in sorted(set(proposed) | set(leaving)):
        record = stored.get(uniq_id) or {}
        sources: dict[str, dict] = dict(record.get("sources") or {})
        plan = CustomerPlan(uniq_id, int(record.get("version") or 0), record.get("sent"),
                            owners=owners.get(uniq_id, set()), current=uniq_id in proposed)
        plan.drop = {sid for sid in leaving.get(uniq_id, ()) if sid in sources}
        for sid, part in sorted(proposed.get(uniq_id, {}).items()):
            old = sources.get(sid)
            if part is None:
                if old is not None:
                    plan.drop.add(sid)
            elif old is not None and sid.startswith(CONTACT_SOURCE_PREFIX) and not _fresher(part, old):
                continue  # a slower delivery read the contact before the one recorded
            elif part != old:
                plan.put[sid] = part
        _bound(plan, sources, limit, overflow_values)
        after = {sid: part for sid, part in {**sources, **plan.put}.items() if sid not in plan.drop}
        if plan.current or (plan.drop and not all(identifiers_only(p) for p in after.values())):
            ordered = sorted(after.items(), key=lambda item: (str(item[1].get("update_date_time") or ""), item[0]))
            plan.row = {**merge_contacts(part for _, part in ordered), "uniq_id": uniq_id}
        if not plan.to_record and plan.row is None:
            continue  # nothing of it changes: a no-op drop
        plans[uniq_id] = plan
    return plans


def _bound(plan: CustomerPlan, sources: Mapping[str, dict], limit: int, overflow_values: int) -> None:
    """Keep at most `limit` deal sources: new ones past it fold into the overflow source, whose lists
    keep their newest `overflow_values` values."""
    bounded = lambda sid: not sid.startswith(CONTACT_SOURCE_PREFIX) and sid != OVERFLOW_SOURCE  # noqa: E731
    count = sum(1 for sid in sources if bounded(sid) and sid not in plan.drop)
    folded: dict[str, list] = {}
    for sid in sorted(plan.put):
        if not bounded(sid) or sid in sources:
            continue
        if count < limit:
            count += 1
            continue
        part = plan.put.pop(sid)
        for name in LIST_FIELDS:
            if part.get(name):
                folded[name] = list(dict.fromkeys([*folded.get(name, []), *part[name]]))
    if folded:
        old = sources.get(OVERFLOW_SOURCE) or {}
        overflow = {name: values[-overflow_values:] for name, values in merge_contacts([old, folded]).items()}
        if overflow != old:
            plan.put[OVERFLOW_SOURCE] = overflow
