"""Metrika CDP stand-in on loopback: the endpoints we call, the documented validation rules and error
body, merge-mode semantics on a stored state, quotas, and fault injection.

Deliberately written apart from `chalicelib.metrika.schemas`: it checks our payloads against Metrika's
documentation ("Customer data format", https://yandex.com/dev/metrika/en/data-import/contacts-data;
"Order data format", https://yandex.com/dev/metrika/en/data-import/orders-data; "Data upload modes",
https://yandex.com/dev/metrika/en/data-import/modes), so a rule we get wrong there fails here.
Error body as in "Описание ошибок в API" (https://yandex.ru/dev/metrika/ru/intro/errors); its `location`s
use Metrika's camelCase Java names (observed; not in the vendor docs).

Control endpoints (not Metrika's): `GET /_sandbox/state`, `GET /_sandbox/requests`,
`POST /_sandbox/config` (faults, limits), `POST /_sandbox/reset`.

Run alone: `python -m sandbox.metrika --port 8001 [--time-zone Europe/Moscow] [--daily-limit 5000]`.
"""
from __future__ import annotations

import argparse
import csv
import email.parser
import email.policy
import hashlib
import io
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from .httpserver import Reply, Request, SandboxServer

BUILTIN_STATUSES = {"IN_PROGRESS", "PAID", "CANCELLED", "SPAM"}
MULTI_VALUED = ("client_ids", "user_ids", "emails", "phones", "emails_md5", "phones_md5")
CONTACT_FIELDS = {"uniq_id", "name", "birth_date", "create_date_time", "update_date_time",
                  "attribute_values", *MULTI_VALUED}
ORDER_FIELDS = {"id", "client_uniq_id", "client_type", "create_date_time", "update_date_time",
                "finish_date_time", "order_status", "revenue", "cost", "currency", "products", "goals",
                "attribute_values"}
SCHEMA_ID = re.compile(r"^[\w\-:]+$", re.ASCII)
MD5 = re.compile(r"^[0-9a-f]{32}$")
EMAIL = re.compile(r"^[^@\sA-Z]+@[^@\sA-Z]+\.[^@\sA-Z]+$")
DT = "%Y-%m-%d %H:%M:%S"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _error(status: int, error_type: str, message: str, location: str | None = None,
           errors: list[dict] | None = None) -> Reply:
    errors = errors or [{"error_type": error_type, "message": message, **({"location": location} if location else {})}]
    return Reply(status, {"errors": errors, "code": status, "message": message})


@dataclass
class Counter:
    time_zone: str
    contacts: dict[str, dict] = field(default_factory=dict)
    orders: dict[str, dict] = field(default_factory=dict)
    order_statuses: dict[str, dict] = field(default_factory=dict)
    uploadings: list[dict] = field(default_factory=list)
    # Orders whose contact was not there yet when they arrived: Metrika links orders through contacts.
    orders_before_contact: list[str] = field(default_factory=list)
    custom_attributes: dict[str, dict[str, dict]] = field(default_factory=lambda: {"CONTACT": {}, "ORDER": {}})
    products: dict[str, str] = field(default_factory=dict)  # product list: name → humanized
    times_uploaded: dict[str, int] = field(default_factory=dict)  # "contacts:<uniq_id>" / "orders:<id>" → n
    # "contacts:<uniq_id>" / "orders:<id>" sent more than once in one upload (applied in random order)
    duplicate_ids: list[str] = field(default_factory=list)


@dataclass
class Faults:
    """Share (0..1) of data/schema requests answered 503 / 429, or answered after `slow_seconds`."""

    error_503: float = 0.0
    error_429: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 2.0
    seed: int | None = None
    paths: str | None = None  # only requests whose path contains this (e.g. "/data/orders/")


