"""Metrika CDP record shapes: one marshmallow schema per record, with the documented rules.

Rows are built as plain dicts by the CRM translators, then `load`ed here (normalised and validated)
and `dump`ed into the JSON the CDP API takes. The identifier normalisers themselves live in
`chalicelib.normalize` (plain functions raising ValueError); this module wraps them for marshmallow
and re-exports them for existing callers. Sources (Yandex Metrika documentation):

* ContactRow — "Uploading customer data (JSON)",
  https://yandex.com/dev/metrika/en/management/openapi/schema/uploadContactJson_1, and
  "Customer data format", https://yandex.com/dev/metrika/en/data-import/contacts-data
* OrderRow — "Uploading orders (JSON)",
  https://yandex.com/dev/metrika/en/management/openapi/schema/uploadOrdersJson_1, and
  "Order data format", https://yandex.com/dev/metrika/en/data-import/orders-data
* Required fields in every merge mode — "Data upload modes", https://yandex.ru/dev/metrika/en/data-import/modes
* OrderStatus — "Order status mapping", https://yandex.com/dev/metrika/en/management/openapi/schema/mapOrderStatuses
* Attribute — "Creating attributes", https://yandex.com/dev/metrika/en/management/openapi/schema/createAttributes
* Product — "Creating a product list", https://yandex.ru/dev/metrika/ru/management/openapi/schema/createProducts
* Date-time rules — "Date and time format", https://yandex.ru/dev/metrika/ru/data-import/date
* Normalisation and md5 — "Hashing (md5)", https://yandex.ru/dev/metrika/ru/data-import/hashing
"""
from __future__ import annotations

import re
from datetime import date, datetime, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    pre_load,
    validate,
    validates_schema,
)

from ..normalize import (  # re-exported (see __all__): callers import these from here
    MONEY_MAX,
    is_phone_region,
    keep_valid,
    md5_hex,
    normalize_client_id,
    normalize_email,
    normalize_phone,
    normalize_product_id,
    parse_decimal,
)

DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S"
DATE_FORMAT = "%Y-%m-%d"
EPOCH = datetime(1970, 1, 1)
STATUS_TYPES = ("IN_PROGRESS", "PAID", "CANCELLED", "SPAM")
MERGE_MODES = ("SAVE", "UPDATE", "APPEND")
ATTRIBUTE_TYPES = ("text", "numeric", "date", "datetime", "email")
# Ids that go into schema lists (statuses, attributes, products): "Order status mapping" gives
# `id` a length of 1–255 and the pattern ^[\w-:]+$; attribute and product names follow the same rule.
SCHEMA_ID = re.compile(r"^[\w\-:]+$", re.ASCII)
_MD5 = re.compile(r"^[0-9a-f]{32}$")


# --- custom attribute values ("Creating attributes" types) ------------------------------------------

_DATE_FORMATS = ("%Y-%m-%d", "%d.%m.%Y")
_DATETIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M")


def _as_instant(value: Any, time_zone: tzinfo) -> datetime:
    """A CRM date value → wall-clock time in the counter's zone. amoCRM sends Unix seconds for date
    fields (amoCRM "Поля и группы полей", https://www.amocrm.ru/developers/content/crm_platform/custom-fields),
    Bitrix24 ISO 8601 with the portal's offset (Bitrix24 "Data Types and Parameter Formats in REST API",
    https://apidocs.bitrix24.com/api-reference/data-types.html); people type `dd.MM.yyyy`. A value
    without a zone is taken as already in the counter's zone."""
    if isinstance(value, bool):
        raise ValueError("a yes/no value is not a date")
    if isinstance(value, (int, float)) or (isinstance(value, str) and re.fullmatch(r"-?\d{9,11}", value.strip())):
        return datetime.fromtimestamp(int(float(value)), timezone.utc).astimezone(time_zone).replace(tzinfo=None)
    text = str(value).strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
        for fmt in _DATETIME_FORMATS + _DATE_FORMATS:
            try:
                parsed = datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
        if parsed is None:
            raise ValueError("not a date")
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(time_zone).replace(tzinfo=None)
    return parsed


