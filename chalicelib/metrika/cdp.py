"""Metrika CDP API without I/O: request shapes, and the one place that maps Metrika's answers to the
error taxonomy (`chalicelib.errors`, source "metrika"):

* 420/429 and 5xx → `Transient` (Retry-After honoured); the daily quotas (`quota_requests_by_uid`,
  `quota_requests_by_counter_id`) also set `daily_quota` and wait until 00:00 UTC;
* 401/403 → `Misconfigured` (token missing, revoked, or without access to the counter);
* any other 4xx → `Permanent`, with Metrika's `errors` (their `location`s name the rows);
* a 2xx whose body is not JSON (a proxy's HTML page) → `Transient`; so are timeouts and connection
  errors, which the requests adapter (`client.py`) reports through `unreachable`.

Error body and types: https://yandex.ru/dev/metrika/ru/intro/errors ("Описание ошибок в API"). Quotas:
https://yandex.ru/dev/metrika/ru/intro/quotas ("Квотирование") says 429, the English page
https://yandex.com/dev/metrika/en/intro/quotas ("Quotas") says 420, so both count as throttling.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from ..errors import BridgeError, Misconfigured, Permanent, Transient

SOURCE = "metrika"
CDP_PREFIX = "/cdp/api/v1/counter/{counter_id}"
THROTTLED_STATUSES = frozenset({420, 429})
# Daily per-user and per-counter quotas reset at 00:00 GMT: retrying sooner only burns requests.
DAILY_QUOTA_TYPES = frozenset({"quota_requests_by_uid", "quota_requests_by_counter_id"})


@dataclass(frozen=True)
class ApiRequest:
    """A request to send: method, path under the API root, query and JSON body."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    body: Any = None
    csv_file: str | None = None  # sent as the multipart part `file` instead of a JSON body


def upload_contacts(counter_id: int, contacts: list[dict], merge_mode: str = "SAVE") -> ApiRequest:
    """POST data/contacts/json (https://yandex.ru/dev/metrika/ru/management/openapi/schema/uploadContactJson_1
    "Загрузка данных о клиентах (JSON)"). SAVE by default: each row is the customer's complete record,
    built from every source the CRM has for it (`chalicelib.customers`), and SAVE is the one mode that
    lets a removed value leave: UPDATE keeps a field the row leaves out and APPEND unites lists, while
    what an empty list does is not documented ("Режимы загрузки данных",
    https://yandex.ru/dev/metrika/ru/data-import/modes; "Data upload modes",
    https://yandex.com/dev/metrika/en/data-import/modes)."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/data/contacts/json",
                      {"merge_mode": merge_mode}, {"contacts": contacts})


def upload_orders(counter_id: int, orders: list[dict], merge_mode: str = "SAVE") -> ApiRequest:
    """POST data/orders/json (https://yandex.ru/dev/metrika/ru/management/openapi/schema/uploadOrdersJson_1
    "Загрузка заказов (JSON)"). SAVE by default: we always send the complete current order, with every
    required field (https://yandex.ru/dev/metrika/ru/data-import/modes "Режимы загрузки данных")."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/data/orders/json",
                      {"merge_mode": merge_mode}, {"orders": orders})


# Column order of the CSV uploads: the JSON field names (https://yandex.ru/dev/metrika/ru/data-import/contacts-data
# "Формат данных о клиентах", https://yandex.ru/dev/metrika/ru/data-import/orders-data "Формат данных о заказах"),
# then custom attributes by name.
CSV_COLUMNS = {
    "contacts": ("uniq_id", "name", "birth_date", "create_date_time", "update_date_time", "client_ids", "user_ids",
                 "emails", "phones", "emails_md5", "phones_md5"),
    "orders": ("id", "client_uniq_id", "client_type", "create_date_time", "update_date_time", "finish_date_time",
               "order_status", "revenue", "cost", "currency", "products"),
}


