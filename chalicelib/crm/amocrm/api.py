"""amoCRM REST API v4 client (requests): the reads enrichment needs, with amoCRM's limits.

Reference: ../shared/reference/amocrm.md §10–§13 (amoCRM "API сделок", "API контактов", "Каталоги",
"Ограничения"). Long-lived token as `Authorization: Bearer`; the base URL comes from the integration's
configuration, never from a webhook.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import requests

from .. import PermanentSourceError, RetryableSourceError

PAGE_LIMIT = 250  # the API's maximum for list calls
# 7 requests a second per integration (§12); 5 % slack so network jitter never packs 8 into one second.
MIN_INTERVAL = 1.05 / 7
RETRYABLE = frozenset({429, 500, 502, 503, 504})


class AmoCrmClient:
    def __init__(self, base_url: str, token: str, *, wait_for_slot: Callable[[], None] = lambda: None,
                 session: requests.Session | None = None, timeout: tuple[float, float] = (3.05, 15.0),
                 attempts: int = 4, backoff: float = 0.5) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._wait_for_slot = wait_for_slot
        self._session = session or requests.Session()
        self._timeout, self._attempts, self._backoff = timeout, attempts, backoff

    def __repr__(self) -> str:  # never show the token
        return f"AmoCrmClient({self._base!r})"

    def get(self, path: str, params: list[tuple[str, str]] | None = None) -> dict | None:
        """One GET with retries on 429/5xx/network errors. None for 204 (nothing found)."""
        last = ""
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(self._backoff * 2 ** (attempt - 1))
            self._wait_for_slot()
            try:
                response = self._session.get(self._base + path, params=params, timeout=self._timeout,
                                             headers={"Authorization": f"Bearer {self._token}"})
            except requests.RequestException as exc:
                last = f"amoCRM unreachable: {type(exc).__name__}"
                continue
            if response.status_code == 204:
                return None
            if response.status_code < 300:
                return response.json()
            last = f"amoCRM answered {response.status_code}: {_detail(response)}"
            if response.status_code not in RETRYABLE:
                raise PermanentSourceError(last)
            retry_after = response.headers.get("Retry-After")
            if retry_after and retry_after.isdigit():
                time.sleep(min(int(retry_after), 10))
        raise RetryableSourceError(last)

    def leads(self, ids: list[str], with_: str = "contacts,catalog_elements") -> list[dict]:
        """Leads by id in bulk (`filter[id][]`, §11.1); deleted ids are simply absent."""
        return [lead for chunk in _chunks(ids) for lead in self._list("/api/v4/leads", "leads",
                [("with", with_), ("limit", str(PAGE_LIMIT))] + [("filter[id][]", i) for i in chunk])]

    def contacts(self, ids: list[str]) -> list[dict]:
        return [c for chunk in _chunks(ids) for c in self._list("/api/v4/contacts", "contacts",
                [("limit", str(PAGE_LIMIT))] + [("filter[id][]", i) for i in chunk])]

    def catalog_elements(self, catalog_id: int, ids: list[str]) -> list[dict]:
        """Names and prices of products (§11.4)."""
        return [e for chunk in _chunks(ids) for e in self._list(f"/api/v4/catalogs/{catalog_id}/elements",
                "elements", [("limit", str(PAGE_LIMIT))] + [("filter[id][]", i) for i in chunk])]

    def catalogs(self) -> list[dict]:
        """Catalogs with their `type` (`products`, `regular`, `invoices`; §11.4)."""
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


def _detail(response: requests.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body.get("hint") or body)[:300]
    return str(body)[:300]
