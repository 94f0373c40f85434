"""Bitrix24 REST client (requests) through an incoming-webhook URL; ready for OAuth through `auth`.

Reference: ../shared/reference/bitrix24.md §8–§17 (https://apidocs.bitrix24.com/api-reference/).
Calls are POSTs with a JSON body to `{webhook_url}{method}.json`, never GETs, so data and the secret
stay out of query strings and logs (§8).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator
from urllib.parse import urlencode

import requests

from .. import PermanentSourceError, RetryableSourceError

BATCH_LIMIT = 50  # sub-calls per batch (§15)
# Leaky bucket: 2 requests a second on non-Enterprise plans (§16); 5 % slack for network jitter.
MIN_INTERVAL = 1.05 / 2
RETRYABLE_ERRORS = frozenset({"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "INTERNAL_SERVER_ERROR"})


class BitrixError(Exception):
    """A method-level error in a batch result (e.g. "Not found" for a deleted deal)."""


class Bitrix24Client:
    def __init__(self, webhook_url: str, *, wait_for_slot: Callable[[], None] = lambda: None,
                 session: requests.Session | None = None, timeout: tuple[float, float] = (3.05, 20.0),
                 attempts: int = 4, backoff: float = 1.0) -> None:
        self._base = webhook_url if webhook_url.endswith("/") else webhook_url + "/"
        self._wait_for_slot = wait_for_slot
        self._session = session or requests.Session()
        self._timeout, self._attempts, self._backoff = timeout, attempts, backoff

    def __repr__(self) -> str:  # the URL is a secret
        return "Bitrix24Client(<webhook url>)"

    def call(self, method: str, params: dict | None = None) -> dict:
        """The whole answer (`result`, `next`, `total`, `time`). 503 QUERY_LIMIT_EXCEEDED, 429
        OPERATION_TIME_LIMIT, 5xx and network errors are retried with growing backoff (§16–§17)."""
        last = ""
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(self._backoff * 2 ** (attempt - 1))
            self._wait_for_slot()
            try:
                response = self._session.post(f"{self._base}{method}.json", json=params or {}, timeout=self._timeout)
            except requests.RequestException as exc:
                last = f"Bitrix24 unreachable: {type(exc).__name__}"
                continue
            body = _json(response)
            if response.status_code < 300 and "error" not in body:
                return body
            code = str(body.get("error", ""))
            last = f"Bitrix24 {method} answered {response.status_code} {code}: {body.get('error_description', '')}".strip()
            if code == "" and response.status_code == 400:
                raise BitrixError(body.get("error_description") or "error")  # method-level (§9)
            if response.status_code < 500 and response.status_code != 429 and code not in RETRYABLE_ERRORS:
                raise PermanentSourceError(last)
        raise RetryableSourceError(last)

    def batch(self, commands: dict[str, tuple[str, dict]]) -> tuple[dict, dict]:
        """Up to 50 sub-calls in one request; returns (results, errors) keyed like `commands`.
        Parameters may chain: `{"id": "$result[deal][CONTACT_ID]"}` (§15)."""
        results, errors, _, _ = self.batch_pages(commands)
        return results, errors

    def batch_pages(self, commands: dict[str, tuple[str, dict]]) -> tuple[dict, dict, dict, dict]:
        """`batch` returning also `result_next` (the next `start` of each list sub-call that has more)
        and `result_total` (items matching each list sub-call's filter)."""
        if len(commands) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} commands in one batch")
        cmd = {key: f"{method}?{urlencode(_flatten(params), safe='$[]')}" for key, (method, params) in commands.items()}
        result = self.call("batch", {"halt": 0, "cmd": cmd}).get("result") or {}
        errors, following, totals = (result.get(k) or {} for k in ("result_error", "result_next", "result_total"))
        return tuple(part if isinstance(part, dict) else {}
                     for part in (result.get("result") or {}, errors, following, totals))

    def deal(self, deal_id: str) -> dict:
        return self.call("crm.deal.get", {"id": deal_id})["result"]

    def contact(self, contact_id: str) -> dict:
        return self.call("crm.contact.get", {"id": contact_id})["result"]

    def lead(self, lead_id: str) -> dict:
        return self.call("crm.lead.get", {"id": lead_id})["result"]

    def product_rows(self, deal_id: str) -> list[dict]:
        return self.call("crm.deal.productrows.get", {"id": deal_id})["result"]

    def deal_stages(self) -> list[dict]:
        """Stages of every funnel: `DEAL_STAGE` (main) and `DEAL_STAGE_{n}` (§12)."""
        return [s for s in self._list("crm.status.list", {"order": {"SORT": "ASC"}})
                if str(s.get("ENTITY_ID", "")).startswith("DEAL_STAGE")]

    def deal_categories(self) -> dict[str, str]:
        """Funnel names by id (`"0"` is the default funnel)."""
        answer = self.call("crm.category.list", {"entityTypeId": 2}).get("result") or {}
        return {str(c["id"]): c.get("name", "") for c in answer.get("categories", [])}

    def deals_modified_since(self, since_iso: str) -> Iterator[dict]:
        """`crm.deal.list` with `>DATE_MODIFY`, oldest id first, all pages (§7)."""
        yield from self._list("crm.deal.list", {"filter": {">DATE_MODIFY": since_iso}, "order": {"ID": "ASC"},
                                                "select": ["ID", "DATE_MODIFY"]})

    def _list(self, method: str, params: dict) -> Iterator[dict]:
        start = 0
        while True:
            answer = self.call(method, {**params, "start": start})
            yield from answer.get("result") or []
            if "next" not in answer:
                return
            start = answer["next"]


def _flatten(params: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested parameters as PHP's http_build_query writes them (`filter[>ID]=5`, `select[0]=*`): the
    form a batch sub-command's query string takes (§15)."""
    pairs: list[tuple[str, str]] = []
    items = params.items() if isinstance(params, dict) else enumerate(params)
    for key, value in items:
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, (dict, list, tuple)):
            pairs += _flatten(value, name)
        else:
            pairs.append((name, "" if value is None else str(value)))
    return pairs


def _json(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:  # a block page can come back as HTML (§17)
        return {"error": f"HTTP_{response.status_code}", "error_description": response.text[:200]}
    return body if isinstance(body, dict) else {"result": body}
