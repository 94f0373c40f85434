"""Bitrix24 outbound events: form body → entity references. Pure; no I/O.

Wire format: Bitrix24 "Concept and Benefits of Event Processing",
https://apidocs.bitrix24.com/api-reference/events/index.html. Events carry only an id ("Event on deal update
onCrmDealUpdate", https://apidocs.bitrix24.com/api-reference/crm/deals/events/on-crm-deal-update.html);
the worker re-reads the deal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import CONTACT, ORDER, EntityRef, WebhookError
from ..form import crm_id, parse_bracket_form, unix_time

_EVENTS = {
    "ONCRMDEALADD": (ORDER, "add"), "ONCRMDEALUPDATE": (ORDER, "update"), "ONCRMDEALDELETE": (ORDER, "delete"),
    "ONCRMCONTACTADD": (CONTACT, "add"), "ONCRMCONTACTUPDATE": (CONTACT, "update"),
}


class MissingCredentials(WebhookError):
    """The body carries no usable `auth[application_token]`: an authentication failure (HTTP 401),
    raised before anything else of the body is read. Other `WebhookError`s are malformed bodies (400)."""


@dataclass(frozen=True)
class BitrixEvent:
    event: str
    application_token: str
    member_id: str | None
    domain: str | None
    refs: list[EntityRef]


MAX_AUTH_VALUE = 255  # member_id (32 hex digits), domain (a host name), event names


def parse_bitrix24_event(raw: bytes, *, received_at: int | None = None) -> BitrixEvent:
    """The event's name, its `auth[...]` block and, for deal and contact events, one reference.

    First `auth[application_token]`: absent, empty or not a plain value is `MissingCredentials`, so
    the caller answers 401 before trusting anything else (only a body that is not a form at all is a
    plain `WebhookError`, 400, before that). Then, all or nothing: `event` a name, `auth[member_id]`
    and `auth[domain]` absent or short strings, `ts` absent, empty or at most 12 ASCII digits, and
    `data[FIELDS][ID]` of a known event 1-19 ASCII digits; else a `WebhookError` naming the field.
    Unknown events are passed on without references (acknowledged, counted as ignored).
    """
    tree = parse_bracket_form(raw)
    auth = tree.get("auth")
    token = auth.get("application_token") if isinstance(auth, dict) else None
    if not isinstance(token, str) or not token:
        raise MissingCredentials("auth[application_token] missing: not an authenticated Bitrix24 event")
    event = tree.get("event")
    if not isinstance(event, str) or not event or len(event) > MAX_AUTH_VALUE:
        raise WebhookError("not a Bitrix24 event: `event` must name the event")
    member_id, domain = (_optional_text(auth.get(key), f"auth[{key}]") for key in ("member_id", "domain"))
    ts = unix_time(tree.get("ts"), "ts")
    event_time = ts if ts is not None else int(time.time() if received_at is None else received_at)
    refs: list[EntityRef] = []
    known = _EVENTS.get(event.upper())
    if known:
        data = tree.get("data")
        fields = data.get("FIELDS") if isinstance(data, dict) else None
        refs.append(EntityRef(known[0], crm_id(fields.get("ID") if isinstance(fields, dict) else None,
                                               "data[FIELDS][ID]"), event_time, known[1]))
    return BitrixEvent(event.upper(), token, member_id, domain, refs)


def _optional_text(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_AUTH_VALUE:
        raise WebhookError(f"{name} must be a string of at most {MAX_AUTH_VALUE} characters")
    return value
