"""amoCRM REST API v4 client (requests): the reads enrichment needs, with amoCRM's limits.

Vendor documentation: https://www.amocrm.ru/developers/content/crm_platform/leads-api ("API сделок"),
https://www.amocrm.ru/developers/content/crm_platform/contacts-api ("API контактов"),
https://www.amocrm.ru/developers/content/crm_platform/catalogs-api ("Каталоги"),
https://www.amocrm.ru/developers/content/api/recommendations ("Ограничения"). Long-lived token as
`Authorization: Bearer`; the base URL comes from the integration's configuration, never from a webhook.

`AmoCrmClient.get` is the one place that maps amoCRM's answers to the error taxonomy
(`chalicelib.errors`, source "amocrm"), through `classify`: no answer (network error, timeout), 429,
5xx, and any answer whose body is not JSON (amoCRM's maintenance page comes as HTML with a 200) are
`Transient`, retried in the client (`attempts`, growing backoff) and then raised; 401/403 are
`Misconfigured` (the token expired or was revoked, or the account's API is blocked); any other 4xx is
`Permanent`. A 3xx is `Misconfigured` too: redirects are not followed (the token would go with them),
and a host that resolves to a private address is not called at all (`chalicelib.outbound`).
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator, Mapping

import requests

from ... import deadline
from ...errors import BridgeError, Misconfigured, Permanent, Transient
from ...outbound import PrivateAddress, redirect_target
from ...outbound import session as checked_session

SOURCE = "amocrm"
PAGE_LIMIT = 250  # the API's maximum for list calls
# 7 requests a second per integration ("Ограничения"). Requests are spaced 20 % wider than that: amoCRM
# counts them as they arrive, and a sender delayed after its slot (a busy host, network jitter) packs the
# next ones closer; with 5 % slack a 50 ms delay was enough to put 8 into one second.
MIN_INTERVAL = 1.2 / 7
MAX_RETRY_AFTER = 10.0  # seconds we wait in-client on a Retry-After; longer waits are the worker's job
_ACTION = {
    401: "the API token has expired or was revoked: generate a new long-lived token in the amoCRM integration's "
         "\"Ключи и доступы\" tab and save it as the integration's connection.access_token",
    403: "amoCRM refuses this token: its user lacks rights, or the account's API is blocked (too many requests, "
         "or this IP is not allowed); an account administrator must check the integration",
}


def classify(status: int, headers: Mapping[str, str], body: bytes) -> Any:
    """The decoded JSON of a usable answer (None for 204, amoCRM's "nothing found"), or the answer's
    error as the taxonomy has it. Pure: status, headers and body in, a value or a `BridgeError` out."""
    if status == 204:
        return None
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = _NOT_JSON
    if 200 <= status < 300:
        if data is _NOT_JSON or data is None:
            return Transient(f"amoCRM answered {status} with a body that is not JSON (maintenance page?): "
                             f"{_excerpt(body)}", source=SOURCE, status=status)
        return data
    if 300 <= status < 400:
        return Misconfigured(f"amoCRM answered {status} redirecting {redirect_target(headers)}: redirects are not "
                             "followed (the token would go with them); set connection.base_url to the account's "
                             "current address (an account moved to kommo.com answers so)", source=SOURCE, status=status)
    message = f"amoCRM answered {status}: {_detail(data, body)}"
    if status in (401, 403):
        return Misconfigured(f"{message}; {_ACTION[status]}", source=SOURCE, status=status)
    if status == 429 or status >= 500 or status < 300:
        return Transient(message, source=SOURCE, status=status, retry_after=_retry_after(headers))
    return Permanent(message, source=SOURCE, status=status)


class AmoCrmClient:
    def __init__(self, base_url: str, token: str, *, wait_for_slot: Callable[[], None] = lambda: None,
                 session: requests.Session | None = None, timeout: tuple[float, float] = (3.05, 15.0),
                 attempts: int = 4, backoff: float = 0.5, reauthorize: Callable[[str], str] | None = None) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        # An installed (OAuth) integration: given the token amoCRM just refused (401), a new one (a
        # forced refresh, `chalicelib.oauth.TokenKeeper`). Tried once per call; long-lived tokens have none.
        self._reauthorize = reauthorize
        self._wait_for_slot = wait_for_slot
        self._session = session or checked_session()
        self._timeout, self._attempts, self._backoff = timeout, attempts, backoff

    def __repr__(self) -> str:  # never show the token
        return f"AmoCrmClient({self._base!r})"

    def get(self, path: str, params: list[tuple[str, str]] | None = None) -> dict | None:
        """One GET; None for 204 (nothing found). A `Transient` failure is retried `attempts` times with
        growing backoff (and the Retry-After amoCRM sends, up to 10 s), then raised; `Misconfigured` and
        `Permanent` are raised at once. Timeouts and waits end by the invocation's deadline
        (`chalicelib.deadline`): a call there is no time for, or one it cut short, raises `OutOfTime`;
        a retry there is no time for raises the failure that called for it."""
        failure: BridgeError | None = None
        reauthorize = self._reauthorize
        retry_now = False  # after a forced refresh: the retry goes at once
        for attempt in range(self._attempts + (reauthorize is not None)):
            if attempt and not retry_now:
                pause = self._backoff * 2 ** (attempt - 1)
                if failure is not None and not deadline.allows(pause):
                    raise failure
                time.sleep(pause)
            retry_now = False
            self._wait_for_slot()
            timeout = deadline.clip(self._timeout, source=SOURCE, what="amoCRM")
            try:
                response = self._session.get(self._base + path, params=params, timeout=timeout,
                                             headers={"Authorization": f"Bearer {self._token}"}, allow_redirects=False)
            except PrivateAddress as exc:
                raise Misconfigured(f"amoCRM's host {exc.host} resolves to {exc.address}, not a public address: this "
                                    "deployment does not call it; check connection.base_url", source=SOURCE) from exc
            except requests.RequestException as exc:
                if isinstance(exc, requests.Timeout) and timeout != self._timeout:  # our deadline cut it short
                    raise deadline.cut_short(timeout, source=SOURCE, what="amoCRM") from exc
                what = "did not answer in time" if isinstance(exc, requests.Timeout) else "unreachable"
                failure = Transient(f"amoCRM {what}: {type(exc).__name__}", source=SOURCE)
                continue
            answer = classify(response.status_code, response.headers, response.content)
            if not isinstance(answer, BridgeError):
                return answer
            if answer.status == 401 and reauthorize is not None:
                self._token, reauthorize = reauthorize(self._token), None  # one forced refresh, one retry
                failure, retry_now = answer, True
                continue
            if not isinstance(answer, Transient):
                raise answer
            failure = answer
            if answer.retry_after:
                wait = min(answer.retry_after, MAX_RETRY_AFTER)
                if not deadline.allows(wait):
                    raise answer
                time.sleep(wait)
        assert failure is not None  # attempts >= 1
        raise failure

    def leads(self, ids: list[str], with_: str = "contacts,catalog_elements") -> list[dict]:
        """Leads by id in bulk (`filter[id][]`, "API сделок"); deleted ids are simply absent."""
        return [lead for chunk in _chunks(ids) for lead in self._list("/api/v4/leads", "leads",
                [("with", with_), ("limit", str(PAGE_LIMIT))] + [("filter[id][]", i) for i in chunk])]

    def contacts(self, ids: list[str]) -> list[dict]:
        return [c for chunk in _chunks(ids) for c in self._list("/api/v4/contacts", "contacts",
                [("limit", str(PAGE_LIMIT))] + [("filter[id][]", i) for i in chunk])]

    def catalog_elements(self, catalog_id: int, ids: list[str]) -> list[dict]:
        """Names and prices of products ("Каталоги": elements of a catalog)."""
        return [e for chunk in _chunks(ids) for e in self._list(f"/api/v4/catalogs/{catalog_id}/elements",
                "elements", [("limit", str(PAGE_LIMIT))] + [("filter[id][]", i) for i in chunk])]

    def catalogs(self) -> list[dict]:
        """Catalogs with their `type` (`products`, `regular`, `invoices`; "Каталоги")."""
        return self._list("/api/v4/catalogs", "catalogs", [("limit", str(PAGE_LIMIT))])

    def all_catalog_elements(self, catalog_id: int) -> Iterator[dict]:
        yield from self._pages(f"/api/v4/catalogs/{catalog_id}/elements", "elements", [])

    def page(self, entity: str, since: int, page: int, with_: str | None = None) -> tuple[list[dict], bool]:
        """One page of `leads` or `contacts` changed since `since`, in id order, so items updated while
        we page keep their place (for the history import). Returns (items, more pages follow)."""
        params = [("filter[updated_at][from]", str(since)), ("order[id]", "asc"), ("limit", str(PAGE_LIMIT)),
                  ("page", str(page))] + ([("with", with_)] if with_ else [])
        data = self.get(f"/api/v4/{entity}", params)
        items = ((data or {}).get("_embedded") or {}).get(entity) or []
        return items, bool(items) and "next" in ((data or {}).get("_links") or {})

    def pipelines(self) -> list[dict]:
        return self._list("/api/v4/leads/pipelines", "pipelines", [])

    def custom_fields(self, entity: str) -> list[dict]:
        """The account's fields of `leads` or `contacts`, every page (50 a page by default, followed by
        `_links.next`: "Поля и группы полей", https://www.amocrm.ru/developers/content/crm_platform/custom-fields)."""
        return list(self._pages(f"/api/v4/{entity}/custom_fields", "custom_fields", []))

    def webhooks(self) -> list[dict]:
        return self._list("/api/v4/webhooks", "webhooks", [])

    def leads_updated_since(self, since: int) -> Iterator[dict]:
        """Every lead with `updated_at >= since`, oldest first, page by page (reconciliation)."""
        yield from self._pages("/api/v4/leads", "leads", [("filter[updated_at][from]", str(since)),
                                                          ("order[updated_at]", "asc"), ("with", "contacts,catalog_elements")])

    def _pages(self, path: str, key: str, params: list[tuple[str, str]]) -> Iterator[dict]:
        page = 1
        while True:
            data = self.get(path, params + [("limit", str(PAGE_LIMIT)), ("page", str(page))])
            items = ((data or {}).get("_embedded") or {}).get(key) or []
            yield from items
            if not items or "next" not in ((data or {}).get("_links") or {}):
                return
            page += 1

    def _list(self, path: str, key: str, params: list[tuple[str, str]]) -> list[dict]:
        data = self.get(path, params)
        return ((data or {}).get("_embedded") or {}).get(key) or []


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), PAGE_LIMIT):
        yield unique[start:start + PAGE_LIMIT]


_NOT_JSON = object()


def _excerpt(body: bytes) -> str:
    return " ".join(body[:200].decode("utf-8", "replace").split()) or "no body"


def _detail(data: Any, body: bytes) -> str:
    if data is _NOT_JSON or data is None:
        return _excerpt(body)
    if isinstance(data, dict):
        return str(data.get("detail") or data.get("title") or data.get("hint") or data)[:300]
    return str(data)[:300]


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
