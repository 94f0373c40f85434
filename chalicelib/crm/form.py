"""PHP-style bracket form bodies (`leads[status][0][id]=1`), as amoCRM and Bitrix24 send them.

Also the checks both webhook parsers apply to what they take from such a body (ids, times), so a
hostile body ends in a `WebhookError` naming the field, never in an exception from deeper down.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl

from . import WebhookError

MAX_KEYS = 5000
# Bracket groups after the head: real bodies go to 7 (`contacts[add][0][custom_fields][0][values][0][value]`),
# amoCRM's composite fields (legal entity) one more. Deeper is not a CRM webhook.
MAX_DEPTH = 10
# A key is a head and bracket groups, nothing else: `a[b][c]`, `a[]`, `a`; not `a[b`, `a]b`, `a[b]c`.
_KEY = re.compile(r"([^\[\]]*)((?:\[[^\[\]]*\])*)")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
MAX_ID = 2**63 - 1  # amoCRM and Bitrix24 ids are integers; a signed 64-bit one at most
MAX_TIME_DIGITS = 12  # Unix seconds up to year 33658; the ingest layer caps future times


def parse_bracket_form(raw: bytes, *, max_keys: int = MAX_KEYS, max_depth: int = MAX_DEPTH) -> dict:
    """Decode a form body exactly once into a tree of dicts and strings.

    Numeric keys stay dict keys: `linked_leads_id[<lead id>]` is keyed by id, not 0..n, so no guess
    is made about lists (observed in amoCRM payloads; not in the vendor docs). A scalar never overwrites a subtree.
    The tree is built without recursion and is at most `max_depth` + 1 levels deep; anything else (not UTF-8, more than
    `max_keys` fields, a field without `=`, an unbalanced or too deep key) is a `WebhookError`.
    Percent-escapes that are not UTF-8 decode to U+FFFD (the values we read are ids and times).
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise WebhookError("body must be bytes")
    try:
        text = bytes(raw).decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=max_keys)
    except UnicodeDecodeError as exc:
        raise WebhookError("body is not UTF-8") from exc
    except ValueError as exc:
        raise WebhookError(f"body is not a form-encoded webhook: {str(exc)[:100]}") from exc
    root: dict = {}
    for key, value in pairs:
        parts = _key_parts(key, max_depth)
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if not isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = value
    return root


def _key_parts(key: str, max_depth: int) -> list[str]:
    if key.count("[") > max_depth:  # before any regex work on a 1,000-level key
        raise WebhookError(f"field {field_name(key)} is nested deeper than {max_depth} levels")
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
