"""amoCRM account webhooks: form body → entity references. Pure; no I/O.

Wire format and events: amoCRM "Формат webhooks",
https://www.amocrm.ru/developers/content/crm_platform/webhooks-format. The body only says *which*
entity changed and when; the worker re-reads the entity from API v4, so nothing else is taken from it.
In particular no URL is ever built from `account[_links][self]` or `account[subdomain]`: the page describes
no signature for these hooks, so a forged body could name any host.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import CONTACT, ORDER, EntityRef, WebhookError
from ..form import crm_id, parse_bracket_form, unix_time

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

    All or nothing: every id we would refer to is 1-19 ASCII digits (`crm_id`), every change time
    (`updated_at`, `last_modified`) is absent, empty or at most 12 ASCII digits (`unix_time`), and
    `account[id]`, when sent, is an id; otherwise a `WebhookError` naming the first bad field
    (`leads[status][1][id]`) and no references at all. Items of kinds we do not sync are counted,
    not checked.
    """
    tree = parse_bracket_form(raw)
    account = tree.get("account")
    if not isinstance(account, dict) or not (_text(account.get("id")) or _text(account.get("subdomain"))):
        raise WebhookError("not an amoCRM webhook: account[id] / account[subdomain] missing")
    account_id = account.get("id") or None
    if account_id is not None:
        # Checked, and canonical (no leading zeros) as the config's is: it is compared with the config.
        account_id = crm_id(account_id, "account[id]")
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
            for path, item in _items(items, f"{entity}[{action}]"):
                if entity == "leads" and action in LEAD_ACTIONS:
                    refs.append(EntityRef(ORDER, _id(item, path), _event_time(item, path, now), action))
                elif entity == "contacts" and action in CONTACT_ACTIONS and _is_contact(item):
                    contact_id, event_time = _id(item, path), _event_time(item, path, now)
                    refs.append(EntityRef(CONTACT, contact_id, event_time, action))
                    refs += [EntityRef(ORDER, lead_id, event_time, "contact_" + action)
                             for lead_id in _linked_leads(item, path)]
                elif entity == "unsorted" and action == "add" and isinstance(item, dict) and _text(item.get("lead_id")):
                    refs.append(EntityRef(ORDER, crm_id(item["lead_id"], f"{path}[lead_id]"),
                                          _event_time(item, path, now), "unsorted"))
                else:
                    ignored += 1
    return AmoWebhook(account_id, refs, ignored)


def _items(items: object, path: str) -> list[tuple[str, object]]:
    """`leads[status][0][…]`: a dict keyed by index. `leads[delete]` may also be a bare id.
    Each item with the name of its place in the body, for error messages."""
    if isinstance(items, dict):
        if "id" in items and not any(isinstance(v, dict) for v in items.values()):
            return [(path, items)]  # `leads[delete][id]=…` without an index
        return [(f"{path}[{index}]", item) for index, item in items.items()]
    return [(path, items)]


def _id(item: object, path: str) -> str:
    if isinstance(item, dict):
        return crm_id(item.get("id"), f"{path}[id]")
    return crm_id(item, path)


def _is_contact(item: object) -> bool:
    # 2016-era payloads sent companies under `contacts[...]` with type=company (observed; not in the vendor docs).
    return not (isinstance(item, dict) and item.get("type") == "company")


def _linked_leads(item: object, path: str) -> list[str]:
    """Every linked lead, however many: each one's customer may have changed, and dropping some would
    leave their orders stale until they change themselves (reconciliation lists changed deals only).
    The count costs the answer nothing: a body with many entities is recorded whole and expanded by the
    worker (`chalicelib.ingest`); the form parser's field limit bounds it."""
    linked = item.get("linked_leads_id") if isinstance(item, dict) else None
    if not isinstance(linked, dict):
        return []
    return [crm_id(key, f"{path}[linked_leads_id][{key}]") for key in linked]


def _event_time(item: object, path: str, received_at: int) -> int:
    """`updated_at`, else `last_modified`; both are checked when sent."""
    if not isinstance(item, dict):
        return received_at
    times = [unix_time(item.get(key), f"{path}[{key}]") for key in ("updated_at", "last_modified")]
    known = [t for t in times if t is not None]
    return known[0] if known else received_at  # delete and DP forms carry no time: the moment we heard of it


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _count(node: object) -> int:
    """Events in an ignored entity's subtree (`task[add][0..n]`): one level of actions, one of items."""
    if isinstance(node, dict):
        return sum(len(v) if isinstance(v, dict) else 1 for v in node.values()) or 1
    return 1