class MetrikaSandbox(SandboxServer):
    def __init__(self, port: int = 0, *, default_time_zone: str = "Europe/Moscow", max_parallel: int = 3,
                 daily_limit: int = 5000, tokens: dict[str, set[int] | None] | None = None) -> None:
        super().__init__(port=port)
        self.default_time_zone = default_time_zone
        self.max_parallel = max_parallel
        self.daily_limit = daily_limit
        self.tokens = tokens  # None: any token; else token → allowed counter ids (None = all)
        self.faults = Faults()
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._order_rng = random.Random()  # the order of rows sharing an id in one upload (apart from the faults)
        self.reset()
        cdp = r"/cdp/api/v1/counter/(?P<counter>\d+)"
        for method, pattern, handler in [
            ("POST", cdp + r"/data/contacts/json", self._upload_contacts),
            ("POST", cdp + r"/data/orders/json", self._upload_orders),
            ("POST", cdp + r"/data/contacts/csv", lambda r: self._upload_csv(r, "contacts")),
            ("POST", cdp + r"/data/orders/csv", lambda r: self._upload_csv(r, "orders")),
            ("GET", cdp + r"/schema/attributes", self._get_attributes),
            ("POST", cdp + r"/schema/attributes", self._create_attributes),
            ("POST", cdp + r"/schema/products", self._save_products),
            ("GET", cdp + r"/schema/order_statuses", self._get_statuses),
            ("POST", cdp + r"/schema/order_statuses", self._save_statuses),
            ("GET", cdp + r"/last_uploadings", self._last_uploadings),
            ("GET", r"/management/v1/counter/(?P<counter>\d+)", self._get_counter),
        ]:
            self.route(method, pattern, self._guarded(handler))
        self.route("GET", r"/_sandbox/state", lambda r: Reply(200, self.state()))
        self.route("GET", r"/_sandbox/requests", lambda r: Reply(200, {"requests": self.requests,
                                                                      "max_in_flight": self.max_in_flight}))
        self.route("POST", r"/_sandbox/config", self._configure)
        self.route("POST", r"/_sandbox/reset", lambda r: (self.reset(), Reply(200, {"success": True}))[1])

    # --- state, readable by tests -----------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.counters: dict[int, Counter] = {}
            self.requests: list[dict] = []
            self.used_today: dict[str, int] = {}
            self.in_flight: dict[str, int] = {}
            self.max_in_flight = 0
            self.bytes_received = 0
            self.faults = Faults()

    def counter(self, counter_id: int) -> Counter:
        with self._lock:
            return self.counters.setdefault(int(counter_id), Counter(self.default_time_zone))

    def add_counter(self, counter_id: int, time_zone: str) -> Counter:
        with self._lock:
            self.counters[int(counter_id)] = Counter(time_zone)
            return self.counters[int(counter_id)]

    def fail_uploading(self, uploading_id: str) -> None:
        """Report an accepted upload as FAILED in last_uploadings, as Metrika might after the 200."""
        with self._lock:
            for counter in self.counters.values():
                for uploading in counter.uploadings:
                    if uploading["uploading_id"] == uploading_id:
                        uploading["api_validation_status"] = "FAILED"

    def add_uploading(self, counter_id: int, at: str, *, status: str = "PASSED", elements_count: int = 1,
                      uploading_id: str | None = None) -> dict:
        """An upload made by someone else at `at` (`yyyy-MM-dd HH:mm:ss`, counter time), as it would
        appear in last_uploadings: fills the listing for paging tests."""
        uploading = {"uploading_id": uploading_id or uuid.uuid4().hex, "datetime": at, "api_validation_status": status,
                     "elements_count": elements_count, "entity_type": "SYSTEM", "uploading_format": "JSON",
                     "uploading_source": "API"}
        counter = self.counter(counter_id)
        with self._lock:
            counter.uploadings.append(uploading)
        return uploading

    def set_faults(self, **kwargs: Any) -> None:
        self.faults = Faults(**kwargs)
        self._rng = random.Random(self.faults.seed)

    def state(self) -> dict:
        with self._lock:
            return {"counters": {str(cid): {"time_zone": c.time_zone, "contacts": c.contacts, "orders": c.orders,
                                            "order_statuses": list(c.order_statuses.values()),
                                            "uploadings": c.uploadings,
                                            "orders_before_contact": c.orders_before_contact,
                                            "custom_attributes": c.custom_attributes, "products": c.products,
                                            "times_uploaded": c.times_uploaded}
                                 for cid, c in self.counters.items()},
                    "used_today": self.used_today, "max_in_flight": self.max_in_flight}

    def _configure(self, request: Request) -> Reply:
        body = request.json() or {}
        if "faults" in body:
            self.set_faults(**body["faults"])
        for key in ("daily_limit", "max_parallel"):
            if key in body:
                setattr(self, key, int(body[key]))
        if "counters" in body:
            for counter_id, time_zone in body["counters"].items():
                self.add_counter(int(counter_id), time_zone)
        for uploading_id in body.get("fail_uploadings") or []:  # for the local stack, in its own process
            self.fail_uploading(str(uploading_id))
        return Reply(200, {"success": True})

    # --- auth, quotas, faults ----------------------------------------------------------------------

    def _guarded(self, handler):
        def wrapped(request: Request) -> Reply:
            reply, token = self._admit(request)
            if reply is None:
                try:
                    reply = self._maybe_fault(request) or handler(request)
                finally:
                    with self._lock:
                        self.in_flight[token] -= 1
            with self._lock:
                self.requests.append({"method": request.method, "path": request.path, "query": request.query,
                                      "status": reply.status, "at": time.time()})
                self.bytes_received += len(request.body)
            return reply
        return wrapped

    def _admit(self, request: Request) -> tuple[Reply | None, str]:
        header = request.headers.get("authorization", "")
        if not header.startswith("OAuth ") or not header[6:].strip():
            return _error(401, "unauthorized", "Authorization: OAuth <token> header required"), ""
        token = header[6:].strip()
        quota_key = fingerprint(token)
        counter_id = int(request.match["counter"])
        if self.tokens is not None:
            if token not in self.tokens:
                return _error(403, "invalid_token", "Invalid oauth_token"), quota_key
            allowed = self.tokens[token]
            if allowed is not None and counter_id not in allowed:
                return _error(403, "access_denied", f"Access denied to counter {counter_id}"), quota_key
        with self._lock:
            if self.in_flight.get(quota_key, 0) >= self.max_parallel:
                return _error(429, "quota_parallel_requests",
                              f"Quota exceeded: more than {self.max_parallel} parallel requests"), quota_key
            if self.used_today.get(quota_key, 0) >= self.daily_limit:
                return _error(429, "quota_requests_by_uid",
                              f"Quota exceeded: {self.daily_limit} requests per day"), quota_key
            self.used_today[quota_key] = self.used_today.get(quota_key, 0) + 1
            self.in_flight[quota_key] = self.in_flight.get(quota_key, 0) + 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight[quota_key])
        return None, quota_key

    def _maybe_fault(self, request: Request) -> Reply | None:
        faults = self.faults
        if "/management/" in request.path or (faults.paths and faults.paths not in request.path):
            return None
        roll = self._rng.random()
        if roll < faults.error_503:
            return _error(503, "backend_error", "Backend error, try later")
        if roll < faults.error_503 + faults.error_429:
            return Reply(429, _error(429, "quota_requests_by_ip", "Quota exceeded: requests by IP").body,
                         {"Retry-After": "1"})
        if roll < faults.error_503 + faults.error_429 + faults.slow:
            time.sleep(faults.slow_seconds)
        return None

    # --- endpoints ---------------------------------------------------------------------------------

    def _get_counter(self, request: Request) -> Reply:
        counter_id = int(request.match["counter"])
        return Reply(200, {"counter": {"id": counter_id, "time_zone_name": self.counter(counter_id).time_zone}})

    def _get_statuses(self, request: Request) -> Reply:
        counter = self.counter(int(request.match["counter"]))
        return Reply(200, {"order_statuses": [{**s, "order_status_source": "USER"}
                                              for s in counter.order_statuses.values()]})

    def _save_statuses(self, request: Request) -> Reply:
        body = _json_object(request)
        if isinstance(body, Reply):
            return body
        statuses = body.get("order_statuses")
        if not isinstance(statuses, list) or not statuses:
            return _error(400, "invalid_parameter", "order_statuses must be a non-empty list", "orderStatuses")
        errors = []
        for i, status in enumerate(statuses):
            where = f"orderStatuses[{i}]"
            sid = status.get("id") if isinstance(status, dict) else None
            if not isinstance(sid, str) or not 1 <= len(sid) <= 255 or not SCHEMA_ID.match(sid):
                errors.append(("invalid_parameter", "id must be 1-255 chars matching ^[\\w-:]+$", f"{where}.id"))
            if not isinstance(status, dict) or status.get("type") not in BUILTIN_STATUSES:
                errors.append(("invalid_parameter", "type must be one of IN_PROGRESS, PAID, CANCELLED, SPAM",
                               f"{where}.type"))
                continue
            if len(status.get("humanized") or "") > 4096:
                errors.append(("invalid_parameter", "humanized longer than 4096", f"{where}.humanized"))
            if len(status.get("goal_action_ids") or []) > 10:
                errors.append(("invalid_parameter", "at most 10 goal_action_ids", f"{where}.goalActionIds"))
        if errors:
            return _validation_failed(errors)
        counter = self.counter(int(request.match["counter"]))
        with self._lock:
            # Replaces the whole list: the docs do not say whether a save replaces or adds, so the
            # sandbox takes the stricter reading, and a client that sends only its own statuses loses
            # those another integration on the counter pushed.
            counter.order_statuses = {status["id"]: dict(status) for status in statuses}
        return Reply(200, {"success": True})

    def _last_uploadings(self, request: Request) -> Reply:
        """"Информация о последних загрузках" (https://yandex.ru/dev/metrika/ru/management/openapi/schema/getLastUploadings):
        newest first, `limit` 1..1000 (default 10), `datetime_offset` returns uploads strictly before
        it — `yyyy-MM-dd HH:mm:ss` in the counter's zone (the Russian page's example) or ISO 8601 in UTC
        (`2020-02-10T10:00:00.000Z`, the English page's)."""
        counter = self.counter(int(request.match["counter"]))
        limit_text = request.query.get("limit", "10")
        if not (limit_text.isascii() and limit_text.isdigit() and 1 <= int(limit_text) <= 1000):
            return _error(400, "invalid_parameter", "limit must be 1..1000", "limit")
        offset = request.query.get("datetime_offset")
        if offset is not None:
            offset = _local_time(offset, counter.time_zone)
            if offset is None:
                return _error(400, "invalid_parameter", "datetime_offset must be a date-time", "datetime_offset")
        with self._lock:
            newest_first = sorted(reversed(counter.uploadings), key=lambda u: u["datetime"], reverse=True)
        items = [u for u in newest_first if offset is None or u["datetime"] < offset]
        return Reply(200, {"uploadings": items[:int(limit_text)]})

    def _upload_contacts(self, request: Request) -> Reply:
        return self._upload(request, "contacts", self._check_contact, "uniq_id")

    def _upload_orders(self, request: Request) -> Reply:
        return self._upload(request, "orders", self._check_order, "id")

    def _upload(self, request: Request, kind: str, check, key: str) -> Reply:
        mode = request.query.get("merge_mode", "").upper()
        if mode not in ("SAVE", "UPDATE", "APPEND"):
            return _error(400, "invalid_parameter", "merge_mode must be SAVE, UPDATE or APPEND", "merge_mode")
        body = _json_object(request)
        if isinstance(body, Reply):
            return body
        rows = body.get(kind)
        if not isinstance(rows, list) or not rows:
            return _error(400, "invalid_parameter", f"{kind} must be a non-empty list", kind)
        return self._store_rows(request, kind, check, key, mode, rows, "JSON")

    def _store_rows(self, request: Request, kind: str, check, key: str, mode: str, rows: list, fmt: str,
                    errors: list | None = None) -> Reply:
        counter = self.counter(int(request.match["counter"]))
        now = datetime.now(timezone.utc).astimezone(ZoneInfo(counter.time_zone)).strftime(DT)
        errors = list(errors or [])
        for i, row in enumerate(rows):
            errors += check(row, f"{kind}[{i}]", counter, now)
        if errors:
            return _validation_failed(errors)
        with self._lock:
            store = getattr(counter, kind)
            # Metrika applies rows with the same id in random order ("Data upload modes",
            # https://yandex.com/dev/metrika/en/data-import/modes): so do we, so a sender that relies on
            # the last row of an id standing fails here some of the time; and each such id is noted.
            seen: dict[str, list[int]] = {}
            for i, row in enumerate(rows):
                seen.setdefault(str(row[key]), []).append(i)
            order = list(range(len(rows)))
            for positions in (p for p in seen.values() if len(p) > 1):
                shuffled = self._order_rng.sample(positions, len(positions))
                for at, i in zip(positions, shuffled):
                    order[at] = i
            counter.duplicate_ids.extend(f"{kind}:{i}" for i, p in seen.items() if len(p) > 1)
            for row in (rows[i] for i in order):
                store[row[key]] = _merge(store.get(row[key]), row, mode)
                counter.times_uploaded[f"{kind}:{row[key]}"] = counter.times_uploaded.get(f"{kind}:{row[key]}", 0) + 1
                if kind == "orders" and row["client_uniq_id"] not in counter.contacts:
                    counter.orders_before_contact.append(row["id"])
            uploading = {"uploading_id": uuid.uuid4().hex, "datetime": now, "api_validation_status": "PASSED",
                         "elements_count": len(rows), "entity_type": "SYSTEM", "uploading_format": fmt,
                         "uploading_source": "API"}
            counter.uploadings.append(uploading)
        return Reply(200, {"uploading": uploading})

    # --- CSV uploads and schema lists -----------------------------------------------------------------------
    # "Uploading customer data (CSV)", https://yandex.com/dev/metrika/en/management/openapi/schema/uploadContacts;
    # "Uploading orders (CSV)", https://yandex.com/dev/metrika/en/management/openapi/schema/uploadOrders;
    # "Creating attributes", https://yandex.com/dev/metrika/en/management/openapi/schema/createAttributes;
    # "Creating a product list", https://yandex.com/dev/metrika/en/management/openapi/schema/createProducts

    def _upload_csv(self, request: Request, kind: str) -> Reply:
        mode = request.query.get("merge_mode", "").upper()
        if mode not in ("SAVE", "UPDATE", "APPEND"):
            return _error(400, "invalid_parameter", "merge_mode must be SAVE, UPDATE or APPEND", "merge_mode")
        raw_mapping = request.query.get("columns_mapping", "")
        pairs = re.findall(r'"([^"]+)":"([^"]+)"', raw_mapping)
        if not pairs:
            return _error(400, "invalid_parameter", 'columns_mapping must look like "field":"Header",…', "columns_mapping")
        delimiter = {"COMMA": ",", "SEMICOLON": ";"}.get(request.query.get("delimiter_type", "COMMA").upper())
        if delimiter is None:
            return _error(400, "invalid_parameter", "delimiter_type must be COMMA or SEMICOLON", "delimiter_type")
        text = _multipart_file(request)
        if text is None:
            return _error(400, "invalid_uploading", "multipart/form-data with a part named file is required")
        counter = self.counter(int(request.match["counter"]))
        entity = "CONTACT" if kind == "contacts" else "ORDER"
        system = CONTACT_FIELDS if kind == "contacts" else ORDER_FIELDS
        custom = counter.custom_attributes[entity]
        field_of = {}
        for name, header in pairs:
            if name not in system - {"attribute_values"} and name not in custom:
                return _error(400, "invalid_parameter", f"unknown attribute {name!r}: create it with schema/attributes",
                              "columns_mapping")
            field_of[header] = name
        try:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
            header, *lines = list(reader)
        except (csv.Error, ValueError) as exc:
            return _error(400, "invalid_uploading", f"malformed CSV: {exc}")
        missing = [h for h in field_of if h not in header]
        if missing:
            return _error(400, "invalid_uploading", f"columns {missing} are mapped but not in the file")
        if not lines:
            return _error(400, "invalid_uploading", "the file has no rows")
        rows, errors = [], []
        for i, line in enumerate(lines):
            if len(line) != len(header):
                return _error(400, "invalid_uploading", f"line {i + 2} has {len(line)} cells, the header {len(header)}")
            row: dict[str, Any] = {}
            for cell, column in zip(line, header):
                name = field_of.get(column)
                if name is None or cell == "":
                    continue
                if name in custom:
                    problem = _check_attribute(custom[name], cell, row)
                    if problem:
                        errors.append(("invalid_parameter", problem, f"{kind}[{i}].attributeValues.{name}"))
                elif name in MULTI_VALUED:
                    row[name] = [v for v in cell.split(",") if v]
                elif name == "products":
                    try:
                        row[name] = {k: float(q) for k, _, q in (item.rpartition(":") for item in cell.split(","))}
                    except ValueError:
                        errors.append(("invalid_parameter", f"products must be id:qty,… not {cell!r}", f"{kind}[{i}].products"))
                elif name in ("revenue", "cost"):
                    try:
                        row[name] = float(cell)
                    except ValueError:
                        errors.append(("invalid_parameter", f"not a number: {cell!r}", f"{kind}[{i}].{name}"))
                else:
                    row[name] = cell
            rows.append(row)
        return self._store_rows(request, kind, self._check_contact if kind == "contacts" else self._check_order,
                                "uniq_id" if kind == "contacts" else "id", mode, rows, "CSV", errors)

    def _get_attributes(self, request: Request) -> Reply:
        entity = request.query.get("entity_type", "").upper()
        if entity not in ("CONTACT", "ORDER"):
            return _ENTITY_TYPE_REFUSED
        counter = self.counter(int(request.match["counter"]))
        system = sorted((CONTACT_FIELDS if entity == "CONTACT" else ORDER_FIELDS) - {"attribute_values"})
        return Reply(200, {"system_attributes": [{"name": n, "type_group": "PREDEFINED"} for n in system],
                           "custom_attributes": list(counter.custom_attributes[entity].values())})

    def _create_attributes(self, request: Request) -> Reply:
        entity = request.query.get("entity_type", "").upper()
        if entity not in ("CONTACT", "ORDER"):
            return _ENTITY_TYPE_REFUSED
        body = _json_object(request)
        if isinstance(body, Reply):
            return body
        attributes = body.get("attributes")
        if not isinstance(attributes, list) or not attributes:
            return _error(400, "invalid_parameter", "attributes must be a non-empty list", "attributes")
        system = CONTACT_FIELDS if entity == "CONTACT" else ORDER_FIELDS
        counter = self.counter(int(request.match["counter"]))
        errors = []
        for i, attribute in enumerate(attributes):
            where = f"attributes[{i}]"
            name = attribute.get("name") if isinstance(attribute, dict) else None
            if not isinstance(name, str) or not 1 <= len(name) <= 255 or not SCHEMA_ID.match(name):
                errors.append(("invalid_parameter", "name must be 1-255 chars matching ^[\\w-:]+$", f"{where}.name"))
            elif name in system:
                errors.append(("invalid_parameter", f"{name!r} is a system attribute", f"{where}.name"))
            elif name in counter.custom_attributes[entity]:
                errors.append(("conflict", f"attribute {name!r} already exists", f"{where}.name"))
            if not isinstance(attribute, dict) or attribute.get("type_name") not in ATTRIBUTE_TYPES:
                errors.append(("invalid_parameter", "type_name must be numeric, date, datetime, email or text",
                               f"{where}.typeName"))
            if not isinstance(attribute, dict) or not isinstance(attribute.get("multivalued"), bool):
                errors.append(("missing_parameter", "multivalued is required", f"{where}.multivalued"))
        if errors:
            return _validation_failed(errors)
        with self._lock:
            for attribute in attributes:
                counter.custom_attributes[entity][attribute["name"]] = {
                    **attribute, "type_group": "PREDEFINED", "type_humanized": attribute["type_name"]}
        return Reply(200, {"success": True})

    def _save_products(self, request: Request) -> Reply:
        """Replaces the list: the docs do not say whether it adds or replaces, so the sandbox takes the
        stricter reading and a client that sends only new items loses the old ones."""
        body = _json_object(request)
        if isinstance(body, Reply):
            return body
        items = body.get("items")
        if not isinstance(body.get("attributes"), list):
            return _error(400, "missing_parameter", "attributes is required (may be empty)", "attributes")
        if not isinstance(items, list) or not items or len(items) > 160_000:
            return _error(400, "invalid_parameter", "items must be a list of 1..160000 products", "items")
        errors = []
        for i, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or not 1 <= len(name) <= 255 or not SCHEMA_ID.match(name):
                errors.append(("invalid_parameter", "name must be 1-255 chars matching ^[\\w-:]+$", f"items[{i}].name"))
            elif len(item.get("humanized") or "") > 4096:
                errors.append(("invalid_parameter", "humanized longer than 4096", f"items[{i}].humanized"))
        if errors:
            return _validation_failed(errors)
        counter = self.counter(int(request.match["counter"]))
        with self._lock:
            counter.products = {item["name"]: item.get("humanized", "") for item in items}
        return Reply(200, {"success": True})

    # --- validation ---------------------------------------------------------------------------------
    # Fields: "Uploading customer data (JSON)" and "Uploading orders (JSON)",
    # https://yandex.com/dev/metrika/en/management/openapi/schema/uploadContactJson_1,
    # https://yandex.com/dev/metrika/en/management/openapi/schema/uploadOrdersJson_1.
    # Dates: "Формат даты и времени", https://yandex.ru/dev/metrika/ru/data-import/date. Future times and
    # update/finish times before the creation time are refused as Metrika refuses them (observed; not in
    # the vendor docs).

    def _check_contact(self, row: Any, where: str, counter: Counter, now: str) -> list[tuple[str, str, str]]:
        if not isinstance(row, dict):
            return [("invalid_parameter", "contact must be an object", where)]
        errors = _unknown(row, CONTACT_FIELDS, where)
        if not isinstance(row.get("uniq_id"), str) or not row["uniq_id"].strip():
            errors.append(("invalid_parameter", "must not be blank", f"{where}.uniqId"))
        errors += _check_times(row, where, now, ("create_date_time", "update_date_time"))
        if row.get("birth_date") is not None:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(row["birth_date"])) or not "1970-01-01" <= row["birth_date"] <= now[:10]:
                errors.append(("invalid_parameter", "birth date must be yyyy-MM-dd between 1970 and today",
                               f"{where}.birthDate"))
        checks = {"client_ids": _valid_client_id, "emails": lambda v: isinstance(v, str) and bool(EMAIL.match(v)),
                  "phones": lambda v: isinstance(v, str) and v.isdigit(),
                  "emails_md5": lambda v: isinstance(v, str) and bool(MD5.match(v)),
                  "phones_md5": lambda v: isinstance(v, str) and bool(MD5.match(v)),
                  "user_ids": lambda v: isinstance(v, str) and bool(v.strip())}
        for name, ok in checks.items():
            values = row.get(name)
            if values is None:
                continue
            if not isinstance(values, list):
                errors.append(("invalid_parameter", "must be a list", f"{where}.{_camel(name)}"))
                continue
            for j, value in enumerate(values):
                if not ok(value):
                    errors.append(("invalid_parameter", f"invalid value {value!r}", f"{where}.{_camel(name)}[{j}]"))
        return errors

    def _check_order(self, row: Any, where: str, counter: Counter, now: str) -> list[tuple[str, str, str]]:
        if not isinstance(row, dict):
            return [("invalid_parameter", "order must be an object", where)]
        errors = _unknown(row, ORDER_FIELDS, where)
        for name in ("id", "client_uniq_id", "order_status"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                errors.append(("invalid_parameter", "must not be blank", f"{where}.{_camel(name)}"))
        if row.get("client_type") != "CONTACT":
            errors.append(("invalid_parameter", "client_type must be CONTACT", f"{where}.clientType"))
        if row.get("create_date_time") is None:
            errors.append(("missing_parameter", "must not be null", f"{where}.createDateTime"))
        errors += _check_times(row, where, now, ("create_date_time", "update_date_time", "finish_date_time"))
        status = row.get("order_status")
        if isinstance(status, str) and status.strip() and status not in BUILTIN_STATUSES | set(counter.order_statuses):
            errors.append(("invalid_parameter", f"unknown order status {status!r}", f"{where}.orderStatus"))
        for name in ("revenue", "cost"):
            value = row.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not 0 <= value < 2**63 - 1):
                errors.append(("invalid_parameter", "must be a number >= 0", f"{where}.{name}"))
        if row.get("currency") is not None and not re.fullmatch(r"[A-Z]{3}", str(row["currency"])):
            errors.append(("invalid_parameter", "must be an ISO 4217 code", f"{where}.currency"))
        products = row.get("products")
        if products is not None:
            if not isinstance(products, dict):
                errors.append(("invalid_parameter", "must be an object", f"{where}.products"))
            else:
                for product, quantity in products.items():
                    if not product.strip() or not isinstance(quantity, (int, float)) or quantity < 0:
                        errors.append(("invalid_parameter", f"invalid product {product!r}: {quantity!r}",
                                       f"{where}.products"))
        return errors


