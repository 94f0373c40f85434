"""Bitrix24 stand-in on loopback: the REST subset we call through an incoming-webhook URL, its leaky
bucket, and outbound events (`ONCRMDEAL*`, `ONCRMCONTACT*`) fired at registered handlers with an
`application_token`, never retried, as Bitrix24 does (vendor documentation:
https://apidocs.bitrix24.ru/local-integrations/local-webhooks.html "Входящие и исходящие вебхуки",
https://apidocs.bitrix24.ru/limits.html "Лимиты REST API", https://apidocs.bitrix24.ru/error-codes.html
"Коды ошибок", https://dev.1c-bitrix.ru/rest_help/general/batch.php "batch").

REST: `POST /rest/{user}/{code}/{method}.json` for crm.deal.get, crm.contact.get, crm.lead.get,
crm.deal.productrows.get, crm.status.list, crm.category.list, crm.deal.list, crm.contact.list,
crm.lead.list, crm.item.productrow.list, crm.product.list (filters `ID` (one or a list), `>ID`,
`>DATE_MODIFY`, `>=DATE_MODIFY`, `=ownerType`, `=ownerId`; 50 per page with `start`), batch (with
`result_next` / `result_total` for list sub-calls).
Errors as `{"error", "error_description"}`; "Not found" is a 400 with an empty code; past the
bucket (2/s, burst 50) a 503 QUERY_LIMIT_EXCEEDED. Inside `batch` a sub-call's error goes to
`result_error` and the batch still answers 200.

Faults: `fail_method(method, entity_id, code, description)` makes that method fail for that entity
(e.g. ACCESS_DENIED, OPERATION_TIME_LIMIT or INTERNAL_SERVER_ERROR on `crm.deal.get` of one deal), alone
or inside a batch, as a real portal answers; an entity whose `*.get` is denied is also left out of its
`*.list` answers, as Bitrix24 leaves out what the webhook's user may not see. `fault_503` answers a
share of all calls with 503 QUERY_LIMIT_EXCEEDED.

Control: `POST /_sandbox/deals`, `PATCH|DELETE /_sandbox/deals/{id}`, `POST /_sandbox/contacts`,
`PATCH /_sandbox/contacts/{id}`, `POST /_sandbox/leads`, `POST /_sandbox/handlers`, `GET /_sandbox/state`,
`POST /_sandbox/failures` (`{"method", "entity_id", "code", "description"}`).

Application mode (the Bitrix24 application, chalicelib/bitrix24_app.py): an OAuth server
(`GET|POST /oauth/token/`, grant_type=refresh_token with the sandbox's client id and secret: a new pair,
the old refresh token refused from then on; access tokens live an hour on the sandbox's app clock,
`advance()` / `expire_access_tokens()` move it), REST at `POST /rest/{method}.json` with `auth=<access
token>` (unknown → 401 invalid_token, expired → 401 expired_token), `event.bind` (online / offline),
`event.get`, `event.unbind`, `event.offline.get` (`clear`, `process_id`, `limit`: records reserved for a
process come back to it until cleared), `event.offline.clear` (`process_id` + `id` / `message_id`),
`app.info`. A change to a deal or contact queues an offline record when bound (one waiting record per
object and event) and nudges the ONOFFLINEEVENT handlers (once, never retried). `POST /_sandbox/app/install`
(`{"handler": "<our API>/install/bitrix24"}`) POSTs ONAPPINSTALL with a fresh token pair and
application_token; `POST /_sandbox/app/uninstall` POSTs ONAPPUNINSTALL to the bound handler;
`GET /_sandbox/app` shows the bindings and the queue.

    python -m sandbox.bitrix24 --port 8003
"""
from __future__ import annotations

import argparse
import random
import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

import requests

from .httpserver import Reply, Request, SandboxServer

MSK = timezone(timedelta(hours=3))
# The application's client credentials the sandbox's OAuth server accepts (the local stack passes them on).
APP_CLIENT_ID, APP_CLIENT_SECRET = "app.sandbox0000000001", "sandbox-client-secret"
LIST_PAGE = 50


# The HTTP status Bitrix24 answers each error code with ("Коды ошибок"); a method's own error is a 400.
_STATUS = {"NO_AUTH_FOUND": 401, "expired_token": 401, "insufficient_scope": 403, "INVALID_CREDENTIALS": 403,
           "ACCESS_DENIED": 403, "QUERY_LIMIT_EXCEEDED": 503, "OVERLOAD_LIMIT": 503, "OPERATION_TIME_LIMIT": 429,
           "INTERNAL_SERVER_ERROR": 500, "ERROR_UNEXPECTED_ANSWER": 500, "PORTAL_DELETED": 500}


def _error(status: int, code: str, description: str) -> Reply:
    return Reply(status, {"error": code, "error_description": description})


class MethodError(Exception):
    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status, self.code, self.description = status, code, description