def coerce_attribute_value(type_name: str, value: Any, time_zone: tzinfo, now: datetime) -> str:
    """One CRM value → the string Metrika stores for an attribute of `type_name` (the scalar types of
    "Creating attributes"; Metrika takes a value only if numbers parse, dates are from 1970 on and
    e-mails are valid). Raises ValueError with the reason."""
    if type_name == "text":
        return ("true" if value else "false") if isinstance(value, bool) else str(value).strip()
    if type_name == "numeric":
        if isinstance(value, bool):
            return "1" if value else "0"
        try:
            number = Decimal(str(value).replace("\u00a0", "").replace(" ", "").replace(",", "."))
        except InvalidOperation:
            raise ValueError("not a number") from None
        if not number.is_finite():
            raise ValueError("not a finite number")
        text = format(number.normalize(), "f")
        return text[:-2] if text.endswith(".0") else text
    if type_name == "email":
        try:
            return normalize_email(value)
        except ValueError:
            raise ValueError("not an e-mail address") from None
    if type_name in ("date", "datetime"):
        try:
            instant = _as_instant(value, time_zone)
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"not a {type_name}") from None
        if instant < EPOCH:
            raise ValueError("before 1970-01-01")
        if type_name == "date":
            return instant.strftime(DATE_FORMAT)
        if instant > now:
            raise ValueError("in the future")
        return instant.strftime(DATETIME_FORMAT)
    raise ValueError(f"unknown attribute type {type_name!r}")


def check_phone_region(code: str) -> None:
    """Validator of an integration's `phone_region`: an ISO 3166-1 alpha-2 code (upper case) that the
    phone library has a numbering plan for."""
    if not is_phone_region(code):
        hint = " (the United Kingdom is GB)" if code == "UK" else ""
        raise ValidationError(f"must be an ISO 3166-1 alpha-2 country code in upper case, such as RU, BY, KZ or "
                              f"UA{hint}")


def resolve_time_zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValidationError(f"unknown time zone {name!r}") from exc


# --- fields ----------------------------------------------------------------------------------------

class _ListOfNormalized(fields.List):
    """A list whose items are normalised by `normalizer` (a `chalicelib.normalize` function): its
    ValueError becomes this field's error for that item; duplicates after normalisation are dropped."""

    def __init__(self, normalizer, **kwargs: Any) -> None:
        super().__init__(fields.String(), **kwargs)
        self._normalizer = normalizer

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ValidationError("must be a list")
        out: list[str] = []
        errors: dict[int, list[str]] = {}
        for index, item in enumerate(value):
            if item is None:
                errors[index] = ["must not be null"]
                continue
            try:
                normalized = self._normalizer(item)
            except ValueError as exc:
                errors[index] = [str(exc)]
                continue
            if normalized not in out:
                out.append(normalized)
        if errors:
            raise ValidationError(errors)
        return out


class LocalDateTime(fields.Field):
    """`yyyy-MM-dd HH:mm:ss` wall-clock time in the counter's time zone ("Date and time format").

    Loads an aware `datetime` (converted to the schema's time zone) or a string already in that
    form; dumps the string. The schema's `time_zone` is read through the bound parent.
    """

    default_error_messages = {"invalid": "expected 'yyyy-MM-dd HH:mm:ss' or an aware datetime"}

    def _deserialize(self, value, attr, data, **kwargs) -> datetime:
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise self.make_error("invalid")
            return value.astimezone(self.parent.time_zone).replace(tzinfo=None, microsecond=0)
        try:
            return datetime.strptime(str(value), DATETIME_FORMAT)
        except ValueError as exc:
            raise self.make_error("invalid") from exc

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        if isinstance(value, str):
            return value
        return value.strftime(DATETIME_FORMAT)


class AttributeValues(fields.Field):
    """`{attribute name: [raw CRM values]}` → `{name: [values as Metrika stores them]}`, coerced by the
    types in the schema's `attributes` (name → {type, multivalued, crm_field}). Multivalued values are
    split on commas, as Metrika splits a multivalued CSV cell ("Uploading customer data (CSV)",
    https://yandex.com/dev/metrika/en/management/openapi/schema/uploadContacts), so what we hash is
    what it keeps.
    A value that does not coerce fails the row, naming the CRM field and the value."""

    def _deserialize(self, value, attr, data, **kwargs) -> dict[str, list[str]]:
        if not isinstance(value, dict):
            raise ValidationError("must be an object of attribute name → values")
        specs = getattr(self.parent, "attributes", {}) or {}
        now = self.parent.local_now()
        out: dict[str, list[str]] = {}
        errors: dict[str, list[str]] = {}
        for name, raw_values in value.items():
            spec = specs.get(name)
            if spec is None:
                errors[name] = ["not in the integration's attribute mapping"]
                continue
            values: list[str] = []
            raws = raw_values if isinstance(raw_values, list) else [raw_values]
            for raw in raws:
                if raw is None or (isinstance(raw, str) and not raw.strip()):
                    continue
                try:
                    coerced = coerce_attribute_value(spec["type"], raw, self.parent.time_zone, now)
                except ValueError as exc:
                    errors.setdefault(name, []).append(
                        f"CRM field {spec.get('crm_field', name)} value {raw!r} cannot be a {spec['type']} "
                        f"attribute: {exc}")
                    continue
                parts = [p.strip() for p in coerced.split(",")] if spec.get("multivalued") and spec["type"] == "text" else [coerced]
                values += [p for p in parts if p and p not in values]
            if len(values) > 1 and not spec.get("multivalued"):
                errors.setdefault(name, []).append(
                    f"CRM field {spec.get('crm_field', name)} has {len(values)} values but attribute {name} "
                    "is not multivalued")
            if values:
                out[name] = values
        if errors:
            raise ValidationError(errors)
        return out


