"""amoCRM account webhooks: form body → entity references. Pure; no I/O.

Wire format and events: ../shared/reference/amocrm.md §3–§7 (amoCRM "Формат webhooks",
https://www.amocrm.ru/developers/content/crm_platform/webhooks-format). The body only says *which*
entity changed and when; the worker re-reads the entity from API v4, so nothing else is taken from it.
In particular no URL is ever built from `account[_links][self]` or `account[subdomain]` (§9).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import CONTACT, ORDER, EntityRef, WebhookError
from ..form import parse_bracket_form

# Actions that change what Metrika should hold. `note` (and anything unknown) is acknowledged and
# counted as ignored. Contact deletion is ignored too: Metrika has no delete and the orders stay.
LEAD_ACTIONS = frozenset({"add", "update", "status", "restore", "delete", "responsible"})
CONTACT_ACTIONS = frozenset({"add", "update", "restore", "responsible"})


@dataclass(frozen=True)
class AmoWebhook:
    account_id: str | None
    refs: list[EntityRef]
    ignored: int  # events of kinds we do not sync (tasks, notes, chats, companies…): acknowledged, counted


def parse_amocrm_webhook(raw: bytes, *, received_at: int | None = None) -> AmoWebhook:
    """Every entity, action and index (never only `[0]`), the short Digital Pipeline form included.

    Leads give order references; contacts give contact references plus one order reference per
    linked lead (`linked_leads_id` is keyed by lead id), because linking a contact changes the lead's
    customer. `unsorted[add]` items carry the lead they created.
    """
    tree = parse_bracket_form(raw)
    account = tree.get("account")
    if not isinstance(account, dict) or not (account.get("id") or account.get("subdomain")):
        raise WebhookError("not an amoCRM webhook: account[id] / account[subdomain] missing")
    now = int(time.time()) if received_at is None else received_at
    refs: list[EntityRef] = []
    ignored = 0
    for entity, actions in tree.items():
        if entity == "account":
            continue
        if entity not in ("leads", "contacts", "unsorted") or not isinstance(actions, dict):
            ignored += _count(actions)
            continue
        for action, items in actions.items():
            for item in _items(items):
                if entity == "leads" and action in LEAD_ACTIONS:
                    refs.append(EntityRef(ORDER, _id(item, entity, action), _event_time(item, now), action))
                elif entity == "contacts" and action in CONTACT_ACTIONS and _is_contact(item):
                    event_time = _event_time(item, now)
                    refs.append(EntityRef(CONTACT, _id(item, entity, action), event_time, action))
                    refs += [EntityRef(ORDER, lead_id, event_time, "contact_" + action)
                             for lead_id in _linked_leads(item)]
                elif entity == "unsorted" and action == "add" and isinstance(item, dict) and _digits(item.get("lead_id")):
                    refs.append(EntityRef(ORDER, item["lead_id"], _event_time(item, now), "unsorted"))
                else:
                    ignored += 1
    return AmoWebhook(str(account.get("id") or "") or None, refs, ignored)


def _items(items: object) -> list:
    """`leads[status][0][…]`: a dict keyed by index. `leads[delete]` may also be a bare id."""
    if isinstance(items, dict):
        if "id" in items and not any(isinstance(v, dict) for v in items.values()):
            return [items]  # `leads[delete][id]=…` without an index
        return list(items.values())
    return [items]


def _id(item: object, entity: str, action: str) -> str:
    value = item.get("id") if isinstance(item, dict) else item
    if not _digits(value):
        raise WebhookError(f"{entity}[{action}] item without a numeric id")
    return value


def _is_contact(item: object) -> bool:
    # 2016-era payloads sent companies under `contacts[...]` with type=company (reference §3).
    return not (isinstance(item, dict) and item.get("type") == "company")


def _linked_leads(item: object) -> list[str]:
    linked = item.get("linked_leads_id") if isinstance(item, dict) else None
    if not isinstance(linked, dict):
        return []
    return [key for key in linked if _digits(key)]


def _event_time(item: object, received_at: int) -> int:
    if isinstance(item, dict):
        for key in ("updated_at", "last_modified"):
            if _digits(item.get(key)):
                return int(item[key])
    return received_at  # delete and DP forms carry no time: the moment we heard of it


def _digits(value: object) -> bool:
    return isinstance(value, str) and value.isascii() and value.isdigit()


def _count(node: object) -> int:
    if isinstance(node, dict):
        return sum(len(v) if isinstance(v, dict) else 1 for v in node.values()) or 1
    return 1
