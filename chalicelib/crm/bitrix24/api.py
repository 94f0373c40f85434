"""Bitrix24 REST client (requests) through an incoming-webhook URL, or an installed application's
`client_endpoint` with its OAuth access token in `auth` (`Bitrix24Client(auth=…)`).

Calls are POSTs with a JSON body to `{webhook_url}{method}.json`, never GETs, so data and the secret
stay out of query strings and logs (https://apidocs.bitrix24.ru/local-integrations/local-webhooks.html
"Входящие и исходящие вебхуки").

`classify` is the one place that maps Bitrix24's errors to the error taxonomy (`chalicelib.errors`,
source "bitrix24"), for a whole answer (HTTP status and body) and for a `batch` sub-call's
`result_error` item alike (https://apidocs.bitrix24.ru/error-codes.html "Коды ошибок";
https://apidocs.bitrix24.ru/limits.html "Лимиты REST API"):

* QUERY_LIMIT_EXCEEDED, OPERATION_TIME_LIMIT, INTERNAL_SERVER_ERROR, ERROR_UNEXPECTED_ANSWER, any 5xx
  or 429, no answer, and an answer that is not JSON (a block page in HTML) → `Transient`;
* NO_AUTH_FOUND, expired_token, invalid_token, insufficient_scope, INVALID_CREDENTIALS, ACCESS_DENIED,
  "Access denied", WRONG_AUTH_TYPE, PORTAL_DELETED, OVERLOAD_LIMIT (REST blocked for overload until
  the portal's administrator contacts support), and any 401/403 → `Misconfigured`;
* a method's "Not found" → `NotFound`: the entity does not exist (deleted), which is not an error;
* a 3xx → `Misconfigured`: redirects are not followed (the webhook URL is a secret and would go with
  them), nor is a host called that resolves to a private address (`chalicelib.outbound`);
* anything else → `Permanent`.

Callers never parse error strings: `call` raises the `BridgeError`, `get` returns None for an entity
that does not exist, and `batch` returns each failed sub-call as a `BridgeError` or `NotFound`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlencode

import requests

from ... import deadline
from ...errors import BridgeError, Misconfigured, Permanent, Transient
from ...outbound import PrivateAddress, redirect_target
from ...outbound import session as checked_session

SOURCE = "bitrix24"
# Sub-calls per batch (https://dev.1c-bitrix.ru/rest_help/general/batch.php "batch").
BATCH_LIMIT = 50
# Leaky bucket: 2 requests a second on non-Enterprise plans ("Лимиты REST API"); 5 % slack for jitter.
MIN_INTERVAL = 1.05 / 2
TRANSIENT_CODES = frozenset({"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "INTERNAL_SERVER_ERROR",
                             "ERROR_UNEXPECTED_ANSWER"})
NOT_FOUND_CODES = frozenset({"NOT_FOUND", "ERROR_NOT_FOUND"})
# What a person must do, by error code (matched case-insensitively).
_ACTION = {
    "NO_AUTH_FOUND": "the incoming webhook URL is wrong or the webhook was deleted: create an incoming webhook "
                     "with the crm scope and save its URL as the integration's connection.webhook_url",
    "INVALID_TOKEN": "the access token is invalid: authorise the integration again",
    "EXPIRED_TOKEN": "the access token has expired and a refresh did not bring a valid one: install the "
                     "application on the portal again",
    "WRONG_AUTH_TYPE": "this method cannot be called through an incoming webhook",
    "INSUFFICIENT_SCOPE": "the webhook lacks the crm scope: tick crm in the incoming webhook's settings",
    "INVALID_CREDENTIALS": "the webhook's user lacks rights: give that user read access to CRM deals, contacts "
                           "and leads, or recreate the webhook under a user who has it",
    "ACCESS_DENIED": "the webhook's user may not read this (or REST is not available on the portal's plan): give "
                     "that user read access to CRM deals, contacts and leads",
    "OVERLOAD_LIMIT": "Bitrix24 blocked REST for this webhook after an overload: the portal's administrator must "
                      "contact Bitrix24 support to lift the block",
    "PORTAL_DELETED": "the Bitrix24 portal was deleted: point the integration at a live portal",
}
_ACCESS_DENIED = "access denied"


@dataclass(frozen=True)
class NotFound:
    """A (sub-)call's entity does not exist: Bitrix24's method-level "Not found" (deleted or never
    created). Not an error of the integration: the caller decides what absence means."""

    method: str = ""
    description: str = "Not found"


def classify(code: Any, description: Any = "", status: int | None = None,
             method: str = "") -> BridgeError | NotFound:
    """A Bitrix24 error as the taxonomy has it: the top-level answer's `error`, `error_description` and
    HTTP status, or a batch sub-call's `result_error` item (no status of its own: the batch is a 200)."""
    code, text = str(code or "").strip(), str(description or "").strip()
    upper = code.upper()
    where = f"Bitrix24 {method}" if method else "Bitrix24"
    detail = ": ".join(p for p in (code, text) if p) or "an error without a description"
    message = f"{where} answered {status} {detail}" if status else f"{where} answered {detail}"
    if upper in NOT_FOUND_CODES or text.rstrip(".").strip().lower() == "not found":
        return NotFound(method, text or code)
    if upper in _ACTION or text.lower().startswith(_ACCESS_DENIED) or status in (401, 403):
        action = _ACTION.get(upper) or _ACTION["ACCESS_DENIED" if text.lower().startswith(_ACCESS_DENIED)
                                               or status == 403 else "NO_AUTH_FOUND"]
        return Misconfigured(f"{message}; {action}", source=SOURCE, status=status)
    if upper in TRANSIENT_CODES or status == 429 or (status or 0) >= 500:
        return Transient(message, source=SOURCE, status=status)
    return Permanent(message, source=SOURCE, status=status)


