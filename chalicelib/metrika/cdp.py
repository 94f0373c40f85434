"""Metrika CDP API without I/O: request shapes and the one place that knows Metrika's error classes.

Error body and classes: https://yandex.ru/dev/metrika/ru/intro/errors (reference §4); quotas:
https://yandex.ru/dev/metrika/ru/intro/quotas (§3). The EN quota page says 420 and the RU page 429,
so both count as throttling.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

CDP_PREFIX = "/cdp/api/v1/counter/{counter_id}"
RETRYABLE_STATUSES = frozenset({420, 429, 500, 502, 503, 504})
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


class MetrikaError(Exception):
    """A failed Metrika call. `errors` are Metrika's own `{error_type, message, location}` items."""

    retryable = False

    def __init__(self, status: int | None, message: str, errors: list[dict] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or []
        self.retry_after = retry_after

    @property
    def daily_quota(self) -> bool:
        """Today's request budget is spent: wait for 00:00 UTC; no amount of retrying helps sooner."""
        return any(e.get("error_type") in DAILY_QUOTA_TYPES for e in self.errors)

    def describe(self) -> dict:
        """What an operator needs: status, message, and each error's type, message and location."""
        return {"status": self.status, "message": self.message, "errors": self.errors,
                "retryable": self.retryable}


class RetryableMetrikaError(MetrikaError):
    """420/429/5xx, network errors and timeouts: the same request may succeed later."""

    retryable = True


class PermanentMetrikaError(MetrikaError):
    """Other 4xx: the data, token or counter must change before a retry can succeed."""


def upload_contacts(counter_id: int, contacts: list[dict], merge_mode: str = "APPEND") -> ApiRequest:
    """POST data/contacts/json (§5.1). APPEND by default so ClientIDs and phones collected earlier
    are never dropped by a snapshot that lacks them (§7)."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/data/contacts/json",
                      {"merge_mode": merge_mode}, {"contacts": contacts})


def upload_orders(counter_id: int, orders: list[dict], merge_mode: str = "SAVE") -> ApiRequest:
    """POST data/orders/json (§6.1). SAVE by default: we always send the complete current order (§6.3)."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/data/orders/json",
                      {"merge_mode": merge_mode}, {"orders": orders})


# Column order of the CSV uploads: the JSON field names (§5.2, §6.2), then custom attributes by name.
CSV_COLUMNS = {
    "contacts": ("uniq_id", "name", "birth_date", "create_date_time", "update_date_time", "client_ids", "user_ids",
                 "emails", "phones", "emails_md5", "phones_md5"),
    "orders": ("id", "client_uniq_id", "client_type", "create_date_time", "update_date_time", "finish_date_time",
               "order_status", "revenue", "cost", "currency", "products"),
}


def upload_csv(counter_id: int, kind: str, rows: list[dict], merge_mode: str) -> ApiRequest:
    """POST data/{contacts|orders}/csv (§5.2, §6.2): the documented way to send custom attribute
    values, since the JSON shape of `attribute_values` is inconsistent across the docs (§5.4).
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
    if isinstance(value, dict):  # products: `product_id:qty,product_id:qty` (§6.2)
        return ",".join(f"{k}:{_number(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return _number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def get_attributes(counter_id: int, entity_type: str) -> ApiRequest:
    """GET schema/attributes (§8.2): `{"system_attributes": […], "custom_attributes": […]}`."""
    return ApiRequest("GET", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/attributes",
                      {"entity_type": entity_type})


def create_attributes(counter_id: int, entity_type: str, attributes: list[dict]) -> ApiRequest:
    """POST schema/attributes (§8.2). There is no update or delete, so only new names are sent."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/attributes",
                      {"entity_type": entity_type}, {"attributes": attributes})


def save_products(counter_id: int, items: list[dict]) -> ApiRequest:
    """POST schema/products (§8.3). Whether it replaces or adds to the list is undocumented, so callers
    always send the complete list (at most 160 000 items)."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/products",
                      body={"attributes": [], "items": items})


def get_order_statuses(counter_id: int) -> ApiRequest:
    return ApiRequest("GET", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/order_statuses")


def save_order_statuses(counter_id: int, statuses: list[dict]) -> ApiRequest:
    """POST schema/order_statuses (§8.1): whether it replaces or upserts is undocumented, so callers
    always send the complete list."""
    return ApiRequest("POST", f"{CDP_PREFIX.format(counter_id=counter_id)}/schema/order_statuses",
                      body={"order_statuses": statuses})


def get_counter(counter_id: int) -> ApiRequest:
    """GET /management/v1/counter/{id}: the counter, with `time_zone_name` (§10)."""
    return ApiRequest("GET", f"/management/v1/counter/{counter_id}")


def last_uploadings(counter_id: int, limit: int = 100, datetime_offset: str | None = None) -> ApiRequest:
    """GET last_uploadings (§9): newest first; `datetime_offset` pages to strictly earlier uploads."""
    params = {"limit": str(limit)}
    if datetime_offset:
        params["datetime_offset"] = datetime_offset
    return ApiRequest("GET", f"{CDP_PREFIX.format(counter_id=counter_id)}/last_uploadings", params)


def decipher_response(status: int, headers: Mapping[str, str], body: bytes,
                      now: datetime | None = None) -> Any:
    """Return the decoded JSON of a 2xx answer, or raise the matching MetrikaError (§4.2)."""
    data = _decode(body)
    if 200 <= status < 300:
        return data
    errors = data.get("errors") if isinstance(data, dict) else None
    errors = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    message = _message(status, data, errors, body)
    retry_after = _retry_after(headers)
    if status in RETRYABLE_STATUSES:
        if any(e.get("error_type") in DAILY_QUOTA_TYPES for e in errors):
            retry_after = max(retry_after or 0.0, seconds_until_quota_reset(now))
        raise RetryableMetrikaError(status, message, errors, retry_after)
    raise PermanentMetrikaError(status, message, errors, retry_after)


def seconds_until_quota_reset(now: datetime | None = None) -> float:
    now = now or datetime.now(timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def _decode(body: bytes) -> Any:
    if not body:
        return {}
    try:
        return json.loads(body)
    except ValueError:
        return {}


def _message(status: int, data: Any, errors: list[dict], body: bytes) -> str:
    parts = [f"{e.get('message', '')} (at {e['location']})" if e.get("location") else str(e.get("message", ""))
             for e in errors]
    parts = [p for p in parts if p]
    if not parts and isinstance(data, dict) and data.get("message"):
        parts = [str(data["message"])]
    if not parts:
        # Not Metrika's JSON (a proxy's HTML page, say): show a short, safe excerpt.
        parts = [body[:200].decode("utf-8", "replace").strip() or "no body"]
    return f"Metrika answered {status}: " + "; ".join(parts)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