ATTRIBUTE_TYPES = ("numeric", "date", "datetime", "email", "text")
_ENTITY_TYPE_REFUSED = _error(400, "invalid_parameter", "entity_type must be CONTACT or ORDER here", "entity_type")


def _check_attribute(attribute: dict, cell: str, row: dict) -> str | None:
    """As Metrika checks attribute values (observed; not in the vendor docs): numbers parse, dates are
    valid and from 1970, e-mails valid; a multivalued cell is split on commas, a single-valued one is not."""
    values = [v for v in cell.split(",") if v] if attribute["multivalued"] else [cell]
    kind = attribute["type_name"]
    for value in values:
        if kind == "numeric":
            try:
                float(value)
            except ValueError:
                return f"{attribute['name']}: {value!r} is not a number"
        elif kind in ("date", "datetime"):
            fmt = "%Y-%m-%d" if kind == "date" else DT
            try:
                parsed = datetime.strptime(value, fmt)
            except ValueError:
                return f"{attribute['name']}: {value!r} is not a {kind}"
            if parsed.year < 1970:
                return f"{attribute['name']}: {value!r} is before 1970"
        elif kind == "email" and not EMAIL.match(value):
            return f"{attribute['name']}: {value!r} is not an e-mail"
    row.setdefault("attribute_values", {})[attribute["name"]] = values
    return None


