"""amoCRM account webhooks: form body → entity references. Pure; no I/O.

Wire format and events: ../shared/reference/amocrm.md §3–§7 (amoCRM "Webhooks" docs,
https://www.amocrm.ru/developers/content/crm_platform/webhooks-format).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import CONTACT, ORDER, EntityRef, WebhookError
from ..form import parse_bracket_form

_KINDS = {"leads": ORDER, "contacts": CONTACT}


@dataclass(frozen=True)
class AmoWebhook:
    account_id: str | None
    refs: list[EntityRef]
    ignored: int  # events of kinds we do not sync (tasks, notes, chats…): acknowledged, counted


def parse_amocrm_webhook(raw: bytes, *, received_at: int | None = None) -> AmoWebhook:
    """Every entity, action and index of a lead/contact webhook (never only `[0]`)."""
    tree = parse_bracket_form(raw)
    account = tree.get("account")
    if not isinstance(account, dict) or not (account.get("id") or account.get("subdomain")):
        raise WebhookError("not an amoCRM webhook: account[id] / account[subdomain] missing")
    received_at = int(time.time()) if received_at is None else received_at
    refs: list[EntityRef] = []
    ignored = 0
    for entity, actions in tree.items():
        if entity == "account":
            continue
        kind = _KINDS.get(entity)
        if kind is None or not isinstance(actions, dict):
            ignored += 1
            continue
        for action, items in actions.items():
            for item in (items.values() if isinstance(items, dict) else [items]):
                crm_id = item.get("id") if isinstance(item, dict) else item
                if not isinstance(crm_id, str) or not crm_id.isdigit():
                    raise WebhookError(f"{entity}[{action}] item without a numeric id")
                refs.append(EntityRef(kind, crm_id, _event_time(item, received_at), action))
    return AmoWebhook(str(account.get("id") or "") or None, refs, ignored)


def _event_time(item: object, received_at: int) -> int:
    if isinstance(item, dict):
        for key in ("updated_at", "last_modified"):
            value = item.get(key)
            if isinstance(value, str) and value.isdigit():
                return int(value)
    return received_at