def judge(status: int, body: bytes, method: str = "", headers: Mapping[str, str] | None = None,
          ) -> dict | BridgeError | NotFound:
    """A whole answer: the decoded body of a success, else what `classify` makes of it. An answer that is
    not JSON (a block or maintenance page in HTML, observed when Bitrix24 blocks a client) is
    `Transient`, unless its status already says the credentials are refused. A redirect is
    `Misconfigured` (a renamed portal answers so): it is not followed."""
    if 300 <= status < 400:
        return Misconfigured(f"Bitrix24 {method} answered {status} redirecting {redirect_target(headers or {})}: "
                             "redirects are not followed (the webhook URL is a secret and would go with them); save "
                             "the portal's current incoming-webhook URL as connection.webhook_url", source=SOURCE,
                             status=status)
    try:
        data = json.loads(body)
    except ValueError:
        if status in (401, 403):
            return classify("", _excerpt(body), status, method)
        return Transient(f"Bitrix24 {method} answered {status} with a body that is not JSON: {_excerpt(body)}",
                         source=SOURCE, status=status)
    data = data if isinstance(data, dict) else {"result": data}
    if status < 300 and "error" not in data:
        return data
    return classify(data.get("error"), data.get("error_description"), status, method)


def expired_token(status: int, body: bytes) -> bool:
    """Whether an answer is the portal's 401 `expired_token`: the one answer that calls for a refresh
    ("Full OAuth 2.0 Authorization Protocol", https://apidocs.bitrix24.com/settings/oauth/index.html)."""
    if status != 401:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and str(data.get("error", "")).lower() == "expired_token"


