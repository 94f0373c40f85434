"""Identifiers and amounts as Metrika wants them: plain functions on plain values. Standard library,
plus the `phonenumbers` library (its "lite" distribution, `phonenumberslite`), imported inside the phone
functions only: the webhook path imports this module but never parses a phone, so it never loads the
library (tests/test_purity.py).

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
* Order cost — "Order data format" (`cost`: a decimal, profit is revenue − cost),
  https://yandex.com/dev/metrika/en/data-import/orders-data
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


DEFAULT_PHONE_REGION = "RU"

# ISO 4217 currency codes in use (List One, as maintained for ISO by SIX: "Currency codes — ISO 4217",
# https://www.iso.org/iso-4217-currency-codes.html), less those that are no money an order is paid in:
# precious metals, bond-market units, SDR, the testing code and "no currency". Metrika's order `currency`
# is a code of this standard ("Uploading orders (JSON)",
# https://yandex.com/dev/metrika/en/management/openapi/schema/uploadOrdersJson_1): a made-up code set by
# hand would go out on every order.
ISO_4217 = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW
KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN
NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL
SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES
VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG ZWL
""".split())
# Longer than any phone number as people write it (an extension included): not parsed at all, so a
# 2,000-character value costs nothing.
MAX_PHONE_CHARS = 64
_PHONE_PUNCTUATION = frozenset(" +-().")


