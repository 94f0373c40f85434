"""CRM stage → Metrika order status: the rules, and nothing else (no store, no Metrika calls).

Metrika side: "Order status mapping", https://yandex.com/dev/metrika/en/management/openapi/schema/mapOrderStatuses,
and "How to map order statuses", https://yandex.ru/dev/metrika/en/data-import/maporderstatuses-about.
Several CRM stages may share one Metrika status id (e.g. every "in work" stage → `in_work`); they
must then agree on its type and label, since Metrika keeps one entry per id.

Reading and replacing an integration's mapping (store and Metrika I/O) is `mapping_admin`.
"""
from __future__ import annotations

import json
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from .metrika.schemas import OrderStatus

# A mapping is stored as one item (DynamoDB's limit is 400 KB) and pushed before it is stored: one too
# large to store must be refused before the push, or Metrika would hold a list the service never kept.
# 300 KB of JSON (under 400 KB as DynamoDB counts it) is 1,000 entries with 200-character labels; a real
# pipeline set is a few dozen stages.
MAX_MAPPING_BYTES = 300 * 1024


class StatusMappingEntry(Schema):
    class Meta:
        unknown = RAISE

    crm_status = fields.String(required=True, validate=[validate.Length(min=1, max=255),
                                                        validate.Regexp(r"\S", error="must not be blank")])
    metrika_status_id = fields.String(required=True)  # checked by OrderStatus, the single definition
    humanized = fields.String(validate=validate.Length(max=4096))
    type = fields.String(required=True)
    goal_action_ids = fields.List(fields.String(validate=validate.Length(min=1, max=255)),
                                  validate=validate.Length(max=10))

    @validates_schema
    def _as_metrika_status(self, data: dict, **kwargs: Any) -> None:
        """Id and type follow OrderStatus, the single definition of Metrika's rules."""
        try:
            OrderStatus().load({"id": data["metrika_status_id"], "type": data["type"]})
        except ValidationError as exc:
            raise ValidationError({"metrika_status_id" if k == "id" else k: v
                                   for k, v in exc.messages.items()}) from exc


class StatusMapping(Schema):
    class Meta:
        unknown = RAISE

    entries = fields.List(fields.Nested(StatusMappingEntry), required=True, validate=validate.Length(min=1, max=1000))

    @validates_schema
    def _consistent(self, data: dict, **kwargs: Any) -> None:
        seen_crm: set[str] = set()
        by_metrika_id: dict[str, dict] = {}
        errors: dict[int, str] = {}
        for index, entry in enumerate(data["entries"]):
            if entry["crm_status"] in seen_crm:
                errors[index] = f"crm_status {entry['crm_status']!r} is mapped twice"
            seen_crm.add(entry["crm_status"])
            first = by_metrika_id.setdefault(entry["metrika_status_id"], entry)
            if (first["type"], first.get("humanized")) != (entry["type"], entry.get("humanized")):
                errors[index] = (f"metrika_status_id {entry['metrika_status_id']!r} is used with different "
                                 f"type or humanized values")
        if errors:
            raise ValidationError(errors, "entries")
        size = len(json.dumps(data["entries"], ensure_ascii=False).encode("utf-8"))
        if size > MAX_MAPPING_BYTES:
            raise ValidationError(f"the entries take {size:,} bytes; at most {MAX_MAPPING_BYTES:,} can be kept "
                                  "(shorten the humanized labels)", "entries")


def to_order_statuses(entries: list[dict]) -> list[dict]:
    """The complete list for Metrika: one entry per Metrika status id, in first-seen order."""
    statuses: dict[str, dict] = {}
    for entry in entries:
        status = {"id": entry["metrika_status_id"], "type": entry["type"],
                  "humanized": entry.get("humanized") or entry["metrika_status_id"]}
        if entry.get("goal_action_ids"):
            status["goal_action_ids"] = entry["goal_action_ids"]
        statuses.setdefault(status["id"], status)
    return OrderStatus(many=True).dump(OrderStatus(many=True).load(list(statuses.values())))


class StatusConflict(ValueError):
    """Two integrations on one counter give one Metrika status id different meanings. `details`
    names the id and what each integration says."""

    def __init__(self, message: str, details: dict) -> None:
        super().__init__(message)
        self.details = details


def counter_order_statuses(integration_id: str, entries: list[dict], others: dict[str, list[dict]]) -> list[dict]:
    """The complete list for a counter several integrations share: this integration's statuses
    (`entries`, about to be pushed) and those of every other integration on the counter (`others`:
    integration id → its stored entries), one per Metrika status id. Metrika may replace the whole
    list on each push ("Order status mapping",
    https://yandex.com/dev/metrika/en/management/openapi/schema/mapOrderStatuses, does not say), so
    every push carries all of them. An id that two integrations define differently (type, label or
    goals) raises `StatusConflict` naming it: Metrika keeps one entry per id."""
    statuses: dict[str, tuple[str, dict]] = {s["id"]: (integration_id, s) for s in to_order_statuses(entries)}
    conflicts: dict[str, dict] = {}
    for other in sorted(others):
        try:
            listed = to_order_statuses(others[other]) if others[other] else []
        except ValidationError as exc:  # stored under older rules: say so rather than push half a list
            raise StatusConflict(f"the stored status mapping of integration {other!r}, on the same counter, is no "
                                 "longer valid: replace it first", {other: exc.messages}) from exc
        for status in listed:
            owner, first = statuses.setdefault(status["id"], (other, status))
            if first != status and status["id"] not in conflicts:
                conflicts[status["id"]] = {owner: _meaning(first), other: _meaning(status)}
    if conflicts:
        named = ", ".join(f"{sid!r} ({' vs '.join(conflicts[sid])})" for sid in sorted(conflicts)[:5])
        raise StatusConflict(f"Metrika status ids defined differently by integrations on the same counter: {named}. "
                             "Metrika keeps one entry per id: give them the same type, humanized and goal_action_ids, "
                             "or use another metrika_status_id", {"metrika_status_id": conflicts})
    return [status for _, status in statuses.values()]


def _meaning(status: dict) -> dict:
    return {k: status[k] for k in ("type", "humanized", "goal_action_ids") if k in status}


def status_for(entries: list[dict], crm_status: str) -> str | None:
    """The Metrika status id for a CRM stage, or None when the stage is not mapped (never a guess)."""
    return next((e["metrika_status_id"] for e in entries if e["crm_status"] == crm_status), None)


def merge_defaults(current: list[dict], proposed: list[dict]) -> list[dict]:
    """Defaults fill in stages the mapping lacks; what the user already mapped stays as it is."""
    mapped = {e["crm_status"] for e in current}
    return current + [e for e in proposed if e["crm_status"] not in mapped]
