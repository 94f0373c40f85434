"""Identifiers and amounts as Metrika wants them: plain functions on plain values. Standard library only.

Each normaliser returns the normalised string or raises `ValueError` naming the value; `keep_valid`
drops what does not normalise. The marshmallow schemas (`metrika.schemas`) wrap these for row
validation; the CRM translators call them directly.

Sources (Yandex Metrika documentation):

* Phones, e-mails and md5 — "Hashing (md5)", https://yandex.ru/dev/metrika/ru/data-import/hashing,
  and "Customer data format", https://yandex.com/dev/metrika/en/data-import/contacts-data
* ClientID — "Customer data upload" (`client_ids`),
  https://yandex.com/dev/metrika/en/management/openapi/schema/uploadContactJson_1, and
  "getClientID", https://yandex.ru/support/metrica/en/objects/get-client-id
* Product ids — "Creating a product list" (`items[].name`),
  https://yandex.ru/dev/metrika/ru/management/openapi/schema/createProducts
"""
from __future__ import annotations

import hashlib
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable

UINT64_MAX = 2**64 - 1
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def normalize_email(raw: str) -> str:
    """Trim and lower-case; reject anything without `@` and a dotted domain ("Hashing (md5)": Latin,
    with `@` and a domain, no upper-case letters)."""
    email = str(raw).strip().lower()
    if not _EMAIL.match(email):
        raise ValueError(f"not an e-mail address: {raw!r}")
    return email


def normalize_phone(raw: str | int) -> str:
    """Digits only, with the country code: `+7 (999) 555-11-11` and `8 999 555 11 11` → `79995551111`.

    A Russian number written with the trunk prefix 8 (11 digits) becomes 7…, and a bare 10-digit
    Russian mobile (9XXXXXXXXX) gets the 7 it lacks: "Hashing (md5)" requires the country code, and a
    wrong form does not fail, its hash silently never matches.
    """
    digits = re.sub(r"\D", "", str(raw))
    if len(digits) == 11 and digits[0] == "8":
        digits = "7" + digits[1:]
    elif len(digits) == 10 and digits[0] == "9":
        digits = "7" + digits
    if not 10 <= len(digits) <= 15:  # E.164 allows at most 15 digits
        raise ValueError(f"not a phone number with a country code: {raw!r}")
    return digits


def md5_hex(normalized: str) -> str:
    """md5 of one normalised value, lower-case hex ("Hashing (md5)": each value separately, never a
    joined list)."""
    return hashlib.md5(normalized.encode("utf-8")).hexdigest()


def normalize_client_id(raw: str | int) -> str:
    """ClientID as a decimal string: digits only, non-zero, fits unsigned 64 bits (`client_ids` are
    uint64 in the contacts upload schema; `getClientID` hands the site a string of digits).

    Kept as a string end to end: ClientIDs exceed 2^53 and break float-based JSON tooling.
    """
    text = str(raw).strip()
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"ClientID must be digits only: {raw!r}")
    value = int(text)
    if value == 0:
        raise ValueError(f"ClientID must not be 0: {raw!r}")
    if value > UINT64_MAX:
        raise ValueError(f"ClientID does not fit 64 bits: {raw!r}")
    return str(value)


def normalize_product_id(raw: Any) -> str:
    """A CRM product id as a product-list `name` (1–255 chars, `^[\\w-:]+$`): anything else becomes `_`.
    Orders use the same id as the key of `products`, so both sides always agree."""
    text = re.sub(r"[^A-Za-z0-9_:\-]", "_", str(raw).strip())[:255]
    return text or "_"


def keep_valid(values: Iterable[Any], normalizer: Callable[[Any], str]) -> list[str]:
    """Normalise each value, dropping the ones that do not normalise (ValueError) and repeats. CRM data
    is typed by people: one malformed phone or ClientID must not hold back the deal it belongs to."""
    out: list[str] = []
    for value in values:
        try:
            normalized = normalizer(value)
        except ValueError:
            continue
        if normalized not in out:
            out.append(normalized)
    return out


def parse_decimal(value: Any) -> Decimal | None:
    """CRM amounts arrive as numbers or strings ("1500.00"); empty means absent."""
    if value in (None, ""):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"not a number: {value!r}") from exc


__all__ = ["normalize_email", "normalize_phone", "normalize_client_id", "normalize_product_id", "md5_hex",
           "keep_valid", "parse_decimal", "UINT64_MAX"]