def phone_e164(raw: str | int, *, region: str = DEFAULT_PHONE_REGION) -> str:
    """A phone as E.164 (`+375291234567`), read as people in `region` (ISO 3166-1 alpha-2) write it:
    `8 029 123-45-67` is Belarusian with region BY, `067 123 45 67` Ukrainian with UA. A number written
    with `+` (or the region's international prefix) keeps its own country whatever the region.

    Tried in order, the first *valid* reading wins (valid: its length and number range exist in the
    library's numbering plan for that country; "possible" checks length only and would turn
    `8 029 123-45-67` read as Russian into 70291234567, a number no one has):

    1. as written, in `region`;
    2. without `+`, the digits as an international number (`375291234567`, `79161234567`: the country
       code typed without its plus) — also what makes this idempotent on its own output's digits;
    3. eleven digits starting with 8: the Russian trunk form (`8 916 123 45 67` → `+79161234567`), so a
       Russian customer of a Belarusian shop is still found.

    Extensions are dropped (E.164 has none). Raises ValueError when no reading is valid.
    """
    import phonenumbers  # worker path only (module docstring)

    text = str(raw).strip()
    if not text or len(text) > MAX_PHONE_CHARS:
        raise ValueError(f"not a phone number: {mask_phone(text)!r}")
    digits = re.sub(r"\D", "", text)
    readings: list[tuple[str, str | None]] = [(text, region)]
    if not text.startswith("+"):
        readings.append(("+" + digits, None))
        if len(digits) == 11 and digits[0] == "8":
            readings.append((digits, "RU"))
    for candidate, candidate_region in readings:
        try:
            number = phonenumbers.parse(candidate, candidate_region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    # Named masked: this message may reach a parked entity's error, the status page and the log.
    raise ValueError(f"not a valid phone number (region {region}): {mask_phone(text)!r}")


def normalize_phone(raw: str | int, *, region: str = DEFAULT_PHONE_REGION) -> str:
    """Digits only, with the country code, as Metrika wants them ("Customer data format": `79995551111`;
    "Hashing (md5)": a wrong form does not fail, its hash silently never matches):
    `+7 (999) 555-11-11` and `8 999 555 11 11` → `79995551111`. See `phone_e164` for how the number is
    read."""
    return phone_e164(raw, region=region)[1:]


def is_phone_region(code: Any) -> bool:
    """An ISO 3166-1 alpha-2 code the phone library has a numbering plan for (`RU`, `BY`, `UA`, `KZ` …)."""
    if not isinstance(code, str) or re.fullmatch(r"[A-Z]{2}", code) is None:
        return False
    import phonenumbers  # worker path, and the admin's PUT that validates `phone_region`
    return code in phonenumbers.SUPPORTED_REGIONS


def mask_phone(raw: Any) -> str:
    """A phone as the status page may show it: at most the first four digits and the last two, the rest
    starred, separators kept, anything else starred (`+7 916 123-45-67` → `+7 916 ***-**-67`), so an
    example of a dropped number helps find it in the CRM without putting the number on the page."""
    text = str(raw).strip()
    clipped = text[:MAX_PHONE_CHARS]
    count = sum(ch.isdigit() for ch in clipped)
    head, tail = min(4, max(0, count - 6)), (2 if count >= 6 else 0)
    out, seen = [], 0
    for ch in clipped:
        if ch.isdigit():
            out.append(ch if seen < head or seen >= count - tail else "*")
            seen += 1
        else:
            out.append(ch if ch in _PHONE_PUNCTUATION else "*")
    return "".join(out) + ("…" if len(text) > MAX_PHONE_CHARS else "")


def split_phones(values: Iterable[Any], *, region: str) -> tuple[list[str], list[str]]:
    """CRM phone values → (E.164 numbers, first seen first, no repeats; masked values that are not valid
    numbers). One mistyped phone must not hold back the contact: it is left out, and the caller reports
    it (masked) on the status page."""
    kept: list[str] = []
    dropped: list[str] = []
    for value in values:
        if value is None or not str(value).strip():
            continue  # an empty value is no phone, not a wrong one
        try:
            number = phone_e164(value, region=region)
        except ValueError:
            dropped.append(mask_phone(value))
            continue
        if number not in kept:
            kept.append(number)
    return kept, dropped


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


# "Uploading orders (JSON)" gives revenue/cost no upper bound, but Metrika rejects Long.MAX_VALUE:
# bounded well below it, no real order is worth 10^15.
MONEY_MAX = Decimal("1e15")
MAX_AMOUNT_CHARS = 40
_SPACES = re.compile(r"[\s\u00a0\u2009\u202f']")  # thousands separators people type (1 000, 1'000)
_AMOUNT_FORMS = (  # (pattern, thousands separator to remove, decimal separator to make a point)
    (re.compile(r"\d+(\.\d+)?"), "", "."),
    (re.compile(r"\d{1,3}(,\d{3})+(\.\d+)?"), ",", "."),  # 1,000,000.50
    (re.compile(r"\d{1,3}(\.\d{3})+(,\d+)?"), ".", ","),  # 1.000.000,50
    (re.compile(r"\d+,\d+"), "", ","),  # 1000,50 (1,000 alone is refused first: 1.000 or 1000?)
)


def parse_money(value: Any) -> tuple[Decimal | None, str | None]:
    """An amount as people type it into a CRM field → (amount, currency or None); (None, None) when
    empty. Spaces group thousands (`1 000,50`); one decimal separator, a point or a comma; `1,000.50`
    and `1.000,50` group with the other one. Bitrix24 money fields add the currency: `1500|RUB`.

    Raises ValueError saying why for anything else: negative, not finite, longer than 40 characters,
    above 10^15, text, or ambiguous (`1,000`: a thousand, or one with a decimal comma?). The caller
    decides what a bad value costs (an order's `cost` is left out, not the order)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, bool):
        raise ValueError("a yes/no value is not an amount")
    currency = None
    if isinstance(value, (int, float, Decimal)):
        try:
            amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
        except (InvalidOperation, ValueError):  # str() of an int over 4,300 digits raises ValueError
            raise ValueError("not a number") from None
    else:
        text = str(value).strip()
        if len(text) > MAX_AMOUNT_CHARS:
            raise ValueError(f"longer than {MAX_AMOUNT_CHARS} characters")
        if "|" in text:
            text, _, currency = text.partition("|")
            currency = currency.strip().upper()
            if re.fullmatch(r"[A-Z]{3}", currency) is None:
                raise ValueError("the currency after | is not an ISO 4217 code")
            if not text.strip():  # an empty money field still names its currency
                return None, None
        text = _SPACES.sub("", text)
        if text.startswith("-"):
            raise ValueError("negative")
        if re.fullmatch(r"\d{1,3},\d{3}", text):
            raise ValueError("ambiguous: a thousands comma or a decimal comma?")
        for pattern, thousands, point in _AMOUNT_FORMS:
            if pattern.fullmatch(text):
                amount = Decimal((text.replace(thousands, "") if thousands else text).replace(point, "."))
                break
        else:
            raise ValueError("not a number")
    if not amount.is_finite():
        raise ValueError("not a finite number")
    if amount < 0:
        raise ValueError("negative")
    if amount > MONEY_MAX:
        raise ValueError("above 10^15")
    return amount, currency


__all__ = ["normalize_email", "normalize_phone", "phone_e164", "split_phones", "mask_phone", "is_phone_region",
           "normalize_client_id", "normalize_product_id", "md5_hex", "keep_valid", "parse_decimal", "parse_money",
           "UINT64_MAX", "MONEY_MAX", "DEFAULT_PHONE_REGION"]
