"""The Bitrix24 application's wire formats: the install event, and the offline-event queue's records.
Pure; no I/O.

* ONAPPINSTALL, POSTed to the application's install handler as a form ("Event After Successful
  Application Installation OnAppInstall", https://apidocs.bitrix24.com/api-reference/common/events/on-app-install.html):
  `event`, `data[VERSION]`, `data[ACTIVE]`, `data[INSTALLED]`, `data[LANGUAGE_ID]`, `ts`, and `auth[...]`
  with `domain`, `client_endpoint`, `server_endpoint`, `member_id`, `application_token`, `status`; for a
  server-side application without a UI also `access_token`, `refresh_token`, `expires`, `expires_in`,
  `scope`, `user_id`: an application that "uses API only" gets its tokens this way, POSTed to its
  installation path ("Installation callback",
  https://apidocs.bitrix24.com/settings/app-installation/local-apps/installation-callback.html; the
  event's own page shows `auth` without them). Everything in it
  is the sender's claim: the install verifies the refresh token at our OAuth server before believing any
  of it (chalicelib/bitrix24_app.py).
* `event.offline.get` answers `{"process_id", "events": [{"ID", "TIMESTAMP_X", "EVENT_NAME",
  "EVENT_DATA": {"FIELDS": {"ID"}}, "EVENT_ADDITIONAL", "MESSAGE_ID"}]}` ("Get a List of Offline Events
  with event.offline.get", https://apidocs.bitrix24.com/api-reference/events/event-offline-get.html).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .. import EntityRef, WebhookError
from ..form import crm_id, parse_bracket_form
from .webhook import _EVENTS

# What the application binds as offline events: the deal and contact events the webhook path knows.
OFFLINE_EVENTS = tuple(sorted(_EVENTS))
MEMBER_ID = re.compile(r"[A-Za-z0-9]{1,56}")  # 32 hex digits in practice; the integration id is "b24-" + it
TOKEN = re.compile(r"[\x21-\x7e]{1,1024}")


@dataclass(frozen=True)
class Install:
    member_id: str
    refresh_token: str
    application_token: str
    version: str
    domain: str | None  # the sender's claim: shown, never called

    def __repr__(self) -> str:  # tokens are secrets
        return f"Install(member_id={self.member_id!r}, version={self.version!r}, domain={self.domain!r})"


def integration_id_for(member_id: str) -> str:
    """The integration of a portal: stable per member_id, so a reinstall updates the same one."""
    return "b24-" + member_id.lower()


def parse_install(raw: bytes) -> Install:
    """An ONAPPINSTALL form, all or nothing; `WebhookError` naming the field otherwise."""
    tree = parse_bracket_form(raw)
    if str(tree.get("event", "")).upper() != "ONAPPINSTALL":
        raise WebhookError("event must be ONAPPINSTALL")
    auth = tree.get("auth")
    if not isinstance(auth, dict):
        raise WebhookError("auth[...] missing: not a Bitrix24 install")
    member_id = auth.get("member_id")
    if not isinstance(member_id, str) or not MEMBER_ID.fullmatch(member_id):
        raise WebhookError("auth[member_id] must be the portal's member id (1-56 Latin letters and digits)")
    values = {}
    for key in ("refresh_token", "application_token"):
        value = auth.get(key)
        if not isinstance(value, str) or not TOKEN.fullmatch(value):
            raise WebhookError(f"auth[{key}] must be a token (printable ASCII, 1-1024 characters)")
        values[key] = value
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    version = data.get("VERSION", "")
    if not isinstance(version, str) or not re.fullmatch(r"[0-9A-Za-z.\-]{0,32}", version):
        raise WebhookError("data[VERSION] must be a version number")
    domain = auth.get("domain")
    domain = domain if isinstance(domain, str) and len(domain) <= 255 and domain.isprintable() else None
    return Install(member_id, values["refresh_token"], values["application_token"], version or "1", domain)


@dataclass(frozen=True)
class OfflinePage:
    process_id: str
    record_ids: list[str]  # every record of the page, read or not: all of them are cleared once recorded
    refs: list[EntityRef]
    skipped: int  # records that name no deal or contact we can read (an unknown event, a bad id)


def parse_offline_page(result: Any, *, now: int) -> OfflinePage:
    """`event.offline.get`'s `result`. A record we cannot use is counted and cleared with the rest (left
    in the queue it would come back forever); one without an ID cannot be cleared and is skipped. A
    `TIMESTAMP_X` that cannot be read is taken as `now` (a later re-read of the deal sends what the CRM
    holds anyway). `ValueError` when the answer is not a page at all."""
    if not isinstance(result, dict) or not isinstance(result.get("process_id"), str) or not result["process_id"]:
        raise ValueError("event.offline.get answered without a process_id")
    events = result.get("events") or []
    if not isinstance(events, list):
        raise ValueError("event.offline.get answered events that are not a list")
    ids: list[str] = []
    refs: list[EntityRef] = []
    skipped = 0
    for record in events:
        record = record if isinstance(record, dict) else {}
        record_id = record.get("ID")
        if (isinstance(record_id, (str, int)) and not isinstance(record_id, bool) and str(record_id).isascii()
                and str(record_id).isdigit()):
            ids.append(str(record_id))
        known = _EVENTS.get(str(record.get("EVENT_NAME", "")).upper())
        data = record.get("EVENT_DATA")
        fields = data.get("FIELDS") if isinstance(data, dict) else None
        value = fields.get("ID") if isinstance(fields, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # JSON answers carry ids as numbers or strings
        try:
            entity = crm_id(value, "EVENT_DATA[FIELDS][ID]")
        except WebhookError:
            entity = None
        if known is None or entity is None:
            skipped += 1
            continue
        refs.append(EntityRef(known[0], entity, _event_time(record.get("TIMESTAMP_X"), now), known[1]))
    return OfflinePage(result["process_id"], ids, refs, skipped)


def _event_time(value: Any, now: int) -> int:
    if not isinstance(value, str) or len(value) > 40:
        return now
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return now
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())