def _multipart_file(request: Request) -> str | None:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request.body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True).decode("utf-8")
    return None


def fingerprint(token: str) -> str:
    """Quotas are per token; the state shows a fingerprint so the sandbox never echoes a token."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _valid_client_id(value: Any) -> bool:
    text = str(value)
    return not isinstance(value, bool) and text.isdigit() and 0 < int(text) < 2**64


def _unknown(row: dict, allowed: set[str], where: str) -> list[tuple[str, str, str]]:
    return [("invalid_parameter", f"unknown field {name!r}", f"{where}.{_camel(name)}")
            for name in row if name not in allowed]


def _check_times(row: dict, where: str, now: str, names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    errors, create = [], row.get(names[0])
    for name in names:
        value = row.get(name)
        if value is None:
            continue
        location = f"{where}.{_camel(name)}"
        try:
            datetime.strptime(value, DT)
        except (TypeError, ValueError):
            errors.append(("invalid_parameter", "date-time must be yyyy-MM-dd HH:mm:ss", location))
            continue
        if value < "1970-01-01 00:00:00":
            errors.append(("invalid_parameter", "must not be before 1970", location))
        if value > now:
            errors.append(("invalid_parameter", "must not be in the future", location))
        if name != names[0] and isinstance(create, str) and value < create:
            errors.append(("invalid_parameter", f"must not be before {_camel(names[0])}", location))
    return errors


def _local_time(value: str, time_zone: str) -> str | None:
    """A date-time parameter as the counter's local `yyyy-MM-dd HH:mm:ss`, or None if it is none."""
    try:
        if "T" in value:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                return None
            return parsed.astimezone(ZoneInfo(time_zone)).strftime(DT)
        return datetime.strptime(value, DT).strftime(DT)
    except ValueError:
        return None


