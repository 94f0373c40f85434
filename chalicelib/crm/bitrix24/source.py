"""The Bitrix24 `CrmSource`: deals with product rows, contact and source lead in `batch` calls, then
the pure translation. REST calls are spaced for the portal's 2-requests-a-second leaky bucket.

Every failure reaches the caller as the error taxonomy with source "bitrix24"; batch sub-errors come
classified from the client (`api.classify`), and only a `NotFound` means an entity was deleted:

* deal (or contact) sub-call "Not found" → `EntityRows(gone=True)`;
* a `Transient` sub-error on any sub-call a deal needs → the whole snapshot raises `Transient` (the
  worker retries the group later);
* a `Misconfigured` or `Permanent` sub-error → that entity gets `EntityRows(error=…)`, parked with the
  reason and never sent;
* the chained contact and source-lead sub-calls matter only when the deal names one (`CONTACT_ID`,
  `LEAD_ID` not null, "" or "0"); then only their "Not found" lets the deal go without them (with the
  synthetic customer `deal-…`), never an error that left them unread.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

from ...errors import BridgeError, Permanent, Transient
from ...metrika.schemas import normalize_product_id
from ...normalize import DEFAULT_PHONE_REGION
from .. import CONTACT, ORDER, BackfillPage, EntityRef, EntityRows, slot_waiter
from .api import BATCH_LIMIT, MIN_INTERVAL, SOURCE, Bitrix24Client, NotFound
from .translate import contact_row, deal_rows, default_mapping, from_item_product_row

DEFAULT_CLIENT_ID_FIELD = "UF_CRM_YM_CLIENT_ID"
CALLS_PER_DEAL = 4  # deal, product rows, contact, source lead
# Items per page of a list method ("Get a List of Deals crm.deal.list",
# https://apidocs.bitrix24.com/api-reference/crm/deals/crm-deal-list.html).
LIST_PAGE = 50
# History import: deals per step. Their list pages and then their contacts, leads and product rows
# (three lists per 50 deals) each fit one batch request.
BACKFILL_DEALS = 16 * LIST_PAGE
BACKFILL_CONTACTS = BATCH_LIMIT * LIST_PAGE
# `*` alone leaves out custom (UF_*) and multiple fields such as PHONE and EMAIL ("Get a List of Contacts
# crm.contact.list", https://apidocs.bitrix24.com/api-reference/crm/contacts/crm-contact-list.html).
CONTACT_SELECT = ["*", "UF_*", "PHONE", "EMAIL"]


class Bitrix24Source:
    def __init__(self, reserve_slot: Callable[[str, float, float], float], *,
                 tokens_for: Callable[[dict], Callable[[bool], str]] | None = None,
                 keep_alive: Callable[[dict], bool] | None = None, **client_options: Any) -> None:
        self._reserve_slot = reserve_slot
        # An installed application's access token per call (chalicelib/bitrix24_app.py `token_source`),
        # and the scheduled refresh of an idle one (`keep_alive`).
        self._tokens_for, self._keep_alive = tokens_for, keep_alive
        self._client_options = client_options

    def client_for(self, integration: dict) -> Bitrix24Client:
        connection = integration["connection"]
        if connection.get("auth") == "oauth":
            if self._tokens_for is None:
                raise Permanent("this Bitrix24 integration is an installed application, and this process has no "
                                "access to its OAuth tokens", source=SOURCE)
            url = connection["client_endpoint"]
            scope = "bitrix24:" + hashlib.sha256((urlsplit(url).hostname or "").encode()).hexdigest()[:16]
            return Bitrix24Client(url, wait_for_slot=slot_waiter(self._reserve_slot, scope, MIN_INTERVAL),
                                  auth=self._tokens_for(integration), **self._client_options)
        url = connection["webhook_url"]
        # The bucket is per portal: every webhook and app on it shares the budget
        # (https://apidocs.bitrix24.ru/limits.html "Лимиты REST API").
        scope = "bitrix24:" + hashlib.sha256((urlsplit(url).hostname or "").encode()).hexdigest()[:16]
        wait_for_slot = slot_waiter(self._reserve_slot, scope, MIN_INTERVAL)
        return Bitrix24Client(url, wait_for_slot=wait_for_slot, **self._client_options)

    def webhook_health(self, integration: dict, integration_id: str) -> dict | None:
        """An installed application's bindings as the portal lists them (`event.get`): the offline events
        bound, and any of ours missing (an update of the application that was not installed again drops
        them: install it again). None for an incoming-webhook integration (its outgoing webhook is the
        portal's setting, not listed through REST)."""
        if (integration.get("connection") or {}).get("auth") != "oauth" or integration.get("disabled"):
            return None  # an uninstalled application's tokens are dead: the portal is not asked
        from .app_events import OFFLINE_EVENTS
        bound = self.client_for(integration).call("event.get").get("result") or []
        offline = sorted({str(b.get("event", "")).upper() for b in bound
                          if isinstance(b, dict) and str(b.get("offline", "0")) in ("1", "true", "True")})
        online = sorted({str(b.get("event", "")).upper() for b in bound
                         if isinstance(b, dict) and str(b.get("offline", "0")) not in ("1", "true", "True")})
        missing = sorted(set(OFFLINE_EVENTS) - set(offline)) + sorted({"ONOFFLINEEVENT", "ONAPPUNINSTALL"} - set(online))
        return {"offline_events": offline, "missing": missing,
                **({"action": "install the application on the portal again: it binds them"} if missing else {})}

    def keep_alive(self, integration: dict) -> bool:
        """The daily refresh job: an installed application's refresh token refreshed once it has been idle
        for 30 days (it lives 180), so a portal without deals keeps its integration. False for others."""
        if (integration.get("connection") or {}).get("auth") != "oauth" or self._keep_alive is None:
            return False
        return self._keep_alive(integration)

    def snapshot(self, integration: dict, mapping: list[dict], refs: list[EntityRef],
                 attributes: list[dict] = ()) -> dict[tuple[str, str], EntityRows]:
        """Current rows of each ref (module docstring: what a sub-error makes of an entity). Raises
        `Transient` when any deal or contact could not be read for a reason that may pass."""
        client = self.client_for(integration)
        translation = _Translation(integration, mapping, attributes)
        deals, _ = _read_deals(client, [r.crm_id for r in refs if r.kind == ORDER], translation)
        rows = {(ORDER, deal_id): entity for deal_id, entity in deals.items()}
        contacts = [r.crm_id for r in refs if r.kind == CONTACT]
        for start in range(0, len(contacts), BATCH_LIMIT):
            chunk = contacts[start:start + BATCH_LIMIT]
            results, errors = client.batch({f"k{i}": ("crm.contact.get", {"id": cid}) for i, cid in enumerate(chunk)})
            for i, contact_id in enumerate(chunk):
                rows[(CONTACT, contact_id)] = _contact_entity(contact_id, results, errors, f"k{i}", translation)
        return rows

    def product_names(self, integration: dict, products: dict[str, dict]) -> dict[str, str]:
        """Catalogue names by id (`crm.product.list`); product rows usually carry them already. A list
        call answers one page of LIST_PAGE items, so the ids go LIST_PAGE to a sub-call, up to BATCH_LIMIT
        sub-calls to a `batch` request (before: one call, and the names past the first 50 were lost)."""
        ids = sorted({p for p in products if p.isascii() and p.isdigit()}, key=int)
        chunks = [ids[start:start + LIST_PAGE] for start in range(0, len(ids), LIST_PAGE)]
        client = self.client_for(integration) if chunks else None
        names: dict[str, str] = {}
        for start in range(0, len(chunks), BATCH_LIMIT):
            commands = {f"p{n}": ("crm.product.list", {"filter": {"ID": chunk}, "select": ["ID", "NAME"]})
                        for n, chunk in enumerate(chunks[start:start + BATCH_LIMIT])}
            results, errors = client.batch(commands)
            _raise_first(errors, "the names of products")
            for found in results.values():
                names.update({normalize_product_id(p["ID"]): p.get("NAME") or str(p["ID"])
                              for p in (found if isinstance(found, list) else [])})
        return names

    def catalog(self, integration: dict) -> dict[str, str]:
        """Every catalogue product (`crm.product.list`, all pages)."""
        client = self.client_for(integration)
        return {normalize_product_id(p["ID"]): p.get("NAME") or str(p["ID"])
                for p in client.all_items("crm.product.list", {"order": {"ID": "ASC"}, "select": ["ID", "NAME"]})}

    def backfill_page(self, integration: dict, mapping: list[dict], attributes: list[dict], phase: str,
                      since: int, cursor: dict | None) -> BackfillPage:
        """Id-ordered list pages fetched many at a time in one `batch` (offsets from the last id seen,
        so entities changed meanwhile keep their place); for deals a second batch reads their
        contacts, source leads and product rows in lists of 50 ids. A list sub-call that fails fails
        the page (raised, `Transient` first). A deal whose contact or lead the lists left out (deleted,
        or not visible to the webhook's user: lists do not say which) is read again as a snapshot is,
        so an unreadable contact parks the deal instead of sending it with a synthetic customer."""
        client = self.client_for(integration)
        after = int((cursor or {}).get("after_id", 0))
        since_iso = datetime.fromtimestamp(since, timezone.utc).isoformat()
        method, size = ("crm.contact.list", BACKFILL_CONTACTS) if phase == "contacts" else ("crm.deal.list", BACKFILL_DEALS)
        query = {"filter": {">ID": after, ">=DATE_MODIFY": since_iso}, "order": {"ID": "ASC"},
                 "select": CONTACT_SELECT if phase == "contacts" else ["*", "UF_*"]}
        results, errors, _, totals = client.batch_pages({f"p{n}": (method, {**query, "start": n * LIST_PAGE})
                                                         for n in range(size // LIST_PAGE)})
        _raise_first(errors, f"{method} pages")
        items = sorted((i for n in range(size // LIST_PAGE) for i in results.get(f"p{n}") or []), key=lambda i: int(i["ID"]))
        items = list({i["ID"]: i for i in items}.values())
        requests = 1
        translation = _Translation(integration, mapping, attributes)
        rows: dict[tuple[str, str], EntityRows] = {}
        if phase == "contacts":
            for contact in items:
                rows[(CONTACT, str(contact["ID"]))] = translation.contact(contact)
        elif items:
            related, calls = self._deal_relations(client, items)
            requests += calls
            unsure = [str(d["ID"]) for d in items
                      if (_ref(d.get("CONTACT_ID")) and _ref(d.get("CONTACT_ID")) not in related["contacts"])
                      or (_ref(d.get("LEAD_ID")) and _ref(d.get("LEAD_ID")) not in related["leads"])]
            reread, calls = _read_deals(client, unsure, translation)
            requests += calls
            for deal in items:
                deal_id = str(deal["ID"])
                if deal_id in reread:
                    rows[(ORDER, deal_id)] = reread[deal_id]
                    continue
                rows[(ORDER, deal_id)] = translation.deal(
                    deal, contact=related["contacts"].get(_ref(deal.get("CONTACT_ID"))),
                    lead=related["leads"].get(_ref(deal.get("LEAD_ID"))), product_rows=related["rows"].get(deal_id, []))
        kind = CONTACT if phase == "contacts" else ORDER
        times = {(kind, str(i["ID"])): int(datetime.fromisoformat(i["DATE_MODIFY"]).timestamp()) for i in items}
        done = len(items) < size
        return BackfillPage(rows, times, None if done else {"after_id": int(items[-1]["ID"])}, requests=requests,
                            total=totals.get("p0"))

    def _deal_relations(self, client: Bitrix24Client, deals: list[dict]) -> tuple[dict, int]:
        """Contacts, source leads and product rows of these deals, 50 ids per list call, in one batch
        (plus one per further page of product rows). A failed list sub-call raises."""
        wanted = {"contacts": sorted({_ref(d.get("CONTACT_ID")) for d in deals} - {None}),
                  "leads": sorted({_ref(d.get("LEAD_ID")) for d in deals} - {None}),
                  "rows": [str(d["ID"]) for d in deals]}
        commands: dict[str, tuple[str, dict]] = {}
        for name, ids in wanted.items():
            for n in range(0, len(ids), LIST_PAGE):
                chunk = ids[n:n + LIST_PAGE]
                if name == "contacts":
                    commands[f"c{n}"] = ("crm.contact.list", {"filter": {"ID": chunk}, "select": CONTACT_SELECT})
                elif name == "leads":
                    commands[f"l{n}"] = ("crm.lead.list", {"filter": {"ID": chunk}, "select": ["*", "UF_*"]})
                else:
                    commands[f"r{n}"] = ("crm.item.productrow.list", {"filter": {"=ownerType": "D", "=ownerId": chunk}})
        related: dict[str, dict] = {"contacts": {}, "leads": {}, "rows": {}}
        calls = 0
        while commands:
            keys = list(commands)[:BATCH_LIMIT]
            results, errors, following, _ = client.batch_pages({k: commands[k] for k in keys})
            calls += 1
            _raise_first(errors, "the contacts, leads and product rows of a page of deals")
            for key in keys:
                method, params = commands.pop(key)
                result = results.get(key) or []
                if key.startswith("c"):
                    related["contacts"].update({str(c["ID"]): c for c in result})
                elif key.startswith("l"):
                    related["leads"].update({str(lead["ID"]): lead for lead in result})
                else:
                    for row in (result.get("productRows") if isinstance(result, dict) else result) or []:
                        related["rows"].setdefault(str(row["ownerId"]), []).append(from_item_product_row(row))
                    if following.get(key):  # more than 50 rows for these deals: read the next page
                        commands[f"{key}+"] = (method, {**params, "start": following[key]})
        return related, calls

    def default_mapping(self, integration: dict) -> list[dict]:
        client = self.client_for(integration)
        return default_mapping(list(client.deal_stages()), client.deal_categories())

    def fields(self, integration: dict) -> list[dict]:
        """The fields a custom attribute can be read from, for the console: deals' (orders) and contacts',
        by code. A user field's name is its label (its `title` is the code)."""
        client = self.client_for(integration)
        listed = []
        for entity, method in (("order", "crm.deal.fields"), ("contact", "crm.contact.fields")):
            for code, field in client.entity_fields(method).items():
                field = field if isinstance(field, dict) else {}
                name = field.get("listLabel") or field.get("formLabel") or field.get("title") or code
                listed.append({"id": str(code), "name": str(name), "code": str(code), "entity": entity,
                               "type": field.get("type")})
        return listed

    def changed_since(self, integration: dict, since: int) -> list[EntityRef]:
        """Deals modified since `since` (Unix seconds), for reconciliation."""
        iso = datetime.fromtimestamp(since, timezone.utc).isoformat()
        return [EntityRef(ORDER, str(d["ID"]), int(datetime.fromisoformat(d["DATE_MODIFY"]).timestamp()), "reconcile")
                for d in self.client_for(integration).deals_modified_since(iso)]


class _Translation:
    """The pure translation with one integration's settings and one clock. Bitrix24's REST API documents
    no portal country, so phones are read in the integration's `phone_region`, else Russia."""

    def __init__(self, integration: dict, mapping: list[dict], attributes: list[dict]) -> None:
        self.field = integration.get("client_id_field") or DEFAULT_CLIENT_ID_FIELD
        self.phone_region = integration.get("phone_region") or DEFAULT_PHONE_REGION
        self.cost_field = integration.get("cost_field") or None
        self.currency = integration.get("currency") or None  # for a deal that names no CURRENCY_ID
        self.mapping, self.attributes = mapping, attributes
        self.now = datetime.now(timezone.utc)

    def deal(self, deal: dict, *, contact: dict | None, lead: dict | None, product_rows: list[dict]) -> EntityRows:
        return deal_rows(deal, contact=contact, lead=lead, product_rows=product_rows, mapping=self.mapping,
                         client_id_field=self.field, now=self.now, attributes=self.attributes,
                         phone_region=self.phone_region, cost_field=self.cost_field, currency=self.currency)

    def contact(self, contact: dict) -> EntityRows:
        row, notes = contact_row(contact, self.field, self.now, attributes=self.attributes,
                                 phone_region=self.phone_region)
        return EntityRows(contacts=[row], notes=notes)


def _read_deals(client: Bitrix24Client, deal_ids: list[str], translation: _Translation) -> tuple[dict[str, EntityRows], int]:
    """Each deal with its product rows, contact and source lead: CALLS_PER_DEAL chained sub-calls a deal,
    as many deals as fit one batch. Returns the rows by deal id and the requests spent."""
    rows: dict[str, EntityRows] = {}
    per_batch = BATCH_LIMIT // CALLS_PER_DEAL
    calls = 0
    for start in range(0, len(deal_ids), per_batch):
        chunk = deal_ids[start:start + per_batch]
        commands: dict[str, tuple[str, dict]] = {}
        for i, deal_id in enumerate(chunk):
            commands[f"d{i}"] = ("crm.deal.get", {"id": deal_id})
            commands[f"r{i}"] = ("crm.deal.productrows.get", {"id": deal_id})
            commands[f"c{i}"] = ("crm.contact.get", {"id": f"$result[d{i}][CONTACT_ID]"})
            commands[f"l{i}"] = ("crm.lead.get", {"id": f"$result[d{i}][LEAD_ID]"})
        results, errors = client.batch(commands)
        calls += 1
        for i, deal_id in enumerate(chunk):
            rows[deal_id] = _deal_entity(deal_id, i, results, errors, translation)
    return rows, calls


def _deal_entity(deal_id: str, i: int, results: dict, errors: dict, translation: _Translation) -> EntityRows:
    """One deal from its sub-calls `d{i}`, `r{i}`, `c{i}`, `l{i}`; raises `Transient` (module docstring)."""
    try:
        deal = _sub_result(results, errors, f"d{i}", f"deal {deal_id}")
        if isinstance(deal, NotFound):
            return EntityRows(gone=True)  # deleted: the only answer that means so
        if not isinstance(deal, dict):
            raise Transient(f"Bitrix24 crm.deal.get answered something other than a deal for deal {deal_id}",
                            source=SOURCE)
        contact = _related(results, errors, f"c{i}", deal.get("CONTACT_ID"), f"contact {{}} of deal {deal_id}")
        lead = _related(results, errors, f"l{i}", deal.get("LEAD_ID"), f"source lead {{}} of deal {deal_id}")
        product_rows = _sub_result(results, errors, f"r{i}", f"the product rows of deal {deal_id}")
    except Transient:
        raise
    except BridgeError as exc:  # refused: park this deal with the reason, never send it incomplete
        return EntityRows(error=exc.describe())
    product_rows = [] if isinstance(product_rows, NotFound) else product_rows or []
    return translation.deal(deal, contact=contact, lead=lead, product_rows=product_rows)


def _contact_entity(contact_id: str, results: dict, errors: dict, key: str, translation: _Translation) -> EntityRows:
    try:
        contact = _sub_result(results, errors, key, f"contact {contact_id}")
    except Transient:
        raise
    except BridgeError as exc:
        return EntityRows(error=exc.describe())
    if isinstance(contact, NotFound):
        return EntityRows(gone=True)
    if not isinstance(contact, dict):
        raise Transient(f"Bitrix24 crm.contact.get answered something other than a contact for contact {contact_id}",
                        source=SOURCE)
    return translation.contact(contact)


def _sub_result(results: dict, errors: dict, key: str, what: str) -> Any:
    """A sub-call's result, or `NotFound`; raises its other error, reworded to name `what`."""
    failure = errors.get(key)
    if isinstance(failure, NotFound):
        return failure
    if isinstance(failure, BridgeError):
        raise _about(failure, what)
    if key not in results:
        raise Transient(f"Bitrix24 batch answered neither a result nor an error for {what}", source=SOURCE)
    return results[key]


def _related(results: dict, errors: dict, key: str, ref: Any, what: str) -> dict | None:
    """The contact or lead a deal names (`what` has a `{}` for its id), None when it names none or the
    entity does not exist; raises any other error of its sub-call. When the deal names none, the chained
    sub-call fails as expected (its id is empty) and is not looked at."""
    entity_id = _ref(ref)
    if entity_id is None:
        return None
    value = _sub_result(results, errors, key, what.format(entity_id))
    return value if isinstance(value, dict) and value else None


def _ref(value: Any) -> str | None:
    """A linked entity's id; None for no link (null, "" or "0", as Bitrix24 writes it)."""
    text = str(value if value is not None else "").strip()
    return None if text in ("", "0") else text


def _about(exc: BridgeError, what: str) -> BridgeError:
    """The same error, saying which read failed."""
    return type(exc)(f"reading {what}: {exc.message}", source=exc.source, status=exc.status, errors=exc.errors,
                     retry_after=exc.retry_after, daily_quota=exc.daily_quota)


def _raise_first(errors: dict, what: str) -> None:
    """Raise the failure of a batch whose every sub-call is needed: a `Transient` one first (retrying
    later may clear the rest), else the first; a "Not found" of a list call is `Permanent`."""
    failures = [e if isinstance(e, BridgeError) else Permanent(f"Bitrix24 {e.method} answered {e.description}",
                                                                source=SOURCE)
                for e in errors.values()]
    if failures:
        first = next((e for e in failures if isinstance(e, Transient)), failures[0])
        raise _about(first, what)
