"""PHP-style bracket form bodies (`leads[status][0][id]=1`), as amoCRM and Bitrix24 send them.

Also the checks both webhook parsers apply to what they take from such a body (ids, times), so a
hostile body ends in a `WebhookError` naming the field, never in an exception from deeper down.
"""
from __future__ import annotations

import re

from . import WebhookError

# Limits sized to the largest body a CRM sends: an amoCRM mass action (250 leads moved at once) is one
# POST with every lead and its filled custom fields — amoCRM "Webhooks"
# (https://www.amocrm.ru/developers/content/crm_platform/webhooks-format): x-www-form-urlencoded,
# `{entity: {action: {0..n: {fields}}}}`. Built in that form, 250 leads with 2 filled custom fields are
# ~5,500 fields and 370–440 KB (~70 bytes a field); each further filled custom field adds 3–5 fields a
# lead. Bitrix24 events name one entity in a few hundred bytes.
# Fields: 250 entities × 100 fields (the 14 standard ones and ~20 filled custom fields), 4.5× the
# observed mass action; a contact with 20,000 linked leads (one field each) fits too. At the limit a
# body parses in ~0.15 s here, well inside amoCRM's 2 s. The byte limit (settings.MAX_WEBHOOK_BYTES)
# is the same body: 25,000 fields of ~80 bytes ≈ 2 MiB.
MAX_KEYS = 25_000
# Bracket groups after the head: real bodies go to 7 (`contacts[add][0][custom_fields][0][values][0][value]`),
# amoCRM's composite fields (legal entity) one more. Deeper is not a CRM webhook.
MAX_DEPTH = 10
# Characters of a decoded key: the longest real ones are ~60 (`contacts[update][249][custom_fields][39][values][0][value]`,
# `contacts[update][0][linked_leads_id][<19 digits>][ID]`); keys name places, values carry the data,
# so a longer key is not a CRM webhook.
MAX_KEY_LENGTH = 256
# A key is a head and bracket groups, nothing else: `a[b][c]`, `a[]`, `a`; not `a[b`, `a]b`, `a[b]c`.
_KEY = re.compile(r"([^\[\]]*)((?:\[[^\[\]]*\])*)")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
MAX_ID = 2**63 - 1  # amoCRM and Bitrix24 ids are integers; a signed 64-bit one at most
MAX_TIME_DIGITS = 12  # Unix seconds up to year 33658; the ingest layer caps future times


def parse_bracket_form(raw: bytes, *, max_keys: int = MAX_KEYS, max_depth: int = MAX_DEPTH,
                       max_key_length: int = MAX_KEY_LENGTH) -> dict:
    """Decode a form body exactly once into a tree of dicts and strings.

    Numeric keys stay dict keys: `linked_leads_id[<lead id>]` is keyed by id, not 0..n, so no guess
    is made about lists (observed in amoCRM payloads; not in the vendor docs). A scalar never overwrites a subtree.
    The tree is built without recursion and is at most `max_depth` + 1 levels deep; anything else (not UTF-8, more than
    `max_keys` fields, a field without `=`, a too deep or too long (`max_key_length`) or unbalanced key) is a
    `WebhookError` naming the limit or the field. The field count is checked before any field is
    decoded. Percent-escapes that are not UTF-8 decode to U+FFFD (the values we read are ids and times).
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise WebhookError("body must be bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebhookError("body is not UTF-8") from exc
    root: dict = {}
    for key, value in _pairs(text, max_keys):
        parts = _key_parts(key, max_depth, max_key_length)
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if not isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = value
    return root


def _pairs(text: str, max_keys: int) -> list[tuple[str, str]]:
    """`application/x-www-form-urlencoded` fields, decoded as `urllib.parse.parse_qsl(text,
    keep_blank_values=True, strict_parsing=True)` does, ~5× faster on CRM bodies: their keys are mostly
    `%5B`/`%5D`, replaced in C before the general decoder runs (`tests/test_ack_large.py` checks the
    two agree)."""
    if not text:
        return []
    fields = text.count("&") + 1
    if fields > max_keys:
        raise WebhookError(f"body has {fields} form fields; the limit is {max_keys}")
    pairs = []
    for field in text.split("&"):
        key, equals, value = field.partition("=")
        if not equals:
            raise WebhookError(f"body is not a form-encoded webhook: field {field_name(_decode(field[:120]))} has no '='")
        pairs.append((_decode(key), _decode(value)))
    return pairs


_ESCAPES = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def _decode(part: str) -> str:
    """`+` is a space; each run of percent-escapes is UTF-8 (bad bytes: U+FFFD); a `%` without two hex
    digits stays as it is — `urllib.parse.unquote`'s rules."""
    if "+" in part:
        part = part.replace("+", " ")
    if "%" not in part:
        return part
    part = part.replace("%5B", "[").replace("%5D", "]").replace("%5b", "[").replace("%5d", "]")
    return _ESCAPES.sub(_unescape, part) if "%" in part else part


def _unescape(run: re.Match) -> str:
    return bytes.fromhex(run.group().replace("%", "")).decode("utf-8", "replace")


def _key_parts(key: str, max_depth: int, max_length: int) -> list[str]:
    if key.count("[") > max_depth:  # before any regex work on a 1,000-level key
        raise WebhookError(f"field {field_name(key)} is nested deeper than {max_depth} levels")
    if len(key) > max_length:
        raise WebhookError(f"field {field_name(key)} is longer than {max_length} characters")
    match = _KEY.fullmatch(key)
    if match is None:
        raise WebhookError(f"field {field_name(key)} has unbalanced brackets")
    head, brackets = match.groups()
    return [head, *_BRACKETS.findall(brackets)]


def field_name(name: str, limit: int = 60) -> str:
    """A field name fit for an error message: at most `limit` characters, control characters escaped."""
    short = name if len(name) <= limit else name[:limit] + "…"
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in short) or "''"


def crm_id(value: object, name: str) -> str:
    """An amoCRM / Bitrix24 entity id: 1-19 ASCII digits, 1 ≤ id < 2^63. Returned without leading
    zeros, so `007` and `7` are one entity. Anything else is a `WebhookError` naming the field."""
    if not (isinstance(value, str) and 1 <= len(value) <= 19 and value.isascii() and value.isdigit()
            and 0 < int(value) <= MAX_ID):
        raise WebhookError(f"{field_name(name)} must be a numeric id (1-19 ASCII digits, not 0)")
    return str(int(value))


def unix_time(value: object, name: str) -> int | None:
    """A CRM change time in Unix seconds: up to 12 ASCII digits. None when absent or empty (the caller
    falls back to the receipt time); anything else is a `WebhookError` naming the field. A time in
    the future is not judged here: the ingest layer caps it."""
    if value is None or value == "":
        return None
    if not (isinstance(value, str) and len(value) <= MAX_TIME_DIGITS and value.isascii() and value.isdigit()):
        raise WebhookError(f"{field_name(name)} must be a Unix time (at most {MAX_TIME_DIGITS} ASCII digits)")
    return int(value)
