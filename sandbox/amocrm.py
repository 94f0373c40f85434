"""amoCRM stand-in on loopback: one account with the API v4 subset we call, its limits, and real-shaped
webhooks fired at registered destinations (vendor documentation:
https://www.amocrm.ru/developers/content/crm_platform/leads-api "API сделок",
https://www.amocrm.ru/developers/content/crm_platform/contacts-api "API контактов",
https://www.amocrm.ru/developers/content/api/recommendations "Ограничения",
https://www.amocrm.ru/developers/content/crm_platform/webhooks-format for the webhooks' form format,
https://www.amocrm.ru/developers/content/crm_platform/account-info "Параметры аккаунта" and Kommo's
"Account parameters", https://developers.kommo.com/reference/account-parameters, for the account).

API (Bearer token): `GET /api/v4/account` (the account model: `country`, `currency`, `currency_symbol` …;
`with=amojo_id,version`), `GET /api/v4/leads` (`filter[id][]`, `filter[updated_at][from]`, `with`, `page`,
`limit` ≤ 250), `/api/v4/leads/{id}`, `/api/v4/contacts` (`filter[id][]`), `/api/v4/contacts/{id}`,
`/api/v4/catalogs/{id}/elements` (`filter[id][]`), `/api/v4/leads/pipelines`, `/api/v4/{leads|contacts}/custom_fields`, `GET/POST /api/v4/webhooks`.
204 for nothing found, 401 problem+json for a bad token, 429 past 7 requests in any second.

Changes through the control endpoints fire webhooks in amoCRM's v2 form format at every
registered destination, as amoCRM does: `POST /_sandbox/leads`, `PATCH|DELETE /_sandbox/leads/{id}`,
`POST /_sandbox/contacts`, `PATCH /_sandbox/contacts/{id}`, `GET /_sandbox/state`, `PATCH /_sandbox/account`
(`{"country": "BY", "currency": "USD"}`: the account's settings, as an administrator changes them),
`POST /_sandbox/faults` (`error_5xx`, `error_429`: shares of API calls answered so, all or only those whose
path contains `paths`; `maintenance`: every
API call answered 200 with an HTML maintenance page instead of JSON, as amoCRM does during works;
`account_answer`: `GET /api/v4/account` answered 200 with this JSON instead of the account).

OAuth 2.0 as an external integration sees it ("Авторизация OAuth 2.0. Пример по шагам",
https://www.amocrm.ru/developers/content/oauth/step-by-step): `POST /_sandbox/integration`
(`client_id`, `client_secret`, `redirect_uri`, `disable_url`: our app as registered in amoMarket);
`GET /oauth?client_id&state` stands for the user's consent: it redirects to the registered redirect URI
with `code`, `state`, `referer` (this sandbox's host:port, as amoCRM sends the account's host) and
`client_id`. `POST /oauth2/access_token` takes `authorization_code` (a code lives 20 minutes, once) and
`refresh_token` (single use: the second use is 401 "Token has been revoked"); access tokens live 24 h,
refresh tokens 3 months, by the sandbox's clock (`POST /_sandbox/clock {"advance": s}`). API calls take
an OAuth access token like the long-lived one; an expired or revoked one is 401. `DELETE /api/v4/webhooks`
(`{"destination"}`) unregisters. `POST /_sandbox/uninstall` revokes the integration's tokens and calls its
disable hook (`GET disable_url?account_id&client_uuid&signature`, signature = HMAC-SHA256 of
"client_uuid|account_id" keyed by the client secret).

    python -m sandbox.amocrm --port 8002 --token demo-token   (seeded with a demo account)
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import random
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests

from .httpserver import Reply, Request, SandboxServer

RATE_LIMIT = 7  # requests per second per integration ("Ограничения")
WON, LOST = 142, 143
CURRENCY_SYMBOLS = {"RUB": "₽", "USD": "$", "EUR": "€", "BYN": "Br", "KZT": "₸", "UAH": "₴"}


def _problem(status: int, title: str, detail: str) -> Reply:
    return Reply(status, {"title": title, "type": "https://httpstatus.es/%d" % status, "status": status,
                          "detail": detail}, {"Content-Type": "application/problem+json"})


MAINTENANCE_PAGE = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>amoCRM</title></head><body>"
                    "<h1>Ведутся технические работы</h1><p>Мы скоро вернёмся.</p></body></html>")


@dataclass
class Faults:
    error_5xx: float = 0.0
    error_429: float = 0.0
    maintenance: bool = False  # every API call: 200 with MAINTENANCE_PAGE (HTML, not JSON)
    seed: int | None = None
    paths: str | None = None  # error_5xx / error_429 only for paths containing this (e.g. "/api/v4/account")
    # `GET /api/v4/account` answers 200 with this JSON instead of the account (a garbled answer: `[]`,
    # `{}`, `"ok"`, an object without the account's `id`); None: the account as set.
    account_answer: Any = None


class AmoCrmSandbox(SandboxServer):
    def __init__(self, port: int = 0, *, token: str = "sandbox-token", account_id: int = 32427762,
                 subdomain: str = "example", rate_limit: int = RATE_LIMIT, country: str = "RU",
                 currency: str = "RUB") -> None:
        super().__init__(port=port)
        self.token, self.account_id, self.subdomain, self.rate_limit = token, account_id, subdomain, rate_limit
        self.country, self.currency = country, currency  # the account's settings; `set_account` changes them
        self._lock = threading.RLock()
        self.reset()
        api = r"/api/v4"
        for method, pattern, handler in [
            ("GET", api + r"/account", self._account),
            ("GET", api + r"/leads/pipelines", self._pipelines),
            ("GET", api + r"/(?P<entity>leads|contacts)/custom_fields", self._custom_fields),
            ("GET", api + r"/leads", self._leads),
            ("GET", api + r"/leads/(?P<id>\d+)", self._lead),
            ("GET", api + r"/contacts", self._contacts),
            ("GET", api + r"/contacts/(?P<id>\d+)", self._contact),
            ("GET", api + r"/catalogs/(?P<catalog>\d+)/elements", self._elements),
            ("GET", api + r"/catalogs", self._catalogs),
            ("GET", api + r"/webhooks", self._list_webhooks),
            ("POST", api + r"/webhooks", self._add_webhook),
            ("DELETE", api + r"/webhooks", self._delete_webhook),
        ]:
            self.route(method, pattern, self._guarded(handler))
        self.route("GET", r"/_sandbox/state", lambda r: Reply(200, self.state()))
        self.route("POST", r"/_sandbox/leads", lambda r: Reply(200, self.create_lead(**r.json())))
        self.route("PATCH", r"/_sandbox/leads/(?P<id>\d+)",
                   lambda r: Reply(200, self.update_lead(int(r.match["id"]), **r.json())))
        self.route("DELETE", r"/_sandbox/leads/(?P<id>\d+)",
                   lambda r: Reply(200, {"deleted": self.delete_lead(int(r.match["id"]))}))
        self.route("POST", r"/_sandbox/contacts", lambda r: Reply(200, self.create_contact(**r.json())))
        self.route("PATCH", r"/_sandbox/contacts/(?P<id>\d+)",
                   lambda r: Reply(200, self.update_contact(int(r.match["id"]), **r.json())))
        self.route("POST", r"/_sandbox/faults", lambda r: (self.set_faults(**r.json()), Reply(200, {"success": True}))[1])
        self.route("PATCH", r"/_sandbox/account", lambda r: Reply(200, self.set_account(**r.json())))
        self.route("POST", r"/_sandbox/integration", lambda r: Reply(200, self.register_integration(**r.json())))
        self.route("POST", r"/_sandbox/clock", lambda r: Reply(200, {"now": self.advance((r.json() or {})["advance"])}))
        self.route("POST", r"/_sandbox/uninstall", lambda r: Reply(200, self.uninstall()))
        self.route("GET", r"/oauth", self._authorize)
        self.route("POST", r"/oauth2/access_token", self._access_token)
        self.integration: dict | None = None  # our app as registered: client_id, client_secret, redirect_uri, disable_url
        self.clock_offset = 0.0
        self.codes: dict[str, float] = {}  # authorization code → expires at
        self.access_tokens: dict[str, float] = {}  # OAuth access token → expires at (revoked: removed)
        self.refresh_tokens: dict[str, float] = {}  # live refresh token → expires at
        self.token_calls: list[str] = []  # grant_type of every /oauth2/access_token call, refused ones too
        self.disable_calls: list[int] = []  # status our disable hook answered

    def start(self) -> "AmoCrmSandbox":
        """Serve as every sandbox does, except that with `faults.maintenance` each API call is answered
        200 with an HTML page: the shared server writes every body as JSON, so this one answer is
        written here, by the request handler itself."""
        super().start()
        sandbox, handler = self, self._httpd.RequestHandlerClass

        class _MaintenanceAware(handler):
            def _answer(self) -> None:
                if not (sandbox.faults.maintenance and urlsplit(self.path).path.startswith("/api/")):
                    return handler._handle(self)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with sandbox._lock:
                    sandbox.requests.append({"path": urlsplit(self.path).path, "at": time.monotonic(),
                                             "maintenance": True})
                payload = MAINTENANCE_PAGE.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

        self._httpd.RequestHandlerClass = _MaintenanceAware
        return self

    # --- state ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.pipelines: list[dict] = []
            # The account's fields ("Поля и группы полей", GET /api/v4/{entity}/custom_fields): the ones
            # the sandbox fills, and one of each kind a marketer maps to a Metrika attribute.
            self.custom_fields: dict[str, list[dict]] = {
                "leads": [{"id": 752013, "name": "_ym_uid", "code": "_YM_UID", "type": "tracking_data"},
                          {"id": 752015, "name": "Способ оплаты", "code": None, "type": "select"},
                          {"id": 752017, "name": "utm_source", "code": "UTM_SOURCE", "type": "tracking_data"}],
                "contacts": [{"id": 735649, "name": "Телефон", "code": "PHONE", "type": "multitext"},
                             {"id": 735651, "name": "Email", "code": "EMAIL", "type": "multitext"},
                             {"id": 735653, "name": "Должность", "code": "POSITION", "type": "text"}]}
            self.leads: dict[int, dict] = {}
            self.contacts: dict[int, dict] = {}
            self.catalogs: dict[int, dict[int, dict]] = {}
            self.webhooks: list[dict] = []
            self.deliveries: list[dict] = []
            self.outbox: list[tuple[str, bytes]] = []
            self.requests: list[dict] = []
            self.rate_violations = 0
            self._recent: deque[float] = deque()
            self._next_id = 1000
            self._clock = int(time.time()) - 4 * 3600
            self.faults = Faults()
            self._rng = random.Random()

    def set_account(self, *, country: str | None = None, currency: str | None = None) -> dict:
        """Change the account's country or currency (amoCRM: account settings, by an administrator). Not
        reset by `reset()`: the account outlives its data."""
        with self._lock:
            if country is not None:
                self.country = country
            if currency is not None:
                self.currency = currency
            return {"country": self.country, "currency": self.currency}

    def set_faults(self, **kwargs: Any) -> None:
        self.faults = Faults(**kwargs)
        self._rng = random.Random(self.faults.seed)

    def state(self) -> dict:
        with self._lock:
            return {"leads": self.leads, "contacts": self.contacts, "webhooks": self.webhooks,
                    "deliveries": self.deliveries[-50:], "requests": len(self.requests),
                    "rate_violations": self.rate_violations, "max_per_second": self.max_per_second()}

    def max_per_second(self) -> int:
        """The most API requests seen in any one-second window."""
        times = sorted(r["at"] for r in self.requests)
        best, start = 0, 0
        for end, at in enumerate(times):
            while at - times[start] >= 1.0:
                start += 1
            best = max(best, end - start + 1)
        return best

    def _tick(self) -> int:
        """Entity clock: one second per change, starting four hours ago, so every change is newer than the
        last and none is in the future (Metrika refuses future times), even after seeding thousands."""
        self._clock += 1
        return self._clock

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # --- seeding and changes (fire webhooks like amoCRM) -------------------------------------------

    def add_pipeline(self, pipeline_id: int, name: str, statuses: list[tuple[int, str]], is_main: bool = False) -> dict:
        """Statuses as (id, name); the incoming-leads status (type 1), 142 and 143 are added as in amoCRM."""
        rows = [{"id": pipeline_id * 10, "name": "Неразобранное", "sort": 10, "is_editable": False, "type": 1}]
        rows += [{"id": sid, "name": sname, "sort": 20 + i * 10, "is_editable": True, "type": 0}
                 for i, (sid, sname) in enumerate(statuses)]
        rows += [{"id": WON, "name": "Успешно реализовано", "sort": 10000, "is_editable": False, "type": 0},
                 {"id": LOST, "name": "Закрыто и не реализовано", "sort": 11000, "is_editable": False, "type": 0}]
        pipeline = {"id": pipeline_id, "name": name, "sort": len(self.pipelines) + 1, "is_main": is_main,
                    "is_unsorted_on": True, "is_archive": False, "account_id": self.account_id,
                    "_embedded": {"statuses": [{**s, "pipeline_id": pipeline_id, "color": "#99ccff"} for s in rows]}}
        with self._lock:
            self.pipelines.append(pipeline)
        return pipeline

    def add_catalog_element(self, catalog_id: int, name: str, price: int) -> dict:
        with self._lock:
            element_id = self._new_id()
            element = {"id": element_id, "name": name, "catalog_id": catalog_id, "custom_fields_values": [
                {"field_id": 5001, "field_name": "Цена", "field_code": "PRICE", "field_type": "price",
                 "values": [{"value": price}]}]}
            self.catalogs.setdefault(catalog_id, {})[element_id] = element
            return element

    def create_contact(self, name: str, phones: list[str] = (), emails: list[str] = (),
                       custom_fields: list[dict] | None = None, notify: bool = True) -> dict:
        with self._lock:
            now = self._tick()
            values = []
            if phones:
                values.append({"field_id": 735649, "field_name": "Телефон", "field_code": "PHONE", "field_type": "multitext",
                               "values": [{"value": p, "enum_id": 718321, "enum_code": "MOB"} for p in phones]})
            if emails:
                values.append({"field_id": 735651, "field_name": "Email", "field_code": "EMAIL", "field_type": "multitext",
                               "values": [{"value": e, "enum_id": 718333, "enum_code": "WORK"} for e in emails]})
            contact = {"id": self._new_id(), "name": name, "first_name": name.split(" ")[0], "last_name": "",
                       "created_at": now, "updated_at": now, "is_deleted": False, "account_id": self.account_id,
                       "custom_fields_values": (values + (custom_fields or [])) or None, "_embedded": {"tags": []}}
            self.contacts[contact["id"]] = contact
        if notify:
            self._fire("contacts", "add", self._contact_form(contact))
        return contact

    def update_contact(self, contact_id: int, notify: bool = True, **changes: Any) -> dict:
        with self._lock:
            contact = self.contacts[contact_id]
            contact.update(changes)
            contact["updated_at"] = self._tick()
        if notify:
            self._fire("contacts", "update", self._contact_form(contact))
        return contact

    def create_lead(self, name: str, pipeline_id: int, status_id: int, price: int | None = None,
                    contacts: list[int] = (), products: list[tuple[int, int]] = (), client_id: str | None = None,
                    custom_fields: list[dict] | None = None, notify: bool = True) -> dict:
        """`contacts`: ids, the first is main. `products`: (element id, quantity)."""
        with self._lock:
            now = self._tick()
            values = list(custom_fields or [])
            if client_id is not None:
                values.append({"field_id": 752013, "field_name": "_ym_uid", "field_code": "_YM_UID",
                               "field_type": "tracking_data", "values": [{"value": client_id}]})
            lead = {"id": self._new_id(), "name": name, "price": price or 0, "status_id": status_id,
                    "pipeline_id": pipeline_id, "created_at": now, "updated_at": now, "closed_at": None,
                    "is_deleted": False, "custom_fields_values": values or None, "account_id": self.account_id,
                    "_embedded": {"tags": [], "contacts": [{"id": c, "is_main": i == 0} for i, c in enumerate(contacts)],
                                  "catalog_elements": [self._element_link(e, q) for e, q in products]}}
            self._close_if_final(lead)
            self.leads[lead["id"]] = lead
        if notify:
            self._fire("leads", "add", self._lead_form(lead))
        return lead

    def update_lead(self, lead_id: int, notify: bool = True, **changes: Any) -> dict:
        """Change fields (`status_id`, `pipeline_id`, `price`, `name`, `contacts`, `products`); fires
        `update_lead`, and `status_lead` too when the stage changed — two deliveries, as amoCRM does."""
        with self._lock:
            lead = self.leads[lead_id]
            old_status = lead["status_id"]
            if "contacts" in changes:
                lead["_embedded"]["contacts"] = [{"id": c, "is_main": i == 0} for i, c in enumerate(changes.pop("contacts"))]
            if "products" in changes:
                lead["_embedded"]["catalog_elements"] = [self._element_link(e, q) for e, q in changes.pop("products")]
            lead.update(changes)
            lead["updated_at"] = self._tick()
            self._close_if_final(lead)
        if notify:
            extra = {"old_status_id": old_status} if lead["status_id"] != old_status else {}
            self._fire("leads", "update", self._lead_form(lead, extra))
            if extra:
                self._fire("leads", "status", self._lead_form(lead, extra))
        return lead

    def delete_lead(self, lead_id: int, notify: bool = True) -> int:
        with self._lock:
            self.leads.pop(lead_id)
        if notify:
            self._fire("leads", "delete", {"id": lead_id})
        return lead_id

    def delete_contact(self, contact_id: int, notify: bool = True) -> int:
        """As amoCRM deletes a contact: gone from the API, unlinked from its leads (which stay)."""
        with self._lock:
            self.contacts.pop(contact_id)
            for lead in self.leads.values():
                linked = [c for c in lead["_embedded"]["contacts"] if c["id"] != contact_id]
                if len(linked) != len(lead["_embedded"]["contacts"]):
                    lead["_embedded"]["contacts"] = [{**c, "is_main": i == 0} for i, c in enumerate(linked)]
        if notify:
            self._fire("contacts", "delete", {"id": contact_id, "type": "contact"})
        return contact_id

    def _element_link(self, element_id: int, quantity: int) -> dict:
        catalog_id = next(c for c, elements in self.catalogs.items() if element_id in elements)
        return {"id": element_id, "metadata": {"quantity": quantity, "catalog_id": catalog_id, "price_id": 5001}}

    def _close_if_final(self, lead: dict) -> None:
        lead["closed_at"] = lead["updated_at"] if lead["status_id"] in (WON, LOST) else None

    # --- webhooks (v2 form format) -----------------------------------------------------------------

    def _lead_form(self, lead: dict, extra: dict | None = None) -> dict:
        item = {"id": lead["id"], "name": lead["name"], "status_id": lead["status_id"], **(extra or {}),
                "responsible_user_id": 10000698, "last_modified": lead["updated_at"], "modified_user_id": 10000698,
                "created_user_id": 0, "date_create": lead["created_at"], "pipeline_id": lead["pipeline_id"],
                "account_id": self.account_id, "created_at": lead["created_at"], "updated_at": lead["updated_at"]}
        if lead.get("price"):
            item["price"] = lead["price"]  # absent from amoCRM's webhook when the lead has no budget
        item["custom_fields"] = self._v2_fields(lead.get("custom_fields_values"))
        return item

    def _contact_form(self, contact: dict) -> dict:
        linked = [lead_id for lead_id, lead in self.leads.items()
                  if any(c["id"] == contact["id"] for c in lead["_embedded"]["contacts"])]
        return {"id": contact["id"], "name": contact["name"], "responsible_user_id": 10000698,
                "date_create": contact["created_at"], "last_modified": contact["updated_at"],
                "created_user_id": 0, "modified_user_id": 0, "account_id": self.account_id,
                "custom_fields": self._v2_fields(contact.get("custom_fields_values")),
                "linked_leads_id": {str(lead_id): {"ID": lead_id} for lead_id in linked},
                "created_at": contact["created_at"], "updated_at": contact["updated_at"], "type": "contact"}

    @staticmethod
    def _v2_fields(values: list[dict] | None) -> list[dict]:
        fields = []
        for field_value in values or []:
            field = {"id": field_value["field_id"], "name": field_value["field_name"],
                     "values": [{"value": v["value"], **({"enum": v["enum_id"]} if "enum_id" in v else {})}
                                for v in field_value["values"]]}
            if field_value.get("field_code"):
                field["code"] = field_value["field_code"]
            fields.append(field)
        return fields

    def webhook_body(self, entity: str, action: str, item: dict) -> bytes:
        """The form body amoCRM sends: PHP-style brackets, every value a string."""
        return self.webhook_body_items(entity, action, [item])

    def webhook_body_items(self, entity: str, action: str, items: list[dict]) -> bytes:
        """One body carrying several items (`leads[status][0..n]`), as a mass action sends them."""
        pairs = [("account[subdomain]", self.subdomain), ("account[id]", str(self.account_id)),
                 ("account[_links][self]", f"https://{self.subdomain}.amocrm.ru")]
        for index, item in enumerate(items):
            pairs += _flatten(f"{entity}[{action}][{index}]", item)
        return urlencode(pairs).encode()

    def _fire(self, entity: str, action: str, item: dict) -> None:
        event = f"{action}_{entity[:-1]}"  # status_lead, add_contact…
        body = self.webhook_body(entity, action, item)
        with self._lock:
            self.outbox.append((event, body))  # what was fired, for in-process tests to deliver themselves
        for hook in list(self.webhooks):
            if event not in hook["settings"] or hook["disabled"]:
                continue
            try:
                status = requests.post(hook["destination"], data=body, timeout=2,
                                       headers={"Content-Type": "application/x-www-form-urlencoded",
                                                "User-Agent": "amoCRM-Webhooks/3.0"}).status_code
            except requests.RequestException:
                status = 0
            with self._lock:
                self.deliveries.append({"event": event, "destination": hook["destination"], "status": status})

    # --- OAuth 2.0 (external integration) ------------------------------------------------------------

    CODE_SECONDS, ACCESS_SECONDS, REFRESH_SECONDS = 20 * 60, 24 * 3600, 90 * 24 * 3600

    def now(self) -> float:
        return time.time() + self.clock_offset

    def advance(self, seconds: float) -> float:
        self.clock_offset += float(seconds)
        return self.now()

    def register_integration(self, *, client_id: str, client_secret: str, redirect_uri: str,
                             disable_url: str | None = None) -> dict:
        with self._lock:
            self.integration = {"client_id": client_id, "client_secret": client_secret, "redirect_uri": redirect_uri,
                                "disable_url": disable_url}
            return {"client_id": client_id}

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1]

    def consent_redirect(self, client_id: str, state: str) -> str:
        """Where amoCRM sends the user's browser once they allow access: our redirect URI with a new code."""
        with self._lock:
            if self.integration is None or client_id != self.integration["client_id"]:
                raise KeyError("unknown client_id")
            code = secrets.token_urlsafe(24)
            self.codes[code] = self.now() + self.CODE_SECONDS
            query = urlencode({"code": code, "state": state, "referer": self.host, "client_id": client_id,
                               "from_widget": "0"})
            return f"{self.integration['redirect_uri']}?{query}"

    def _authorize(self, request: Request) -> Reply:
        try:
            location = self.consent_redirect(request.query.get("client_id", ""), request.query.get("state", ""))
        except KeyError:
            return _problem(400, "Bad Request", "unknown client_id")
        return Reply(302, None, {"Location": location})

    def _access_token(self, request: Request) -> Reply:
        try:
            body = request.json() or {}
        except ValueError:
            body = {}
        grant = str(body.get("grant_type"))
        with self._lock:
            self.token_calls.append(grant)
            app = self.integration
            if app is None or body.get("client_id") != app["client_id"] or body.get("client_secret") != app["client_secret"]:
                return _problem(401, "Unauthorized", "Client authentication failed")
            if body.get("redirect_uri") != app["redirect_uri"]:
                return _problem(400, "Bad Request", "redirect_uri does not match")
            now = self.now()
            if grant == "authorization_code":
                expires = self.codes.pop(str(body.get("code")), None)  # single use
                if expires is None or expires < now:
                    return _problem(400, "Bad Request", "Authorization code has expired or was used")
            elif grant == "refresh_token":
                expires = self.refresh_tokens.pop(str(body.get("refresh_token")), None)  # single use
                if expires is None or expires < now:
                    return _problem(401, "Unauthorized", "Token has been revoked")
            else:
                return _problem(400, "Bad Request", "unsupported grant_type")
            access, refresh = "oauth-" + secrets.token_urlsafe(24), secrets.token_urlsafe(32)
            self.access_tokens[access] = now + self.ACCESS_SECONDS
            self.refresh_tokens[refresh] = now + self.REFRESH_SECONDS
        return Reply(200, {"token_type": "Bearer", "expires_in": self.ACCESS_SECONDS, "access_token": access,
                           "refresh_token": refresh, "server_time": int(now)})

    def _authorized(self, header: str | None) -> bool:
        if header == f"Bearer {self.token}":
            return True
        token = (header or "").removeprefix("Bearer ")
        with self._lock:
            expires = self.access_tokens.get(token)
            return expires is not None and expires >= self.now()

    def uninstall(self) -> dict:
        """The account's administrator disables the integration: its tokens die, and amoCRM calls the
        integration's disable hook."""
        with self._lock:
            self.access_tokens.clear()
            self.refresh_tokens.clear()
            app = self.integration
        status = 0
        if app and app.get("disable_url"):
            client_uuid, account = app["client_id"], str(self.account_id)
            signature = hmac.new(app["client_secret"].encode(), f"{client_uuid}|{account}".encode(),
                                 hashlib.sha256).hexdigest()
            try:
                status = requests.get(app["disable_url"], params={"account_id": account, "client_uuid": client_uuid,
                                                                  "signature": signature}, timeout=5).status_code
            except requests.RequestException:
                status = 0
            self.disable_calls.append(status)
        return {"disable_hook": status}

    def _delete_webhook(self, request: Request) -> Reply:
        destination = (request.json() or {}).get("destination")
        before = len(self.webhooks)
        self.webhooks = [h for h in self.webhooks if h["destination"] != destination]
        return Reply(204) if len(self.webhooks) < before else _problem(404, "Not Found", "no such webhook")

    # --- API -----------------------------------------------------------------------------------------

    def _guarded(self, handler):
        def wrapped(request: Request) -> Reply:
            if not self._authorized(request.headers.get("authorization")):
                return _problem(401, "Unauthorized", "Token has been revoked or is invalid")
            now = time.monotonic()
            with self._lock:
                self.requests.append({"path": request.path, "at": now})
                while self._recent and now - self._recent[0] >= 1.0:
                    self._recent.popleft()
                self._recent.append(now)
                if len(self._recent) > self.rate_limit:
                    self.rate_violations += 1
                    return _problem(429, "Too Many Requests", f"more than {self.rate_limit} requests per second")
                roll = self._rng.random()
                if self.faults.paths and self.faults.paths not in request.path:
                    roll = 1.0
            if roll < self.faults.error_5xx:
                return _problem(503, "Service Unavailable", "try later")
            if roll < self.faults.error_5xx + self.faults.error_429:
                return _problem(429, "Too Many Requests", "injected")
            with self._lock:
                return handler(request)
        return wrapped

    def _account(self, request: Request) -> Reply:
        """The account model of `GET /api/v4/account` ("Параметры аккаунта"; the field list as Kommo's
        "Account parameters" gives it): `country` and `currency` as set in the account's settings."""
        if self.faults.account_answer is not None:
            return Reply(200, self.faults.account_answer)
        with_ = set(request.query.get("with", "").split(","))
        account = {"id": self.account_id, "name": f"{self.subdomain} (sandbox)", "subdomain": self.subdomain,
                   "created_at": 1_600_000_000, "created_by": 10000698, "updated_at": 1_600_000_000,
                   "updated_by": 10000698, "current_user_id": 10000698, "country": self.country,
                   "currency": self.currency, "currency_symbol": CURRENCY_SYMBOLS.get(self.currency, self.currency),
                   "customers_mode": "disabled", "is_unsorted_on": True, "mobile_feature_version": 0,
                   "is_loss_reason_enabled": True, "is_helpbot_enabled": False, "is_technical_account": False,
                   "contact_name_display_order": 1,
                   "_links": {"self": {"href": f"https://{self.subdomain}.amocrm.ru/api/v4/account"}}}
        if "amojo_id" in with_:
            account["amojo_id"] = f"sandbox-amojo-{self.account_id}"
        if "version" in with_:
            account["version"] = 11
        return Reply(200, account)

    def _custom_fields(self, request: Request) -> Reply:
        fields = self.custom_fields[request.match["entity"]]
        return Reply(200, {"_total_items": len(fields), "_page": 1, "_links": {},
                           "_embedded": {"custom_fields": [{**f, "sort": 500 + i, "is_api_only": False,
                                                            "entity_type": request.match["entity"]}
                                                           for i, f in enumerate(fields)]}})

    def _pipelines(self, request: Request) -> Reply:
        return Reply(200, {"_total_items": len(self.pipelines), "_embedded": {"pipelines": self.pipelines}})

    def _lead_view(self, lead: dict, with_: set[str]) -> dict:
        embedded = {"tags": lead["_embedded"]["tags"], "companies": []}
        for key in ("contacts", "catalog_elements"):
            if key in with_:
                embedded[key] = lead["_embedded"][key]
        return {**lead, "_embedded": embedded}

    def _leads(self, request: Request) -> Reply:
        with_ = set(request.query.get("with", "").split(","))
        return self._list(request, "leads", self.leads, lambda lead: self._lead_view(lead, with_))

    def _list(self, request: Request, key: str, items: dict, view) -> Reply:
        """`filter[id][]`, `filter[updated_at][from]`, `order[id|updated_at]`, `page`, `limit` ≤ 250."""
        ids = {int(i) for i in request.query_all.get("filter[id][]", []) + request.query_all.get("filter[id]", [])}
        since = request.query.get("filter[updated_at][from]")
        limit = min(int(request.query.get("limit", "50")), 250)
        page = int(request.query.get("page", "1"))
        order = (lambda i: i["id"]) if "order[id]" in request.query else (lambda i: (i["updated_at"], i["id"]))
        found = sorted(items.values(), key=order)
        if ids:
            found = [i for i in found if i["id"] in ids]
        if since:
            found = [i for i in found if i["updated_at"] >= int(since)]
        chunk = found[(page - 1) * limit:page * limit]
        if not chunk:
            return Reply(204)
        links = {"self": {"href": f"/api/v4/{key}?page={page}"}}
        if page * limit < len(found):
            links["next"] = {"href": f"/api/v4/{key}?page={page + 1}"}
        return Reply(200, {"_page": page, "_links": links, "_embedded": {key: [view(i) for i in chunk]}})

    def _lead(self, request: Request) -> Reply:
        lead = self.leads.get(int(request.match["id"]))
        with_ = set(request.query.get("with", "").split(","))
        return Reply(200, self._lead_view(lead, with_)) if lead else Reply(204)

    def _contacts(self, request: Request) -> Reply:
        return self._list(request, "contacts", self.contacts, lambda contact: contact)

    def _contact(self, request: Request) -> Reply:
        contact = self.contacts.get(int(request.match["id"]))
        return Reply(200, contact) if contact else Reply(204)

    def _elements(self, request: Request) -> Reply:
        catalog = self.catalogs.get(int(request.match["catalog"]))
        if catalog is None:
            return _problem(404, "Not Found", "no such catalog")
        ids = {int(i) for i in request.query_all.get("filter[id][]", [])}
        found = [e for eid, e in sorted(catalog.items()) if not ids or eid in ids]
        limit = min(int(request.query.get("limit", "50")), 250)
        page = int(request.query.get("page", "1"))
        chunk = found[(page - 1) * limit:page * limit]
        links = {"next": {"href": f"?page={page + 1}"}} if page * limit < len(found) else {}
        return Reply(200, {"_page": page, "_links": links, "_embedded": {"elements": chunk}}) if chunk else Reply(204)

    def _catalogs(self, request: Request) -> Reply:
        catalogs = [{"id": cid, "name": "Товары", "type": "products", "account_id": self.account_id}
                    for cid in sorted(self.catalogs)]
        return Reply(200, {"_page": 1, "_embedded": {"catalogs": catalogs}}) if catalogs else Reply(204)

    def _list_webhooks(self, request: Request) -> Reply:
        return Reply(200, {"_total_items": len(self.webhooks), "_embedded": {"webhooks": self.webhooks}})

    def _add_webhook(self, request: Request) -> Reply:
        body = request.json() or {}
        destination, settings = body.get("destination"), body.get("settings")
        if not isinstance(destination, str) or not isinstance(settings, list) or not settings:
            return _problem(400, "Bad Request", "destination and settings are required")
        self.webhooks = [h for h in self.webhooks if h["destination"] != destination]
        hook = {"id": self._new_id(), "destination": destination, "settings": settings, "disabled": False,
                "account_id": self.account_id, "created_at": int(time.time()), "sort": body.get("sort", 1)}
        self.webhooks.append(hook)
        return Reply(201, hook)


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [pair for key, child in value.items() for pair in _flatten(f"{prefix}[{key}]", child)]
    if isinstance(value, list):
        return [pair for index, child in enumerate(value) for pair in _flatten(f"{prefix}[{index}]", child)]
    return [(prefix, "" if value is None else str(value))]