def _validation_failed(errors: list[tuple[str, str, str]]) -> Reply:
    items = [{"error_type": t, "message": m, "location": loc} for t, m, loc in errors]
    return _error(400, items[0]["error_type"], items[0]["message"], errors=items)


def _json_object(request: Request) -> dict | Reply:
    if "application/json" not in request.headers.get("content-type", ""):
        return _error(400, "invalid_parameter", "Content-Type must be application/json")
    try:
        body = request.json()
    except ValueError:
        return _error(400, "invalid_json", "malformed JSON")
    return body if isinstance(body, dict) else _error(400, "invalid_json", "JSON object expected")


def _merge(stored: dict | None, row: dict, mode: str) -> dict:
    """A row applied to the stored record as "Data upload modes" (https://yandex.com/dev/metrika/en/data-import/modes)
    shows it, field by field (each custom attribute counts as a field):

    * SAVE replaces the record: a field the row leaves out becomes empty; lists are the row's.
    * UPDATE replaces the fields the row carries and keeps the others; a list is replaced (1,2 + 1,3 → 1,3).
    * APPEND keeps the fields the row leaves out and unites lists (1,2 + 1,3 → 1,2,3).

    Creation dates never change, whatever the mode. What an empty list does is not documented: the
    sandbox takes it as not sent, so under UPDATE and APPEND the stored values stay — the reading under
    which sending `[]` removes nothing, so code that relied on it fails here."""
    row = {k: v for k, v in row.items() if v != []}
    if isinstance(row.get("attribute_values"), dict):
        row["attribute_values"] = {k: v for k, v in row["attribute_values"].items() if v not in ([], None)}
    if stored is None:
        return dict(row)
    if mode == "SAVE":
        merged = dict(row)
    else:
        merged = {**stored, **row}
        if mode == "APPEND":
            for name in MULTI_VALUED:
                if name in stored and name in row:
                    merged[name] = stored[name] + [v for v in row[name] if v not in stored[name]]
        if "attribute_values" in stored and "attribute_values" in row:
            attributes = {**stored["attribute_values"], **row["attribute_values"]}
            if mode == "APPEND":
                for name, old in stored["attribute_values"].items():
                    new = row["attribute_values"].get(name)
                    if isinstance(old, list) and isinstance(new, list):
                        attributes[name] = old + [v for v in new if v not in old]
            merged["attribute_values"] = attributes
    if stored.get("create_date_time") is not None:
        merged["create_date_time"] = stored["create_date_time"]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--time-zone", default="Europe/Moscow", help="time zone of counters created on first use")
    parser.add_argument("--daily-limit", type=int, default=5000)
    args = parser.parse_args()
    sandbox = MetrikaSandbox(args.port, default_time_zone=args.time_zone, daily_limit=args.daily_limit)
    print(f"Metrika sandbox on http://127.0.0.1:{args.port}", flush=True)
    sandbox.serve_forever()


if __name__ == "__main__":
    main()
