"""Which entities of a reconciliation's CRM listing Metrika already holds as the CRM has them now.

Reconciliation lists the deals the CRM changed since its last run and records them as webhooks are
recorded, so a lost webhook costs minutes, not a deal. Most of what it lists, though, the webhooks have
already delivered; recorded again, each cost a conditional write, a queue message, a claim and a
closing write, to send nothing (100 delivered deals: 100 messages, 300 entity writes, 0 uploads, every
run). This module picks out the listed entities that need none of it.

What the listing gives: each deal's id and its modification time, in whole seconds (amoCRM `updated_at`,
"API сделок", https://www.amocrm.ru/developers/content/crm_platform/leads-api; Bitrix24 `DATE_MODIFY`,
"Get a List of Deals crm.deal.list", https://apidocs.bitrix24.com/api-reference/crm/deals/crm-deal-list.html).
What the state gives (`StateStore.delivered_versions`): for an entity delivered and clean, the event
time recorded (`event_time`) and a hash of the rows delivered (`content_hash`). The worker read the CRM
*after* the event at `event_time` was recorded, so whatever changed after that read carries a time, by
the CRM's own clock, of at least `event_time`:

* listed time > recorded time: a change after the delivery (its webhook lost): recorded, as before;
* listed time < recorded time: the delivery read the CRM later than this change: skipped;
* equal: a change within the second of the last delivery cannot be told apart by time (second
  resolution), so the deal is read from the CRM now (`CrmSource.snapshot`, the worker's own read) and its
  rows hashed as the delivery hashed them: skipped only when the hash is the one delivered.

A recorded time more than `future_skew` seconds ahead of our clock is not trusted (the caller passes
`chalicelib.ingest.FUTURE_SKEW_SECONDS`). Any doubt — no state, dirty, parked, held by a history import, the CRM read failing or cut short by the
invocation's deadline, a row that no longer validates, a deal now gone — records the entity as before:
the worker then does what it always did. Nothing here writes.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from . import deadline
from .crm import EntityRef
from .errors import Unavailable
from .logs import log_event

# Entities compared per CRM read: one amoCRM page of leads (250) and its contacts; 21 Bitrix24 `batch`
# requests of 4 sub-calls a deal (~11 s at the portal's 2 a second).
COMPARE_CHUNK = 250
# Seconds of outbound calls a chunk's comparison must have left to be started (its CRM reads: amoCRM's
# at 7 a second, Bitrix24's at 2); a chunk not started is recorded as before.
COMPARE_SECONDS = 20


@dataclass
class Listed:
    """A listing split by what the state says: `record` (as before), `compare` (equal times: the content
    decides, against `delivered[crm_id]["content_hash"]`), `skipped` (delivered after the listed change)."""

    record: list[EntityRef] = field(default_factory=list)
    compare: list[EntityRef] = field(default_factory=list)
    skipped: list[EntityRef] = field(default_factory=list)


def split_listed(refs: list[EntityRef], delivered: dict[tuple[str, str], dict], *, now: float,
                 future_skew: float) -> Listed:
    """Pure. `delivered`: (kind, crm_id) → {"event_time", "content_hash"} of the entities delivered and
    clean. An entity listed twice is judged by its newest time."""
    newest: dict[tuple[str, str], EntityRef] = {}
    for ref in refs:
        key = (ref.kind, ref.crm_id)
        if key not in newest or ref.event_time > newest[key].event_time:
            newest[key] = ref
    listed = Listed()
    for key, ref in newest.items():
        state = delivered.get(key)
        recorded = int(state["event_time"]) if state and state.get("content_hash") else None
        if recorded is None or recorded > now + future_skew or ref.event_time > recorded:
            listed.record.append(ref)
        elif ref.event_time < recorded:
            listed.skipped.append(ref)
        else:
            listed.compare.append(ref)
    return listed


def unchanged(integration: dict, attributes: list[dict], rows: dict[tuple[str, str], Any],
              delivered: dict[tuple[str, str], dict]) -> set[tuple[str, str]]:
    """Pure. The keys whose rows, as the CRM gives them now, hash to the content delivered (the sink's
    `content_hash_of(*validated_rows(…))`). Gone, refused (an unmapped stage) or invalid rows are not."""
    from marshmallow import ValidationError

    from .delivery import content_hash_of, validated_rows
    same = set()
    for key, entity in rows.items():
        state = delivered.get(key)
        if state is None or entity is None or entity.gone or entity.error:
            continue
        try:
            content_hash = content_hash_of(*validated_rows(integration, attributes, entity))
        except ValidationError:
            continue
        if content_hash == state["content_hash"]:
            same.add(key)
    return same


def undelivered(store: Any, source: Any, integration_id: str, integration: dict, refs: list[EntityRef], *,
                now: float, future_skew: float) -> tuple[list[EntityRef], int]:
    """The listed refs to record (those Metrika may not hold as the CRM has them), and how many were
    skipped. One bulk read of the listed entities' state; for those with equal times, the integration's
    mappings and one CRM read per COMPARE_CHUNK entities. `Unavailable` (our store) goes up; any other
    failure of a comparison records its entities."""
    if not refs:
        return [], 0
    delivered: dict[tuple[str, str], dict] = {}
    for kind in sorted({r.kind for r in refs}):
        versions = store.delivered_versions(integration_id, kind, sorted({r.crm_id for r in refs if r.kind == kind}))
        delivered.update({(kind, crm_id): version for crm_id, version in versions.items()})
    listed = split_listed(refs, delivered, now=now, future_skew=future_skew)
    record, skipped = list(listed.record), len(listed.skipped)
    if listed.compare:
        mapping = (store.get_status_mapping(integration_id) or {}).get("entries", [])
        attributes = store.get_attribute_mapping(integration_id)
        for start in range(0, len(listed.compare), COMPARE_CHUNK):
            chunk = listed.compare[start:start + COMPARE_CHUNK]
            if not deadline.has(COMPARE_SECONDS):
                record += listed.compare[start:]
                log_event("reconcile_compare_postponed", integration_id=integration_id,
                          entities=len(listed.compare) - start)
                break
            same = _compare(source, integration_id, integration, mapping, attributes, chunk, delivered)
            record += [r for r in chunk if (r.kind, r.crm_id) not in same]
            skipped += len(same)
    return record, skipped


def _compare(source: Any, integration_id: str, integration: dict, mapping: list[dict], attributes: list[dict],
             chunk: list[EntityRef], delivered: dict[tuple[str, str], dict]) -> set[tuple[str, str]]:
    """The keys of `chunk` whose content is the one delivered; none when the CRM read fails."""
    try:
        rows = source.snapshot(integration, mapping, chunk, attributes)
        return unchanged(integration, attributes, rows, delivered)
    except Unavailable:
        raise
    except Exception as exc:  # noqa: BLE001 — a comparison is an economy: on any doubt, record as before
        log_event("reconcile_compare_failed", integration_id=integration_id, entities=len(chunk),
                  error=type(exc).__name__, message=str(exc)[:300], traceback=traceback.format_exc(limit=4))
        return set()