def upload_csv(counter_id: int, kind: str, rows: list[dict], merge_mode: str) -> ApiRequest:
    """POST data/{contacts|orders}/csv (https://yandex.ru/dev/metrika/ru/management/openapi/schema/uploadContacts
    "Загрузка данных о клиентах (CSV)", https://yandex.ru/dev/metrika/ru/management/openapi/schema/uploadOrders
    "Загрузка заказов (CSV)"): the documented way to send custom attribute values, since the JSON
    shape of `attribute_values` is inconsistent across the docs.
    Each attribute is a column mapped by its name in `columns_mapping`; the delimiter is `;` as the
    docs advise when cells hold lists (products, several phones), and list items are comma-separated
    inside one quoted cell."""
    text, columns = rows_to_csv(kind, rows)
    mapping = ",".join(f'"{c}":"{c}"' for c in columns)
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/data/{kind}/csv",
                      {"merge_mode": merge_mode, "columns_mapping": mapping, "delimiter_type": "SEMICOLON"},
                      csv_file=text)


def rows_to_csv(kind: str, rows: list[dict]) -> tuple[str, list[str]]:
    """Dumped rows (as for JSON) → CSV text with a header line, and its columns. Pure."""
    system = [c for c in CSV_COLUMNS[kind] if any(row.get(c) not in (None, [], {}) for row in rows)]
    attributes = sorted({name for row in rows for name in (row.get("attribute_values") or {})})
    columns = system + attributes
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = row.get("attribute_values") or {}
        writer.writerow([_cell(row.get(c)) for c in system] + [_cell(values.get(a)) for a in attributes])
    return out.getvalue(), columns


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # products: `product_id:qty,product_id:qty` (orders CSV format)
        return ",".join(f"{k}:{_number(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return _number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def get_attributes(counter_id: int, entity_type: str) -> ApiRequest:
    """GET schema/attributes (https://yandex.ru/dev/metrika/ru/management/openapi/schema/getAttributes
    "Информация о всех атрибутах"): `{"system_attributes": […], "custom_attributes": […]}`."""
    return ApiRequest("GET", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/attributes",
                      {"entity_type": entity_type})


def create_attributes(counter_id: int, entity_type: str, attributes: list[dict]) -> ApiRequest:
    """POST schema/attributes (https://yandex.ru/dev/metrika/ru/management/openapi/schema/createAttributes
    "Создание атрибутов"). There is no update or delete, so only new names are sent."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/attributes",
                      {"entity_type": entity_type}, {"attributes": attributes})


def save_products(counter_id: int, items: list[dict]) -> ApiRequest:
    """POST schema/products (https://yandex.ru/dev/metrika/ru/management/openapi/schema/createProducts
    "Создание списка товаров"). Whether it replaces or adds to the list is undocumented, so callers
    always send the complete list (at most 160 000 items)."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/products",
                      body={"attributes": [], "items": items})


