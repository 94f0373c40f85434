"""What a translation left out of an entity's rows, kept with the entity and summed on the status page.

A CRM value Metrika cannot take is not a reason to hold a deal back: a phone that is not a valid
number is left out of the contact (the rest of the contact still goes), a `cost` that is not an amount
is left out of the order (the order still goes). Each such value is noted in `EntityRows.notes`; the
delivery keeps the notes in the entity's `facts` (what its last delivery carried), and
`GET …/status` sums them with one example each. Phones are only ever noted masked (`mask_phone`).

Notes are plain dicts (they are stored as entity facts):

* `phones_dropped`: {contact uniq_id: phones left out}, for every contact row the entity carried, 0
  included, so a later delivery that carries the corrected contact overrides an older count;
* `phone_examples`: {contact uniq_id: one masked phone left out};
* `cost_dropped`: {"value": the CRM value (clipped), "reason": why it is not an amount}.

Pure: standard library and `chalicelib.normalize`.
"""
from __future__ import annotations

from typing import Any, Iterable

from ..normalize import parse_money

MAX_SHOWN_VALUE = 40


def phone_notes(uniq_id: str, dropped: list[str]) -> dict:
    """Notes for one contact row: how many of its phones were left out, and one of them (masked)."""
    notes: dict[str, Any] = {"phones_dropped": {uniq_id: len(dropped)}}
    if dropped:
        notes["phone_examples"] = {uniq_id: dropped[0]}
    return notes


def cost_note(value: Any, reason: str) -> dict:
    """The note for an order whose `cost` field held something that is not an amount."""
    return {"cost_dropped": {"value": str(value)[:MAX_SHOWN_VALUE], "reason": reason}}


def order_cost(values: list[Any], currency: str | None) -> tuple[Any, dict]:
    """A `cost_field`'s values → (the order's `cost`, or None; notes). A value that is not an amount
    (text, negative, not finite, too long, ambiguous, several values, a currency other than the
    order's) is left out and noted: a cost only refines profit ("Order data format",
    https://yandex.com/dev/metrika/en/data-import/orders-data: `cost` is optional, profit is revenue −
    cost), so it never holds back the order, its revenue and its status."""
    values = [v for v in values if v is not None and not (isinstance(v, str) and not v.strip())]
    if not values:
        return None, {}
    if len(values) > 1:
        return None, cost_note(", ".join(map(str, values)), "the field holds several values")
    try:
        amount, in_currency = parse_money(values[0])
    except ValueError as exc:
        return None, cost_note(values[0], str(exc))
    if in_currency and currency and in_currency != currency:
        return None, cost_note(values[0], f"in {in_currency}, the order is in {currency}")
    return amount, {}


def merge_notes(*notes: dict) -> dict:
    """Notes of one entity's rows together (its customer's, its order's)."""
    merged: dict[str, Any] = {}
    for note in notes:
        for key, value in note.items():
            merged[key] = {**merged.get(key, {}), **value} if key in ("phones_dropped", "phone_examples") else value
    return merged


def dropped_summary(entities: Iterable[dict]) -> dict:
    """The status page's view of the notes in entity states (as `StateStore.list_entities` gives them).

    A customer is carried by its own contact entity and by each of its deals, so phones are counted once
    per customer, from the entity that delivered it most recently (`sent_at`): a corrected contact
    clears its count even while older deals still carry the old note."""
    latest: dict[str, tuple[int, int, str | None]] = {}  # uniq_id → (sent_at, dropped, example)
    costs: list[tuple[int, str, dict]] = []
    for entity in entities:
        facts = entity.get("facts") or {}
        sent_at = int(entity.get("sent_at") or 0)
        examples = facts.get("phone_examples") or {}
        for uniq_id, dropped in (facts.get("phones_dropped") or {}).items():
            if uniq_id not in latest or sent_at >= latest[uniq_id][0]:
                latest[uniq_id] = (sent_at, int(dropped or 0), examples.get(uniq_id))
        if entity.get("kind") == "order" and facts.get("cost_dropped"):
            costs.append((sent_at, str(entity.get("crm_id")), facts["cost_dropped"]))
    counted = sorted(((at, uid, n, ex) for uid, (at, n, ex) in latest.items() if n), reverse=True)
    costs.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return {
        "phones_dropped": {
            "count": sum(n for _, _, n, _ in counted),
            "contacts": len(counted),
            "example": {"contact": counted[0][1], "phone": counted[0][3]} if counted else None,
        },
        "costs_dropped": {
            "count": len(costs),
            "example": {"order": costs[0][1], **costs[0][2]} if costs else None,
        },
    }


__all__ = ["phone_notes", "cost_note", "order_cost", "merge_notes", "dropped_summary"]
