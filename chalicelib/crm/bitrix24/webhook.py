"""Bitrix24 outbound events: form body → entity references. Pure; no I/O.

Wire format: ../shared/reference/bitrix24.md §3 (https://apidocs.bitrix24.com/api-reference/events/).
Events carry only an id; the worker re-reads the deal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import CONTACT, ORDER, EntityRef, WebhookError
from ..form import parse_bracket_form

_EVENTS = {
    "ONCRMDEALADD": (ORDER, "add"), "ONCRMDEALUPDATE": (ORDER, "update"), "ONCRMDEALDELETE": (ORDER, "delete"),
    "ONCRMCONTACTADD": (CONTACT, "add"), "ONCRMCONTACTUPDATE": (CONTACT, "update"),
}


@dataclass(frozen=True)
class BitrixEvent:
    event: str
    application_token: str
    member_id: str | None
    domain: str | None
    refs: list[EntityRef]


def parse_bitrix24_event(raw: bytes, *, received_at: int | None = None) -> BitrixEvent:
    tree = parse_bracket_form(raw)
    event = tree.get("event")
    auth = tree.get("auth")
    if not isinstance(event, str) or not isinstance(auth, dict):
        raise WebhookError("not a Bitrix24 event: `event` and `auth[...]` are required")
    token = auth.get("application_token")
    if not isinstance(token, str) or not token:
        raise WebhookError("auth[application_token] missing")
    ts = tree.get("ts")
    event_time = int(ts) if isinstance(ts, str) and ts.isdigit() else int(time.time() if received_at is None else received_at)
    refs: list[EntityRef] = []
    known = _EVENTS.get(event.upper())
    if known:
        data = tree.get("data")
        fields = data.get("FIELDS") if isinstance(data, dict) else None
        crm_id = fields.get("ID") if isinstance(fields, dict) else None
        if not isinstance(crm_id, str) or not crm_id.isdigit():
            raise WebhookError(f"{event}: data[FIELDS][ID] missing or not numeric")
        refs.append(EntityRef(known[0], crm_id, event_time, known[1]))
    return BitrixEvent(event.upper(), token, auth.get("member_id"), auth.get("domain"), refs)
