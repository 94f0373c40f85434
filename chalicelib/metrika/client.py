"""The requests adapter for the CDP API: sends what `cdp` builds and lets `cdp` judge the answer, so
every failure reaches the caller as the error taxonomy (`chalicelib.errors`) and nothing else: a
timeout or connection error is `cdp.unreachable`, any answer goes through `cdp.decipher_response`."""
from __future__ import annotations

import json
import random
import time
from decimal import Decimal
from typing import Any, Callable

import requests

from .. import deadline
from ..errors import Transient
from ..outbound import redirect_target
from . import cdp

# (connect, read): uploads of a few thousand rows are answered in seconds; past that we would rather
# retry later than hold a Lambda.
DEFAULT_TIMEOUT = (3.05, 30.0)
QUICK_RETRY_PAUSE = 0.5  # seconds (jittered) before the one quick retry of an answered 5xx/429
QUICK_RETRY_MAX = 2.0  # a longer Retry-After is the caller's to wait out, not this call's


class MetrikaClient:
    """One token's view of the Metrika API. `base_url` comes from settings (`METRIKA_API_URL`)."""

    def __init__(self, token: str, base_url: str, *, session: requests.Session | None = None,
                 timeout: tuple[float, float] = DEFAULT_TIMEOUT, governor: Any = None, attempts: int = 2,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._attempts, self._sleep = max(1, attempts), sleep
        self._token = token
        self._base_url = base_url.rstrip("/")
        self._session = session or requests.Session()
        self._timeout = timeout
        self.governor = governor  # QuotaGovernor: in-flight slots and the daily budget, or None

    def remaining_budget(self) -> int | None:
        return self.governor.remaining() if self.governor else None

    def __repr__(self) -> str:  # never show the token
        return f"MetrikaClient(base_url={self._base_url!r})"

    def send(self, request: cdp.ApiRequest) -> Any:
        """One request through the governor; an answered 5xx or 429 is tried once more after a short
        pause before the caller's backoff (minutes) takes over. Under 30 % of such answers that turns
        a 30 % chance of a long wait into 9 %. Not retried here: timeouts (the call already took its
        time), the daily quota, a Retry-After longer than QUICK_RETRY_MAX, and a retry the invocation's
        deadline leaves no time for (`chalicelib.deadline`)."""
        attempts = 0
        while True:
            try:
                return self._governed(request)
            except Transient as exc:
                attempts += 1
                quick = exc.status is not None and not exc.daily_quota and (exc.retry_after or 0) <= QUICK_RETRY_MAX
                pause = max(exc.retry_after or 0, random.uniform(QUICK_RETRY_PAUSE / 2, QUICK_RETRY_PAUSE))
                if not quick or attempts >= self._attempts or not deadline.allows(pause):
                    raise
                self._sleep(pause)

    def _governed(self, request: cdp.ApiRequest) -> Any:
        if self.governor is None:
            return self._send(request)
        # No slot is taken, nor a request of today's budget spent, for a call there is no time for.
        deadline.clip(self._timeout, source=cdp.SOURCE, what="Metrika")
        with self.governor.request():
            return self._send(request)

    def _send(self, request: cdp.ApiRequest) -> Any:
        headers = {"Authorization": f"OAuth {self._token}", "Accept": "application/json"}
        data, files = None, None
        if request.csv_file is not None:
            files = {"file": ("rows.csv", request.csv_file.encode("utf-8"), "text/csv")}
        elif request.body is not None:
            headers["Content-Type"] = "application/json; charset=utf-8"
            data = json.dumps(request.body, ensure_ascii=False, default=_json_default).encode("utf-8")
        timeout = deadline.clip(self._timeout, source=cdp.SOURCE, what="Metrika")
        try:
            response = self._session.request(request.method, self._base_url + request.path,
                                             params=request.params or None, data=data, files=files, headers=headers,
                                             timeout=timeout, allow_redirects=False)
        except requests.RequestException as exc:
            if isinstance(exc, requests.Timeout) and timeout != self._timeout:  # our deadline cut it short
                raise deadline.cut_short(timeout, source=cdp.SOURCE, what="Metrika") from exc
            raise cdp.unreachable(type(exc).__name__, isinstance(exc, requests.Timeout)) from exc
        if 300 <= response.status_code < 400:
            # requests would follow it, with the OAuth token when the host stays the same. Metrika's API
            # does not redirect; a proxy or a wrong METRIKA_API_URL does. Retried like cdp's other 3xx.
            raise Transient(f"Metrika answered {response.status_code} redirecting {redirect_target(response.headers)}: "
                            "redirects are not followed (the OAuth token would go with them); check METRIKA_API_URL",
                            source=cdp.SOURCE, status=response.status_code)
        return cdp.decipher_response(response.status_code, response.headers, response.content)

    def upload_contacts(self, counter_id: int, contacts: list[dict], merge_mode: str = "SAVE",
                        as_csv: bool = False) -> dict:
        request = (cdp.upload_csv(counter_id, "contacts", contacts, merge_mode) if as_csv
                   else cdp.upload_contacts(counter_id, contacts, merge_mode))
        return self.send(request)["uploading"]

    def upload_orders(self, counter_id: int, orders: list[dict], merge_mode: str = "SAVE", as_csv: bool = False) -> dict:
        request = (cdp.upload_csv(counter_id, "orders", orders, merge_mode) if as_csv
                   else cdp.upload_orders(counter_id, orders, merge_mode))
        return self.send(request)["uploading"]

    def attributes(self, counter_id: int, entity_type: str) -> dict:
        answer = self.send(cdp.get_attributes(counter_id, entity_type))
        return {"system": answer.get("system_attributes") or [], "custom": answer.get("custom_attributes") or []}

    def create_attributes(self, counter_id: int, entity_type: str, attributes: list[dict]) -> None:
        self.send(cdp.create_attributes(counter_id, entity_type, attributes))

    def save_products(self, counter_id: int, items: list[dict]) -> None:
        self.send(cdp.save_products(counter_id, items))

    def get_order_statuses(self, counter_id: int) -> list[dict]:
        return self.send(cdp.get_order_statuses(counter_id)).get("order_statuses", [])

    def save_order_statuses(self, counter_id: int, statuses: list[dict]) -> None:
        self.send(cdp.save_order_statuses(counter_id, statuses))

    def counter_time_zone(self, counter_id: int) -> str:
        return cdp.time_zone_of(counter_id, self.send(cdp.get_counter(counter_id)))

    def last_uploadings(self, counter_id: int, limit: int = 100, datetime_offset: str | None = None) -> list[dict]:
        return self.send(cdp.last_uploadings(counter_id, limit, datetime_offset)).get("uploadings", [])


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