def get_order_statuses(counter_id: int) -> ApiRequest:
    return ApiRequest("GET", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/order_statuses")


def save_order_statuses(counter_id: int, statuses: list[dict]) -> ApiRequest:
    """POST schema/order_statuses (https://yandex.ru/dev/metrika/ru/management/openapi/schema/mapOrderStatuses
    "Сопоставление статусов заказов"): whether it replaces or upserts is undocumented, so callers
    always send the complete list."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/order_statuses",
                      body={"order_statuses": statuses})


def get_counter(counter_id: int) -> ApiRequest:
    """GET /management/v1/counter/{id}: the counter, with `time_zone_name`, the zone every uploaded
    date-time is read in (https://yandex.ru/dev/metrika/ru/data-import/date "Формат даты и времени")."""
    return ApiRequest("GET", f"/management/v1/counter/{counter_id}")


def last_uploadings(counter_id: int, limit: int = 100, datetime_offset: str | None = None) -> ApiRequest:
    """GET last_uploadings (https://yandex.ru/dev/metrika/ru/management/openapi/schema/getLastUploadings
    "Информация о последних загрузках"): newest first; `datetime_offset` pages to strictly earlier uploads."""
    params = {"limit": str(limit)}
    if datetime_offset:
        params["datetime_offset"] = datetime_offset
    return ApiRequest("GET", f"{CDP_PREFIX.format(counter_id=counter_id)}/last_uploadings", params)


def decipher_response(status: int, headers: Mapping[str, str], body: bytes,
                      now: datetime | None = None) -> Any:
    """The decoded JSON of a 2xx answer; otherwise raise what `error_for` makes of the answer."""
    data = _decode(body)
    if 200 <= status < 300:
        if data is _NOT_JSON:
            raise Transient(f"Metrika answered {status} with a body that is not JSON (a proxy or maintenance "
                            f"page?): {_excerpt(body)}", source=SOURCE, status=status)
        return data
    raise error_for(status, headers, data, body, now)


def error_for(status: int, headers: Mapping[str, str], data: Any, body: bytes,
              now: datetime | None = None) -> BridgeError:
    """A non-2xx answer as the taxonomy has it (`data` is the decoded body, `_NOT_JSON` if it is not JSON)."""
    errors = data.get("errors") if isinstance(data, dict) else None
    errors = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    message = _message(status, data, errors, body)
    retry_after = _retry_after(headers)
    if status in THROTTLED_STATUSES or status >= 500 or status < 400:  # < 400: an odd 1xx/3xx, no verdict
        daily = any(e.get("error_type") in DAILY_QUOTA_TYPES for e in errors)
        if daily:
            retry_after = max(retry_after or 0.0, seconds_until_quota_reset(now))
        return Transient(message, source=SOURCE, status=status, errors=errors, retry_after=retry_after,
                         daily_quota=daily)
    if status in (401, 403):
        return Misconfigured(f"{message}. {_ACTION[status]}", source=SOURCE, status=status, errors=errors)
    return Permanent(message, source=SOURCE, status=status, errors=errors, retry_after=retry_after)


_ACTION = {
    401: "The Metrika OAuth token is missing or invalid: issue a new token (scope metrika:write) and save it "
         "as the integration's metrika_token",
    403: "The Metrika token was revoked or its Yandex account has no edit access to this counter: grant the "
         "account edit access, or save a token of an account that has it",
}


def unreachable(what: str, timed_out: bool) -> Transient:
    """A request that got no answer (`what`: the exception's name): the same request may work later."""
    if timed_out:
        return Transient(f"Metrika did not answer in time: {what}", source=SOURCE)
    return Transient(f"Metrika unreachable: {what}", source=SOURCE)


def time_zone_of(counter_id: int, answer: Any) -> str:
    """`time_zone_name` from a GET counter answer; a counter without one cannot be used for uploads."""
    counter = answer.get("counter") if isinstance(answer, dict) else None
    name = counter.get("time_zone_name") if isinstance(counter, dict) else None
    if not name:
        raise Permanent(f"counter {counter_id} reports no time_zone_name", source=SOURCE)
    return str(name)


def seconds_until_quota_reset(now: datetime | None = None) -> float:
    now = now or datetime.now(timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


_NOT_JSON = object()


def _decode(body: bytes) -> Any:
    if not body:
        return {}
    try:
        return json.loads(body)
    except ValueError:
        return _NOT_JSON


def _excerpt(body: bytes) -> str:
    return body[:200].decode("utf-8", "replace").strip() or "no body"


def _message(status: int, data: Any, errors: list[dict], body: bytes) -> str:
    parts = [f"{e.get('message', '')} (at {e['location']})" if e.get("location") else str(e.get("message", ""))
             for e in errors]
    parts = [p for p in parts if p]
    if not parts and isinstance(data, dict) and data.get("message"):
        parts = [str(data["message"])]
    if not parts:
        # Not Metrika's JSON (a proxy's HTML page, say): show a short, safe excerpt.
        parts = [_excerpt(body)]
    return f"Metrika answered {status}: " + "; ".join(parts)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