# `crm.deal.fields` / `crm.contact.fields` (a few of each): standard fields carry their name in `title`; a
# user field's `title` is its code and its name is in `listLabel` / `formLabel`.
DEAL_FIELDS = {"ID": {"type": "integer", "isReadOnly": True, "title": "ID"},
               "TITLE": {"type": "string", "title": "Название"},
               "SOURCE_ID": {"type": "crm_status", "title": "Источник"},
               "UF_CRM_COST": {"type": "double", "title": "UF_CRM_COST", "listLabel": "Себестоимость",
                               "formLabel": "Себестоимость"},
               "UF_CRM_YM_CLIENT_ID": {"type": "string", "title": "UF_CRM_YM_CLIENT_ID", "listLabel": "ClientID Метрики"}}
CONTACT_FIELDS = {"NAME": {"type": "string", "title": "Имя"}, "POST": {"type": "string", "title": "Должность"},
                  "PHONE": {"type": "crm_multifield", "isMultiple": True, "title": "Телефон"}}


class Bitrix24Sandbox(SandboxServer):
    def __init__(self, port: int = 0, *, user: str = "1", code: str = "sandboxcode", domain: str = "acme-shop.bitrix24.ru",
                 member_id: str = "7f3c2a9be1d04c5a8e6b0d2f4a1c9e37", bucket_size: int = 50, drain_per_second: float = 2.0,
                 client_id: str = APP_CLIENT_ID, client_secret: str = APP_CLIENT_SECRET) -> None:
        super().__init__(port=port)
        self.user, self.code, self.domain, self.member_id = user, code, domain, member_id
        self.client_id, self.client_secret = client_id, client_secret
        self.bucket_size, self.drain_per_second = bucket_size, drain_per_second
        self._lock = threading.RLock()
        self.reset()
        self.route("POST", r"/rest/(?P<user>[^/]+)/(?P<code>[^/]+)/(?P<method>[\w.]+?)(\.json)?", self._rest)
        self.route("GET", r"/_sandbox/state", lambda r: Reply(200, self.state()))
        self.route("POST", r"/_sandbox/deals", lambda r: Reply(200, self.create_deal(**r.json())))
        self.route("PATCH", r"/_sandbox/deals/(?P<id>\d+)", lambda r: Reply(200, self.update_deal(r.match["id"], **r.json())))
        self.route("DELETE", r"/_sandbox/deals/(?P<id>\d+)", lambda r: Reply(200, {"deleted": self.delete_deal(r.match["id"])}))
        self.route("POST", r"/_sandbox/contacts", lambda r: Reply(200, self.create_contact(**r.json())))
        self.route("PATCH", r"/_sandbox/contacts/(?P<id>\d+)",
                   lambda r: Reply(200, self.update_contact(r.match["id"], **r.json())))
        self.route("POST", r"/_sandbox/leads", lambda r: Reply(200, self.create_lead(**r.json())))
        self.route("POST", r"/_sandbox/handlers", lambda r: Reply(200, self.add_handler(**r.json())))
        self.route("POST", r"/_sandbox/failures", lambda r: (self.fail_method(**r.json()), Reply(200, {"success": True}))[1])
        # Application mode (OAuth): the OAuth server, REST with `auth=<access token>`, install/uninstall.
        self.route("GET", r"/oauth/token", self._oauth_token)
        self.route("POST", r"/oauth/token", self._oauth_token)
        self.route("POST", r"/rest/(?P<method>[\w.]+?)(\.json)?", self._app_rest)
        self.route("POST", r"/_sandbox/app/install", lambda r: Reply(200, self.install(**r.json())))
        self.route("POST", r"/_sandbox/app/uninstall", lambda r: Reply(200, self.uninstall(**r.json())))
        self.route("POST", r"/_sandbox/app/expire", lambda r: Reply(200, self.expire_access_tokens()))
        self.route("GET", r"/_sandbox/app", lambda r: Reply(200, self.app_state()))

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/rest/{self.user}/{self.code}/"

    def reset(self, *, clock_lag: float = 0) -> None:
        """Empty the portal. `clock_lag`: seconds its DATE_MODIFY runs behind the real time (a portal
        whose clock or time zone is wrong: a UTC wall clock labelled +03:00 is three hours behind)."""
        with self._lock:
            self.clock_lag = timedelta(seconds=clock_lag)
            self.deals: dict[str, dict] = {}
            self.contacts: dict[str, dict] = {}
            self.leads: dict[str, dict] = {}
            self.product_rows: dict[str, list[dict]] = {}
            self.products: dict[str, dict] = {}  # the catalogue, filled by the deals' products
            self.statuses: list[dict] = []
            self.categories: dict[str, str] = {"0": "Общая"}
            self.handlers: list[dict] = []
            self.outbox: list[tuple[str, bytes]] = []
            self.deliveries: list[dict] = []
            self.calls: list[dict] = []  # REST calls: method, at
            self.limit_hits = 0
            self._bucket, self._bucket_at = 0.0, time.monotonic()
            self._next_id = 100
            self._clock = datetime.now(MSK).replace(microsecond=0) - self.clock_lag - timedelta(hours=1)
            self.fault_503 = 0.0
            self.failures: dict[tuple[str, str], MethodError] = {}  # (method, entity id) → the error it answers
            self._rng = random.Random(1)
            self.reset_app()

    def state(self) -> dict:
        with self._lock:
            return {"deals": self.deals, "contacts": self.contacts, "leads": self.leads, "handlers": len(self.handlers),
                    "deliveries": self.deliveries[-50:], "calls": len(self.calls), "limit_hits": self.limit_hits}

    def _tick(self) -> str:
        """DATE_MODIFY: the wall clock in the portal's zone, to the second (changes within one second
        share it, as in Bitrix24)."""
        self._clock = max(self._clock, (datetime.now(MSK) - self.clock_lag).replace(microsecond=0))
        return self._clock.isoformat()

    def _id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    # --- seeding and changes ---------------------------------------------------------------------------

    def add_funnel(self, category_id: int, name: str, stages: list[tuple[str, str, str | None]]) -> None:
        """Stages as (code, name, semantics None/'S'/'F'); other funnels get the `C{n}:` prefix."""
        prefix = "" if category_id == 0 else f"C{category_id}:"
        entity = "DEAL_STAGE" if category_id == 0 else f"DEAL_STAGE_{category_id}"
        with self._lock:
            self.categories[str(category_id)] = name
            for sort, (code, stage_name, semantics) in enumerate(stages, start=1):
                self.statuses.append({"ID": self._id(), "ENTITY_ID": entity, "STATUS_ID": prefix + code, "NAME": stage_name,
                                      "SORT": str(sort * 10), "CATEGORY_ID": str(category_id), "SEMANTICS": semantics,
                                      "EXTRA": {"SEMANTICS": {"S": "success", "F": "failure"}.get(semantics, "process")}})

    def _semantics(self, stage_id: str) -> str:
        status = next((s for s in self.statuses if s["STATUS_ID"] == stage_id), None)
        return (status or {}).get("SEMANTICS") or "P"

    def create_lead(self, title: str, fields: dict | None = None) -> dict:
        with self._lock:
            now = self._tick()
            lead = {"ID": self._id(), "TITLE": title, "STATUS_ID": "CONVERTED", "DATE_CREATE": now, "DATE_MODIFY": now,
                    **(fields or {})}
            self.leads[lead["ID"]] = lead
            return lead

    def create_contact(self, name: str, last_name: str = "", phones: list[str] = (), emails: list[str] = (),
                       fields: dict | None = None, notify: bool = True) -> dict:
        with self._lock:
            now = self._tick()
            contact = {"ID": self._id(), "NAME": name, "LAST_NAME": last_name, "DATE_CREATE": now, "DATE_MODIFY": now,
                       "HAS_PHONE": "Y" if phones else "N", "HAS_EMAIL": "Y" if emails else "N", **(fields or {})}
            if phones:  # multi-fields are omitted entirely when empty, as crm.contact.get does
                contact["PHONE"] = [{"ID": self._id(), "VALUE_TYPE": "MOBILE", "VALUE": p, "TYPE_ID": "PHONE"} for p in phones]
            if emails:
                contact["EMAIL"] = [{"ID": self._id(), "VALUE_TYPE": "WORK", "VALUE": e, "TYPE_ID": "EMAIL"} for e in emails]
            self.contacts[contact["ID"]] = contact
        if notify:
            self._fire("ONCRMCONTACTADD", contact["ID"])
        return contact

    def update_contact(self, contact_id: str, notify: bool = True, **changes: Any) -> dict:
        with self._lock:
            contact = self.contacts[str(contact_id)]
            contact.update(changes, DATE_MODIFY=self._tick())
        if notify:
            self._fire("ONCRMCONTACTUPDATE", contact["ID"])
        return contact

    def delete_contact(self, contact_id: str, notify: bool = True) -> str:
        """As Bitrix24 deletes a contact: `crm.contact.get` answers "Not found", and its deals stay with
        no contact (`CONTACT_ID` empty)."""
        with self._lock:
            self.contacts.pop(str(contact_id))
            for deal in self.deals.values():
                if str(deal.get("CONTACT_ID") or "") == str(contact_id):
                    deal["CONTACT_ID"] = None
        if notify:
            self._fire("ONCRMCONTACTDELETE", str(contact_id))
        return str(contact_id)

    def create_deal(self, title: str, stage_id: str = "NEW", category_id: int = 0, opportunity: str = "0.00",
                    currency: str = "RUB", contact_id: str | None = None, lead_id: str | None = None,
                    products: list[tuple[int, str, str, str]] = (), fields: dict | None = None,
                    notify: bool = True) -> dict:
        """`products`: (PRODUCT_ID, PRODUCT_NAME, PRICE, QUANTITY); PRODUCT_ID 0 for free text."""
        with self._lock:
            now = self._tick()
            deal = {"ID": self._id(), "TITLE": title, "STAGE_ID": stage_id, "CATEGORY_ID": str(category_id),
                    "OPPORTUNITY": opportunity, "CURRENCY_ID": currency, "CONTACT_ID": contact_id, "COMPANY_ID": None,
                    "LEAD_ID": lead_id, "DATE_CREATE": now, "DATE_MODIFY": now, "MOVED_TIME": now,
                    "ASSIGNED_BY_ID": "1", **(fields or {})}
            self._derive(deal)
            self.deals[deal["ID"]] = deal
            self.product_rows[deal["ID"]] = [
                {"ID": self._id(), "OWNER_ID": deal["ID"], "OWNER_TYPE": "D", "PRODUCT_ID": pid, "PRODUCT_NAME": name,
                 "PRICE": float(price), "QUANTITY": float(quantity)} for pid, name, price, quantity in products]
            for pid, name, price, _ in products:
                if str(pid) != "0":
                    self.products.setdefault(str(pid), {"ID": str(pid), "NAME": name, "PRICE": str(price)})
        if notify:
            self._fire("ONCRMDEALADD", deal["ID"])
        return deal

    def update_deal(self, deal_id: str, notify: bool = True, **changes: Any) -> dict:
        """Any field; `STAGE_ID` moves the deal (ONCRMDEALUPDATE, like every other change)."""
        with self._lock:
            deal = self.deals[str(deal_id)]
            now = self._tick()
            if "STAGE_ID" in changes and changes["STAGE_ID"] != deal["STAGE_ID"]:
                deal["MOVED_TIME"] = now
            deal.update(changes, DATE_MODIFY=now)
            self._derive(deal)
        if notify:
            self._fire("ONCRMDEALUPDATE", deal["ID"])
        return deal

    def delete_deal(self, deal_id: str, notify: bool = True) -> str:
        with self._lock:
            self.deals.pop(str(deal_id))
            self.product_rows.pop(str(deal_id), None)
        if notify:
            self._fire("ONCRMDEALDELETE", str(deal_id))
        return str(deal_id)

    def _derive(self, deal: dict) -> None:
        semantics = self._semantics(deal["STAGE_ID"])
        deal["STAGE_SEMANTIC_ID"] = semantics
        deal["CLOSED"] = "Y" if semantics in ("S", "F") else "N"

    # --- faults -------------------------------------------------------------------------------------------

    def fail_method(self, method: str, entity_id: str, code: str, description: str, status: int | None = None) -> None:
        """From now on `method` fails for `entity_id` with `{"error": code, "error_description": description}`
        (HTTP `status` when called alone; by default the status Bitrix24 uses for the code). Inside a batch
        the error lands in `result_error`, as on a real portal. For a method called without an `id` (a
        list), `entity_id` "" fails every call of it. `clear_failures()` (or `reset()`) undoes it."""
        with self._lock:
            self.failures[(method, str(entity_id))] = MethodError(status or _STATUS.get(code, 400), code, description)

    def clear_failures(self) -> None:
        with self._lock:
            self.failures.clear()

    def _denied(self, get_method: str, entity_id: str) -> bool:
        failure = self.failures.get((get_method, str(entity_id)))
        return failure is not None and (failure.code == "ACCESS_DENIED"
                                        or failure.description.lower().startswith("access denied"))

    # --- outbound events ------------------------------------------------------------------------------

    def add_handler(self, url: str, events: list[str], application_token: str) -> dict:
        handler = {"id": self._id(), "url": url, "events": [e.upper() for e in events], "application_token": application_token}
        with self._lock:
            self.handlers.append(handler)
        return {"id": handler["id"]}

    def event_body(self, event: str, entity_id: str, application_token: str, handler_id: str = "1") -> bytes:
        return urlencode({"event": event, "event_handler_id": handler_id, "data[FIELDS][ID]": entity_id,
                          "ts": str(int(time.time())), "auth[domain]": self.domain,
                          "auth[client_endpoint]": f"https://{self.domain}/rest/",
                          "auth[server_endpoint]": "https://oauth.bitrix24.tech/rest/",
                          "auth[member_id]": self.member_id, "auth[application_token]": application_token}).encode()

    def _fire(self, event: str, entity_id: str) -> None:
        with self._lock:
            self.outbox.append((event, entity_id))
            handlers = [h for h in self.handlers if event in h["events"]]
            queued = self._queue_offline(event, entity_id)
        if queued:
            self._nudge()
        for handler in handlers:  # sent once: Bitrix24 never retries
            body = self.event_body(event, entity_id, handler["application_token"], handler["id"])
            try:
                status = requests.post(handler["url"], data=body, timeout=5,
                                       headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code
            except requests.RequestException:
                status = 0
            with self._lock:
                self.deliveries.append({"event": event, "id": entity_id, "status": status})

    # --- application mode (OAuth 2.0, event.bind, offline events) ------------------------------------------
    # Bitrix24 "Full OAuth 2.0 Authorization Protocol", https://apidocs.bitrix24.com/settings/oauth/index.html;
    # "Get a List of Offline Events with event.offline.get",
    # https://apidocs.bitrix24.com/api-reference/events/event-offline-get.html; "event.offline.clear",
    # https://dev.1c-bitrix.ru/rest_help/general/events_method/event_offline_clear.php; "Event After Successful
    # Application Installation OnAppInstall", https://apidocs.bitrix24.com/api-reference/common/events/on-app-install.html.

    ACCESS_SECONDS = 3600  # an access token lives one hour

    def reset_app(self) -> None:
        with self._lock:
            self.app_clock = time.time  # tests replace it (or call `advance`) to expire tokens without sleeping
            self._app_offset = 0.0
            self.access_tokens: dict[str, float] = {}  # access token → expires at (app clock)
            self.refresh_tokens: set[str] = set()  # live refresh tokens: each is refused after one use
            self.application_token: str | None = None
            self.bindings: list[dict] = []  # {"event", "handler", "event_type"}
            self.offline: list[dict] = []  # the offline queue: ID, TIMESTAMP_X, EVENT_NAME, EVENT_DATA, MESSAGE_ID, PROCESS_ID
            self._offline_id = 0
            self.oauth_calls: list[dict] = []  # every /oauth/token/ request: grant_type, ok
            self.app_calls: list[str] = []  # REST methods called with an access token
            self.nudges: list[int] = []  # ONOFFLINEEVENT deliveries: HTTP status (0: unreachable)
            self.oauth_fault: int | None = None  # answer /oauth/token/ with this status (a 5xx) while set

    def now(self) -> float:
        return self.app_clock() + self._app_offset

    def advance(self, seconds: float) -> None:
        """The app clock moves on (access tokens expire an hour after issue)."""
        with self._lock:
            self._app_offset += seconds

    def expire_access_tokens(self) -> dict:
        with self._lock:
            for token in self.access_tokens:
                self.access_tokens[token] = 0.0
        return {"expired": len(self.access_tokens)}

    def app_state(self) -> dict:
        with self._lock:
            return {"installed": self.application_token is not None, "bindings": list(self.bindings),
                    "offline_queue": len(self.offline), "oauth_calls": len(self.oauth_calls), "nudges": list(self.nudges)}

    def _issue(self) -> dict:
        """A new token pair as the OAuth server answers it (fields per "Full OAuth 2.0 Authorization Protocol")."""
        access, refresh = uuid.uuid4().hex + uuid.uuid4().hex[:8], uuid.uuid4().hex + uuid.uuid4().hex[:8]
        now = self.now()
        self.access_tokens[access] = now + self.ACCESS_SECONDS
        self.refresh_tokens.add(refresh)
        return {"access_token": access, "expires": int(now + self.ACCESS_SECONDS), "expires_in": self.ACCESS_SECONDS,
                "scope": "crm", "domain": "oauth.bitrix.info", "server_endpoint": f"{self.url}/rest/",
                "status": "L", "client_endpoint": f"{self.url}/rest/", "member_id": self.member_id, "user_id": 1,
                "refresh_token": refresh}

    def _oauth_token(self, request: Request) -> Reply:
        params = dict(request.query)
        if request.body:
            params.update(dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True)))
        with self._lock:
            if self.oauth_fault:
                self.oauth_calls.append({"grant_type": params.get("grant_type"), "ok": False})
                return _error(self.oauth_fault, "internal_error", "OAuth server unavailable (injected)")
            ok = (params.get("client_id"), params.get("client_secret")) == (self.client_id, self.client_secret)
            if not ok:
                self.oauth_calls.append({"grant_type": params.get("grant_type"), "ok": False})
                return Reply(401, {"error": "invalid_client", "error_description": "Invalid client credentials"})
            if params.get("grant_type") != "refresh_token" or params.get("refresh_token") not in self.refresh_tokens:
                self.oauth_calls.append({"grant_type": params.get("grant_type"), "ok": False})
                return Reply(400, {"error": "invalid_grant", "error_description": "Invalid refresh token"})
            self.refresh_tokens.discard(params["refresh_token"])  # single use: a second use is refused
            self.oauth_calls.append({"grant_type": "refresh_token", "ok": True})
            return Reply(200, self._issue())

    def install_body(self, version: int = 1, application_token: str | None = None, keep_bindings: bool = False,
                     **auth_overrides: str) -> bytes:
        """Install the application: a fresh token pair and `application_token`, and the ONAPPINSTALL form
        that carries them in `auth` (a server-side app without UI receives its tokens this way). Earlier
        bindings are dropped, as Bitrix24 does when an app is updated, unless `keep_bindings` (a repeated
        install of one version). `auth_overrides` forge fields (tests of a forged install)."""
        with self._lock:
            pair = self._issue()
            self.application_token = application_token or self.application_token or uuid.uuid4().hex
            if not keep_bindings:
                self.bindings = []
        body = {"event": "ONAPPINSTALL", "data[VERSION]": str(version), "data[ACTIVE]": "Y", "data[INSTALLED]": "Y",
                "data[LANGUAGE_ID]": "ru", "ts": str(int(time.time())),
                **{f"auth[{k}]": str(v) for k, v in pair.items()},
                "auth[domain]": self.domain, "auth[application_token]": self.application_token,
                **{f"auth[{k}]": v for k, v in auth_overrides.items()}}
        return urlencode(body).encode()

    def install(self, handler: str, version: int = 1, application_token: str | None = None) -> dict:
        """`install_body` POSTed to the application's install handler (`make run`: the local stack)."""
        response = requests.post(handler, data=self.install_body(version, application_token), timeout=10,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            answer = response.json()
        except ValueError:
            answer = response.text[:300]
        return {"status": response.status_code, "answer": answer}

    def app_event_body(self, event: str, application_token: str | None = None) -> bytes:
        """ONAPPUNINSTALL / ONOFFLINEEVENT as the portal sends them; `application_token` forges another."""
        token = self.application_token if application_token is None else application_token
        return urlencode({"event": event, "data[CLEAN]": "0", "data[LANGUAGE_ID]": "ru", "ts": str(int(time.time())),
                          "auth[domain]": self.domain, "auth[member_id]": self.member_id,
                          "auth[application_token]": token or ""}).encode()

    def uninstall(self, handler: str | None = None) -> dict:
        """ONAPPUNINSTALL to the bound handler (or `handler`), with `application_token` its only proof;
        the app's tokens, bindings and queue are gone afterwards."""
        with self._lock:
            body = self.app_event_body("ONAPPUNINSTALL")
            targets = [b["handler"] for b in self.bindings if b["event"] == "ONAPPUNINSTALL"] or ([handler] if handler else [])
            self.application_token = None
            self.bindings, self.offline = [], []
            self.access_tokens.clear()
            self.refresh_tokens.clear()
        statuses = []
        for url in targets:
            try:
                statuses.append(requests.post(url, data=body, timeout=10,
                                              headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code)
            except requests.RequestException:
                statuses.append(0)
        return {"statuses": statuses}

    def _app_rest(self, request: Request) -> Reply:
        try:
            params = request.json() or {}
        except ValueError:
            return _error(400, "INVALID_REQUEST", "malformed JSON")
        token = params.pop("auth", None) or request.query.get("auth")
        with self._lock:
            expires = self.access_tokens.get(token) if isinstance(token, str) else None
            if expires is None:
                return _error(401, "invalid_token", "The access token provided is invalid.")
            if expires <= self.now():
                return _error(401, "expired_token", "The access token provided has expired.")
            method = request.match["method"]
            self.app_calls.append(method)
            failure = self.failures.get((method, str(params.get("id") or params.get("ID") or "")))
            if failure is not None and (method.startswith("event.") or method == "app.info"):
                return _error(failure.status, failure.code, failure.description)
            try:
                if method.startswith("event.") or method == "app.info":
                    return Reply(200, {"result": self._event_method(method, params)})
                return Reply(200, self._method(method, params))
            except MethodError as exc:
                return _error(exc.status, exc.code, exc.description)

    def _event_method(self, method: str, params: dict) -> Any:
        if method == "app.info":
            return {"ID": 7, "CODE": self.client_id, "VERSION": 1, "STATUS": "L", "INSTALLED": True,
                    "member_id": self.member_id}
        if method == "event.bind":
            event, handler = str(params.get("event") or "").upper(), params.get("handler")
            event_type = str(params.get("event_type") or "online").lower()
            if not event or event_type not in ("online", "offline") or (event_type == "online" and not handler):
                raise MethodError(400, "ERROR_ARGUMENT", "event and, for an online event, handler are required")
            binding = {"event": event, "handler": handler if event_type == "online" else "", "event_type": event_type}
            if binding in self.bindings:
                raise MethodError(400, "ERROR_EVENT_HANDLER_ALREADY_EXISTS", "Handler already binded")
            self.bindings.append(binding)
            return True
        if method == "event.get":
            return [{"event": b["event"], "handler": b["handler"], "auth_type": "0", "offline": int(b["event_type"] == "offline")}
                    for b in self.bindings]
        if method == "event.unbind":
            event, handler = str(params.get("event") or "").upper(), params.get("handler") or ""
            event_type = str(params.get("event_type") or "online").lower()
            before = len(self.bindings)
            self.bindings = [b for b in self.bindings if not (b["event"] == event and b["event_type"] == event_type
                                                              and (event_type == "offline" or b["handler"] == handler))]
            return {"count": before - len(self.bindings)}
        if method == "event.offline.get":
            return self._offline_get(params)
        if method == "event.offline.clear":
            process_id = str(params.get("process_id") or "")
            if not process_id:
                raise MethodError(400, "ERROR_ARGUMENT", "process_id is required")
            ids = {str(i) for i in (params.get("id") or [])}
            messages = {str(m) for m in (params.get("message_id") or [])}
            self.offline = [r for r in self.offline if not (r["PROCESS_ID"] == process_id and (
                (not ids and not messages) or (r["ID"] in ids if ids else r["MESSAGE_ID"] in messages)))]
            return True
        raise MethodError(400, "ERROR_METHOD_NOT_FOUND", f"Method not found: {method}")

    def _offline_get(self, params: dict) -> dict:
        """Reserve up to `limit` unreserved records for `process_id` (a new one when absent) and answer every
        record held by it; `clear` (default 1) deletes what is answered."""
        limit = max(1, min(int(params.get("limit") or 50), 1000))
        clear = str(params.get("clear", "1")) not in ("0", "false", "")
        process_id = str(params.get("process_id") or uuid.uuid4().hex)
        held = [r for r in self.offline if r["PROCESS_ID"] == process_id]
        for record in self.offline:
            if len(held) >= limit:
                break
            if not record["PROCESS_ID"]:
                record["PROCESS_ID"] = process_id
                held.append(record)
        held = held[:limit]
        if clear:
            gone = {id(r) for r in held}
            self.offline = [r for r in self.offline if id(r) not in gone]
        return {"process_id": process_id,
                "events": [{k: v for k, v in r.items() if k != "PROCESS_ID"} for r in held]}

    def _queue_offline(self, event: str, entity_id: str) -> bool:
        """Record an offline event when the app bound it. One record per object and event: a repeat updates
        the waiting record's time (the queue keeps the latest state per object); a record already reserved
        by a process is left alone and a new one is queued (the reserved one may be cleared any moment)."""
        if not any(b["event"] == event and b["event_type"] == "offline" for b in self.bindings):
            return False
        stamp = datetime.fromtimestamp(self.now(), MSK).replace(microsecond=0).isoformat()
        for record in self.offline:
            if record["EVENT_NAME"] == event and record["EVENT_DATA"]["FIELDS"]["ID"] == entity_id and not record["PROCESS_ID"]:
                record["TIMESTAMP_X"] = stamp
                return True
        self._offline_id += 1
        self.offline.append({"ID": str(self._offline_id), "TIMESTAMP_X": stamp, "EVENT_NAME": event,
                             "EVENT_DATA": {"FIELDS": {"ID": entity_id}}, "EVENT_ADDITIONAL": {"user_id": "1"},
                             "MESSAGE_ID": uuid.uuid4().hex, "PROCESS_ID": ""})
        return True

    def _nudge(self) -> None:
        """ONOFFLINEEVENT to the online handlers bound for it: only "the queue is not empty", sent once."""
        with self._lock:
            targets = [b["handler"] for b in self.bindings if b["event"] == "ONOFFLINEEVENT" and b["event_type"] == "online"]
            token = self.application_token or ""
        body = self.app_event_body("ONOFFLINEEVENT", token)
        for url in targets:
            try:
                status = requests.post(url, data=body, timeout=5,
                                       headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code
            except requests.RequestException:
                status = 0
            with self._lock:
                self.nudges.append(status)

    # --- REST ---------------------------------------------------------------------------------------------

    def _rest(self, request: Request) -> Reply:
        if (request.match["user"], request.match["code"]) != (self.user, self.code):
            return _error(401, "NO_AUTH_FOUND", "Wrong authorization data")
        with self._lock:
            now = time.monotonic()
            self._bucket = max(0.0, self._bucket - (now - self._bucket_at) * self.drain_per_second)
            self._bucket_at = now
            if self._bucket + 1 > self.bucket_size:
                self.limit_hits += 1
                return _error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            self._bucket += 1
            method = request.match["method"]
            self.calls.append({"method": method, "at": now})
            if self._rng.random() < self.fault_503:
                return _error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests (injected)")
            try:
                params = request.json() or {}
            except ValueError:
                return _error(400, "INVALID_REQUEST", "malformed JSON")
            try:
                return Reply(200, self._method(method, params))
            except MethodError as exc:
                return _error(exc.status, exc.code, exc.description)

    def _method(self, method: str, params: dict) -> dict:
        if method == "batch":
            return {"result": self._batch(params)}
        failure = self.failures.get((method, str(params.get("id") or params.get("ID") or "")))
        if failure is not None:
            raise MethodError(failure.status, failure.code, failure.description)
        handlers = {"crm.deal.get": lambda p: self._get(self.deals, p), "crm.contact.get": lambda p: self._get(self.contacts, p),
                    "crm.lead.get": lambda p: self._get(self.leads, p),
                    "crm.deal.productrows.get": lambda p: self._rows(p),
                    "crm.category.list": lambda p: {"categories": [{"id": int(k), "name": v} for k, v in self.categories.items()]},
                    "crm.deal.fields": lambda p: dict(DEAL_FIELDS), "crm.contact.fields": lambda p: dict(CONTACT_FIELDS)}
        if method in handlers:
            return {"result": handlers[method](params)}
        if method == "crm.status.list":
            entity = (params.get("filter") or {}).get("ENTITY_ID")
            return self._page([s for s in self.statuses if entity in (None, s["ENTITY_ID"])], params)
        lists = {"crm.deal.list": self.deals, "crm.contact.list": self.contacts, "crm.lead.list": self.leads,
                 "crm.product.list": self.products}
        if method in lists:
            items = _filtered(sorted(lists[method].values(), key=lambda d: int(d["ID"])), params.get("filter") or {})
            get_method = method.removesuffix(".list") + ".get"
            items = [i for i in items if not self._denied(get_method, i["ID"])]
            select = params.get("select")
            if isinstance(select, dict):
                select = list(select.values())
            if select and "*" not in select:
                items = [{k: v for k, v in d.items() if k in select or k == "ID"} for d in items]
            return self._page(items, params)
        if method == "crm.item.productrow.list":
            where = params.get("filter") or {}
            owners = where.get("=ownerId")
            owners = {str(o) for o in (owners.values() if isinstance(owners, dict) else owners if isinstance(owners, list) else [owners])}
            if where.get("=ownerType") != "D" or not owners:
                raise MethodError(400, "", "filter =ownerType and =ownerId are required")
            rows = [{"id": int(r["ID"]), "ownerId": int(r["OWNER_ID"]), "ownerType": "D", "productId": int(r["PRODUCT_ID"]),
                     "productName": r["PRODUCT_NAME"], "price": r["PRICE"], "quantity": r["QUANTITY"]}
                    for owner in sorted(owners, key=int) for r in self.product_rows.get(owner, [])]
            page = self._page(rows, params)
            return {**page, "result": {"productRows": page["result"]}}
        raise MethodError(400, "ERROR_METHOD_NOT_FOUND", f"Method not found: {method}")

    @staticmethod
    def _page(items: list, params: dict) -> dict:
        start = int(params.get("start") or 0)
        page = {"result": items[start:start + LIST_PAGE], "total": len(items)}
        if start + LIST_PAGE < len(items):
            page["next"] = start + LIST_PAGE
        return page

    @staticmethod
    def _get(store: dict, params: dict) -> dict:
        entity_id = str(params.get("id") or params.get("ID") or "")
        if entity_id not in store:
            raise MethodError(400, "", "Not found")
        return store[entity_id]

    def _rows(self, params: dict) -> list:
        deal_id = str(params.get("id") or "")
        if deal_id not in self.deals:
            raise MethodError(400, "", "Not found")
        return self.product_rows.get(deal_id, [])

    def _batch(self, params: dict) -> dict:
        commands = params.get("cmd") or {}
        if len(commands) > 50:
            raise MethodError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        results, errors, totals, following = {}, {}, {}, {}
        for key, command in commands.items():
            method, _, query = command.partition("?")
            pairs = [(name, re.sub(r"\$result\[(\w+)\]\[(\w+)\]",
                                   lambda m: str((results.get(m[1]) or {}).get(m[2]) or ""), value))
                     for name, value in parse_qsl(query, keep_blank_values=True)]
            if method == "batch":
                errors[key] = {"error": "ERROR_BATCH_METHOD_NOT_ALLOWED", "error_description": "batch in batch"}
                continue
            try:
                answer = self._method(method, _nested(pairs))
            except MethodError as exc:
                errors[key] = {"error": exc.code, "error_description": exc.description}
                if str(params.get("halt")) == "1":
                    break
                continue
            results[key] = answer["result"]
            if "total" in answer:
                totals[key] = answer["total"]
            if "next" in answer:
                following[key] = answer["next"]
        return {"result": results, "result_error": errors or [], "result_total": totals or [],
                "result_next": following or [], "result_time": {}}


def _nested(pairs: list[tuple[str, str]]) -> dict:
    """`filter[>ID]=5&select[0]=*` → {"filter": {">ID": "5"}, "select": ["*"]} (PHP's query parsing)."""
    out: dict = {}
    for name, value in pairs:
        head, *keys = re.findall(r"^[^\[]+|(?<=\[)[^\]]*(?=\])", name)
        node = out
        path = [head, *keys]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def lists(node):
        if isinstance(node, dict):
            node = {k: lists(v) for k, v in node.items()}
            if node and all(k.isdigit() for k in node):
                return [node[k] for k in sorted(node, key=int)]
        return node
    return lists(out)


def _filtered(items: list[dict], where: dict) -> list[dict]:
    for key, value in where.items():
        if key == "ID":
            wanted = {str(v) for v in value} if isinstance(value, list) else {str(value)}
            items = [i for i in items if str(i["ID"]) in wanted]
        elif key == ">ID":
            items = [i for i in items if int(i["ID"]) > int(value)]
        elif key in (">DATE_MODIFY", ">=DATE_MODIFY"):
            bound = datetime.fromisoformat(str(value))
            strict = key.startswith(">D")
            items = [i for i in items if (datetime.fromisoformat(i["DATE_MODIFY"]) > bound if strict
                                          else datetime.fromisoformat(i["DATE_MODIFY"]) >= bound)]
        else:
            raise MethodError(400, "", f"filter {key!r} is not supported by the sandbox")
    return items


def seed_demo(sandbox: Bitrix24Sandbox) -> dict:
    sandbox.add_funnel(0, "Общая", [("NEW", "Новая", None), ("PREPARATION", "Подготовка", None), ("WON", "Сделка успешна", "S"),
                                    ("LOSE", "Сделка провалена", "F"), ("APOLOGY", "Анализ причины провала", "F")])
    sandbox.add_funnel(2, "Опт", [("NEW", "Новая", None), ("WON", "Оплачено", "S"), ("LOSE", "Отказ", "F")])
    lead = sandbox.create_lead("Заявка с сайта", fields={"UF_CRM_YM_CLIENT_ID": "1714140095123456789"})
    contact = sandbox.create_contact("Анна", "Петрова", phones=["+7 916 555-01-02"], emails=["Anna@Example.com"], notify=False)
    deal = sandbox.create_deal("Заказ #1042", stage_id="C2:NEW", category_id=2, opportunity="15990.00",
                               contact_id=contact["ID"], lead_id=lead["ID"],
                               products=[(17, "Чайник синий", "7995.00", "2")], notify=False)
    return {"deal_id": deal["ID"], "contact_id": contact["ID"], "lead_id": lead["ID"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--code", default="democode")
    args = parser.parse_args()
    sandbox = Bitrix24Sandbox(args.port, code=args.code)
    seeded = seed_demo(sandbox)
    print(f"Bitrix24 sandbox on http://127.0.0.1:{args.port} (incoming webhook /rest/1/{args.code}/; demo {seeded})", flush=True)
    sandbox.serve_forever()


if __name__ == "__main__":
    main()