def seed_demo(sandbox: AmoCrmSandbox) -> dict:
    """A small account: one pipeline, a product catalog, a contact and an open deal with a ClientID."""
    sandbox.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
    kettle = sandbox.add_catalog_element(4521, "Чайник синий", 2490)
    contact = sandbox.create_contact("Иван Петров", phones=["+7 (916) 123-45-67"], emails=["Ivan@Example.com"],
                                     notify=False)
    lead = sandbox.create_lead("Заказ #1042", 7001, 1001, price=4980, contacts=[contact["id"]],
                               products=[(kettle["id"], 2)], client_id="1717171717123456789", notify=False)
    return {"pipeline_id": 7001, "lead_id": lead["id"], "contact_id": contact["id"], "product_id": kettle["id"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--token", default="demo-token")
    parser.add_argument("--client-id", help="our integration's client id (installs: GET /oauth)")
    parser.add_argument("--client-secret", help="our integration's client secret")
    parser.add_argument("--redirect-uri", help="our integration's redirect URI")
    parser.add_argument("--disable-url", help="our integration's disable hook")
    args = parser.parse_args()
    sandbox = AmoCrmSandbox(args.port, token=args.token)
    if args.client_id and args.client_secret and args.redirect_uri:
        sandbox.register_integration(client_id=args.client_id, client_secret=args.client_secret,
                                     redirect_uri=args.redirect_uri, disable_url=args.disable_url)
    seeded = seed_demo(sandbox)
    print(f"amoCRM sandbox on http://127.0.0.1:{args.port} (token {args.token}; demo {seeded})", flush=True)
    sandbox.serve_forever()


if __name__ == "__main__":
    main()
