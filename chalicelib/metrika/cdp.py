"""Metrika CDP API without I/O: request shapes and the one place that knows Metrika's error classes.

Error body and classes: https://yandex.ru/dev/metrika/ru/intro/errors (reference §4); quotas:
https://yandex.ru/dev/metrika/ru/intro/quotas (§3). The EN quota page says 420 and the RU page 429,
so both count as throttling.
"""
from __future__ import annotations

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