class Money(fields.Decimal):
    """A non-negative amount; dumped as a JSON number."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(validate=validate.Range(min=0, max=MONEY_MAX), **kwargs)

    def _serialize(self, value, attr, obj, **kwargs):
        return _json_number(value)


def _json_number(value: Decimal | None) -> int | float | None:
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() else float(value)


def _schema_id(**kwargs: Any) -> fields.String:
    return fields.String(
        validate=[
            validate.Length(min=1, max=255),
            validate.Regexp(SCHEMA_ID, error="must match ^[\\w-:]+$ (Latin letters, digits, _, - and :)"),
        ],
        **kwargs,
    )


def _non_blank(**kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Regexp(r"\S", error="must not be blank"), **kwargs)


# --- schemas ---------------------------------------------------------------------------------------

class _CdpSchema(Schema):
    """Base for rows: unknown keys are errors, absent optional fields are left out of the JSON."""

    class Meta:
        unknown = RAISE

    def __init__(self, *, time_zone: str | tzinfo = "UTC", now: datetime | None = None,
                 attributes: dict[str, dict] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.time_zone = resolve_time_zone(time_zone) if isinstance(time_zone, str) else time_zone
        self._now = now
        self.attributes = attributes or {}  # custom attribute name → {type, multivalued, crm_field}

    def local_now(self) -> datetime:
        now = self._now or datetime.now(timezone.utc)
        return now.astimezone(self.time_zone).replace(tzinfo=None)

    def _check_times(self, data: dict, create_key: str, later_keys: Iterable[str]) -> None:
        """"Date and time format": no pre-1970 times; Metrika also refuses future times and an
        update/finish before create."""
        now = self.local_now()
        errors: dict[str, list[str]] = {}
        for key in (create_key, *later_keys):
            value = data.get(key)
            if value is None:
                continue
            if value < EPOCH:
                errors.setdefault(key, []).append("must not be before 1970-01-01")
            elif value > now:
                errors.setdefault(key, []).append(
                    f"must not be in the future (now is {now:%Y-%m-%d %H:%M:%S} in the counter's time zone)")
        created = data.get(create_key)
        if created is not None:
            for key in later_keys:
                if data.get(key) is not None and data[key] < created:
                    errors.setdefault(key, []).append(f"must not be before {create_key}")
        if errors:
            raise ValidationError(errors)

    @post_dump
    def _drop_empty(self, data: dict, **kwargs: Any) -> dict:
        return {k: v for k, v in data.items() if v is not None and v != [] and v != {}}


class ContactRow(_CdpSchema):
    """One customer ("Uploading customer data (JSON)"). `uniq_id` is the CRM's contact id, referenced
    by orders."""

    uniq_id = _non_blank(required=True)
    name = fields.String(allow_none=True)
    birth_date = fields.Date(format=DATE_FORMAT, allow_none=True)
    create_date_time = LocalDateTime(allow_none=True)
    update_date_time = LocalDateTime(allow_none=True)
    client_ids = _ListOfNormalized(normalize_client_id)
    user_ids = fields.List(_non_blank())
    emails = _ListOfNormalized(normalize_email)
    # The translators send E.164 (`+375291234567`), read in the integration's `phone_region`: with its
    # `+` a number keeps its country here. A number without one is read as Russian (rows from elsewhere).
    phones = _ListOfNormalized(normalize_phone)
    emails_md5 = fields.List(fields.String(validate=validate.Regexp(_MD5, error="must be lower-case md5 hex")))
    phones_md5 = fields.List(fields.String(validate=validate.Regexp(_MD5, error="must be lower-case md5 hex")))
    attribute_values = AttributeValues()

    @validates_schema
    def _rules(self, data: dict, **kwargs: Any) -> None:
        self._check_times(data, "create_date_time", ("update_date_time",))
        birth = data.get("birth_date")
        if birth is not None and not (date(1970, 1, 1) <= birth <= self.local_now().date()):
            raise ValidationError("must be between 1970-01-01 and today", "birth_date")


class OrderRow(_CdpSchema):
    """One order ("Uploading orders (JSON)"): every required field travels in every upload, whatever
    the merge mode ("Data upload modes": pass all required fields, even unchanged ones)."""

    id = _non_blank(required=True)
    client_uniq_id = _non_blank(required=True)
    client_type = fields.String(load_default="CONTACT", validate=validate.OneOf(["CONTACT"]))
    create_date_time = LocalDateTime(required=True)
    update_date_time = LocalDateTime(allow_none=True)
    finish_date_time = LocalDateTime(allow_none=True)
    order_status = _non_blank(required=True)
    revenue = Money(allow_none=True)
    cost = Money(allow_none=True)
    currency = fields.String(allow_none=True, validate=validate.Regexp(r"^[A-Z]{3}$", error="must be an ISO 4217 code"))
    products = fields.Dict(keys=_non_blank(), values=Money())
    goals = fields.List(fields.Dict())
    attribute_values = AttributeValues()

    @validates_schema
    def _rules(self, data: dict, **kwargs: Any) -> None:
        self._check_times(data, "create_date_time", ("update_date_time", "finish_date_time"))

    @post_dump
    def _numbers(self, data: dict, **kwargs: Any) -> dict:
        if data.get("products"):
            data["products"] = {k: _json_number(Decimal(str(v))) for k, v in data["products"].items()}
        return data


class OrderStatus(Schema):
    """One entry of `schema/order_statuses` ("Order status mapping")."""

    class Meta:
        unknown = RAISE

    id = _schema_id(required=True)
    type = fields.String(required=True, validate=validate.OneOf(STATUS_TYPES))
    humanized = fields.String(validate=validate.Length(max=4096))
    goal_action_ids = fields.List(_non_blank(), validate=validate.Length(max=10))

    @pre_load
    def _spelling(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict) and data.get("type") == "CANCELED":
            raise ValidationError("CANCELED is a misspelling in two Metrika doc pages: use CANCELLED", "type")
        return data


class Attribute(Schema):
    """A custom attribute for `schema/attributes` ("Creating attributes"). There is no boolean type."""

    class Meta:
        unknown = RAISE

    name = _schema_id(required=True)
    type_name = fields.String(required=True, validate=validate.OneOf(ATTRIBUTE_TYPES))
    multivalued = fields.Boolean(required=True)
    humanized = fields.String(validate=validate.Length(max=4096))


class Product(Schema):
    """An item of `schema/products` ("Creating a product list"): the id used in orders' `products` and
    a display name."""

    class Meta:
        unknown = RAISE

    name = _schema_id(required=True)
    humanized = fields.String(validate=validate.Length(max=4096))


def hash_identifiers(contact: dict) -> dict:
    """Replace phones and e-mails of a loaded ContactRow by their md5 (the integration's `hash_pii`)."""
    hashed = dict(contact)
    for plain, hashed_key in (("emails", "emails_md5"), ("phones", "phones_md5")):
        values = hashed.pop(plain, None) or []
        if values:
            merged = list(hashed.get(hashed_key) or [])
            merged += [h for h in map(md5_hex, values) if h not in merged]
            hashed[hashed_key] = merged
    return hashed


def to_cdp_rows(schema: Schema, rows: list[dict]) -> list[dict]:
    """Validate and normalise rows, then dump them as the API's JSON. Raises ValidationError keyed by
    row index, so one bad row can be told apart from the rest."""
    loaded = schema.load(rows, many=True)
    return schema.dump(loaded, many=True)


__all__ = [
    "ContactRow", "OrderRow", "OrderStatus", "Attribute", "Product", "STATUS_TYPES", "MERGE_MODES",
    "normalize_email", "normalize_phone", "normalize_client_id", "md5_hex", "hash_identifiers",
    "to_cdp_rows", "resolve_time_zone", "parse_decimal", "keep_valid", "normalize_product_id",
    "coerce_attribute_value", "ATTRIBUTE_TYPES", "MONEY_MAX", "check_phone_region",
]