class Bitrix24Client:
    """`webhook_url`: an incoming webhook's URL, or an application's `client_endpoint` with `auth` (a
    callable answering the current access token; `auth(True)` forces a refresh): each call then carries
    `auth=<access token>` in its body, and a 401 `expired_token` is refreshed once and the call repeated."""

    def __init__(self, webhook_url: str, *, wait_for_slot: Callable[[], None] = lambda: None,
                 session: requests.Session | None = None, timeout: tuple[float, float] = (3.05, 20.0),
                 attempts: int = 4, backoff: float = 1.0, auth: Callable[[bool], str] | None = None) -> None:
        self._base = webhook_url if webhook_url.endswith("/") else webhook_url + "/"
        self._auth = auth
        self._wait_for_slot = wait_for_slot
        self._session = session or checked_session()
        self._timeout, self._attempts, self._backoff = timeout, attempts, backoff

    def __repr__(self) -> str:  # the URL (or the token) is a secret
        return "Bitrix24Client(<webhook url>)"

    def _request(self, method: str, params: dict | None) -> dict | NotFound:
        """One call: a `Transient` failure (no answer, 503 QUERY_LIMIT_EXCEEDED, 429 OPERATION_TIME_LIMIT,
        5xx, not JSON) is retried `attempts` times with growing backoff, then raised; any other
        `BridgeError` is raised at once; "Not found" comes back as `NotFound`. Timeouts and waits end by
        the invocation's deadline (`chalicelib.deadline`): a call there is no time for, or one it cut
        short, raises `OutOfTime`; a retry there is no time for raises the failure that called for it."""
        failure: BridgeError | None = None
        refreshed = False
        retry_now = False  # after the forced refresh: the same call again at once
        token = self._auth(False) if self._auth is not None else None
        attempt = -1
        while attempt + 1 < self._attempts:
            attempt += 1
            if attempt and not retry_now:
                pause = self._backoff * 2 ** (attempt - 1)
                if failure is not None and not deadline.allows(pause):
                    raise failure
                time.sleep(pause)
            retry_now = False
            self._wait_for_slot()
            timeout = deadline.clip(self._timeout, source=SOURCE, what="Bitrix24")
            try:
                body = {**(params or {}), "auth": token} if token is not None else params or {}
                response = self._session.post(f"{self._base}{method}.json", json=body, timeout=timeout,
                                              allow_redirects=False)
            except PrivateAddress as exc:
                raise Misconfigured(f"the Bitrix24 portal's host {exc.host} resolves to {exc.address}, not a public "
                                    "address: this deployment does not call it; check connection.webhook_url",
                                    source=SOURCE) from exc
            except requests.RequestException as exc:
                if isinstance(exc, requests.Timeout) and timeout != self._timeout:  # our deadline cut it short
                    raise deadline.cut_short(timeout, source=SOURCE, what="Bitrix24") from exc
                what = "did not answer in time" if isinstance(exc, requests.Timeout) else "unreachable"
                failure = Transient(f"Bitrix24 {what}: {type(exc).__name__}", source=SOURCE)
                continue
            if self._auth is not None and not refreshed and expired_token(response.status_code, response.content):
                # One forced refresh, then the same call again at once (not counted as an attempt).
                refreshed, token, retry_now = True, self._auth(True), True
                attempt -= 1
                continue
            answer = judge(response.status_code, response.content, method, response.headers)
            if isinstance(answer, Transient):
                failure = answer
                continue
            if isinstance(answer, BridgeError):
                raise answer
            return answer
        assert failure is not None  # attempts >= 1
        raise failure

    def call(self, method: str, params: dict | None = None) -> dict:
        """The whole answer (`result`, `next`, `total`, `time`), or the failure raised as a `BridgeError`.
        A "Not found" here (a list or directory method has no entity to miss) is `Permanent`; read one
        entity with `get`."""
        answer = self._request(method, params)
        if isinstance(answer, NotFound):
            raise Permanent(f"Bitrix24 {method} answered {answer.description}", source=SOURCE)
        return answer

    def get(self, method: str, entity_id: str) -> Any:
        """`crm.*.get` (or `crm.deal.productrows.get`) of one entity: its result, or None when it does not
        exist."""
        answer = self._request(method, {"id": entity_id})
        return None if isinstance(answer, NotFound) else answer.get("result")

    def batch(self, commands: dict[str, tuple[str, dict]]) -> tuple[dict, dict]:
        """Up to 50 sub-calls in one request; returns (results, errors) keyed like `commands`, each error
        classified (`BridgeError` or `NotFound`). Parameters may chain: `{"id": "$result[deal][CONTACT_ID]"}`
        ("batch"). Sub-calls fail inside a 200 answer; only the batch request itself raises."""
        results, errors, _, _ = self.batch_pages(commands)
        return results, errors

    def batch_pages(self, commands: dict[str, tuple[str, dict]]) -> tuple[dict, dict, dict, dict]:
        """`batch` returning also `result_next` (the next `start` of each list sub-call that has more)
        and `result_total` (items matching each list sub-call's filter)."""
        if len(commands) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} commands in one batch")
        cmd = {key: f"{method}?{urlencode(_flatten(params), safe='$[]')}" for key, (method, params) in commands.items()}
        result = self.call("batch", {"halt": 0, "cmd": cmd}).get("result") or {}
        results, raw_errors, following, totals = (part if isinstance(part, dict) else {} for part in (
            result.get(k) for k in ("result", "result_error", "result_next", "result_total")))
        errors = {key: _sub_error(commands[key][0] if key in commands else "", item)
                  for key, item in raw_errors.items()}
        return results, errors, following, totals

    def deal(self, deal_id: str) -> dict | None:
        return self.get("crm.deal.get", deal_id)

    def contact(self, contact_id: str) -> dict | None:
        return self.get("crm.contact.get", contact_id)

    def lead(self, lead_id: str) -> dict | None:
        return self.get("crm.lead.get", lead_id)

    def product_rows(self, deal_id: str) -> list[dict] | None:
        return self.get("crm.deal.productrows.get", deal_id)

    def deal_stages(self) -> list[dict]:
        """Stages of every funnel: `DEAL_STAGE` (main) and `DEAL_STAGE_{n}`
        (https://apidocs.bitrix24.com/api-reference/crm/status/index.html "Reference Guides in CRM: Overview
        of Methods")."""
        return [s for s in self.all_items("crm.status.list", {"order": {"SORT": "ASC"}})
                if str(s.get("ENTITY_ID", "")).startswith("DEAL_STAGE")]

    def entity_fields(self, method: str) -> dict:
        """`crm.deal.fields` / `crm.contact.fields`: field code → description, user fields included
        ("crm.deal.fields", https://training.bitrix24.com/rest_help/crm/deals/crm_deal_fields.php)."""
        answer = self.call(method).get("result")
        return answer if isinstance(answer, dict) else {}

    def deal_categories(self) -> dict[str, str]:
        """Funnel names by id (`"0"` is the default funnel)."""
        answer = self.call("crm.category.list", {"entityTypeId": 2}).get("result") or {}
        return {str(c["id"]): c.get("name", "") for c in answer.get("categories", [])}

    def deals_modified_since(self, since_iso: str) -> Iterator[dict]:
        """`crm.deal.list` with `>DATE_MODIFY`, oldest id first, all pages (50 items each, with `next`)."""
        yield from self.all_items("crm.deal.list", {"filter": {">DATE_MODIFY": since_iso}, "order": {"ID": "ASC"},
                                                    "select": ["ID", "DATE_MODIFY"]})

    def all_items(self, method: str, params: dict) -> Iterator[dict]:
        """Every item of a list method, page by page (`start` from the previous answer's `next`)."""
        start = 0
        while True:
            answer = self.call(method, {**params, "start": start})
            yield from answer.get("result") or []
            if "next" not in answer:
                return
            start = answer["next"]


def _sub_error(method: str, item: Any) -> BridgeError | NotFound:
    item = item if isinstance(item, dict) else {"error_description": str(item)}
    return classify(item.get("error"), item.get("error_description"), None, method)


def _excerpt(body: bytes) -> str:
    return " ".join(body[:200].decode("utf-8", "replace").split()) or "no body"


def _flatten(params: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested parameters as PHP's http_build_query writes them (`filter[>ID]=5`, `select[0]=*`): the
    form a batch sub-command's query string takes ("batch": commands are URL-encoded query strings)."""
    pairs: list[tuple[str, str]] = []
    items = params.items() if isinstance(params, dict) else enumerate(params)
    for key, value in items:
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, (dict, list, tuple)):
            pairs += _flatten(value, name)
        else:
            pairs.append((name, "" if value is None else str(value)))
    return pairs
