"""The amoCRM `CrmSource`: bulk reads through the API client, then the pure translation. Every failure
reaches the caller as the error taxonomy with source "amocrm", raised by the client (`api.classify`)."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Callable

from ...metrika.schemas import normalize_product_id
from .. import CONTACT, ORDER, BackfillPage, EntityRef, EntityRows, slot_waiter
from .api import MIN_INTERVAL, AmoCrmClient
from .translate import contact_row, default_mapping, lead_rows, main_contact_id

DEFAULT_CLIENT_ID_FIELD = "_YM_UID"


class AmoCrmSource:
    """`reserve_slot(scope, interval, now) -> start time` is the shared rate limiter (DynamoDB), so
    every worker together stays under 7 requests a second per amoCRM token."""

    def __init__(self, reserve_slot: Callable[[str, float, float], float], **client_options: Any) -> None:
        self._reserve_slot = reserve_slot
        self._client_options = client_options

    def client_for(self, integration: dict) -> AmoCrmClient:
        connection = integration["connection"]
        scope = "amocrm:" + hashlib.sha256(f"{connection['base_url']}|{connection['access_token']}".encode()).hexdigest()[:16]
        wait_for_slot = slot_waiter(self._reserve_slot, scope, MIN_INTERVAL)
        return AmoCrmClient(connection["base_url"], connection["access_token"], wait_for_slot=wait_for_slot,
                            **self._client_options)

    def snapshot(self, integration: dict, mapping: list[dict], refs: list[EntityRef],
                 attributes: list[dict] = ()) -> dict[tuple[str, str], EntityRows]:
        """Two to four requests for a whole batch: leads (with contacts and products), then contacts."""
        client = self.client_for(integration)
        lead_ids = [r.crm_id for r in refs if r.kind == ORDER]
        leads = {str(lead["id"]): lead for lead in client.leads(lead_ids)} if lead_ids else {}
        rows = self._lead_entities(client, integration, mapping, attributes, list(leads.values()),
                                   [r.crm_id for r in refs if r.kind == CONTACT])
        for ref in refs:
            rows.setdefault((ref.kind, ref.crm_id), EntityRows(gone=True))
        return rows

    def _lead_entities(self, client: AmoCrmClient, integration: dict, mapping: list[dict], attributes: list[dict],
                       leads: list[dict], contact_ids: list[str]) -> dict[tuple[str, str], EntityRows]:
        """Leads (with their main contacts, read in bulk) and contacts → rows, keyed by (kind, id)."""
        field = integration.get("client_id_field") or DEFAULT_CLIENT_ID_FIELD
        wanted = [str(cid) for cid in map(main_contact_id, leads) if cid is not None] + contact_ids
        contacts = {c["id"]: c for c in client.contacts(wanted)} if wanted else {}
        now = datetime.now(timezone.utc)
        pipelines = None
        rows: dict[tuple[str, str], EntityRows] = {}
        for lead in leads:
            options = dict(mapping=mapping, client_id_field=field, now=now, currency=integration.get("currency"),
                           attributes=attributes)
            entity = lead_rows(lead, contacts, pipelines=pipelines, **options)
            if entity.error and pipelines is None:  # name the stage for the person who must map it
                pipelines = {p["id"]: p for p in client.pipelines()}
                entity = lead_rows(lead, contacts, pipelines=pipelines, **options)
            rows[(ORDER, str(lead["id"]))] = entity
        for contact_id in contact_ids:
            contact = contacts.get(int(contact_id))
            if contact is not None:
                rows[(CONTACT, contact_id)] = EntityRows(contacts=[contact_row(contact, field, now, attributes=attributes)])
        return rows

    def product_names(self, integration: dict, products: dict[str, dict]) -> dict[str, str]:
        """Names of linked catalog elements, one bulk read per catalog
        (https://www.amocrm.ru/developers/content/crm_platform/catalogs-api "Каталоги")."""
        client = self.client_for(integration)
        by_catalog: dict[Any, list[str]] = {}
        for hint in products.values():
            if hint.get("catalog_id") and hint.get("element_id"):
                by_catalog.setdefault(hint["catalog_id"], []).append(str(hint["element_id"]))
        return {normalize_product_id(e["id"]): e.get("name") or str(e["id"])
                for catalog_id, ids in by_catalog.items() for e in client.catalog_elements(catalog_id, ids)}

    def catalog(self, integration: dict) -> dict[str, str]:
        """Every element of the account's product catalogs (`type` products)."""
        client = self.client_for(integration)
        return {normalize_product_id(e["id"]): e.get("name") or str(e["id"])
                for c in client.catalogs() if c.get("type") == "products"
                for e in client.all_catalog_elements(c["id"])}

    def backfill_page(self, integration: dict, mapping: list[dict], attributes: list[dict], phase: str,
                      since: int, cursor: dict | None) -> BackfillPage:
        """One API page (250) of contacts, or of leads plus one bulk read of their main contacts."""
        client = self.client_for(integration)
        page = (cursor or {}).get("page", 1)
        entity = "contacts" if phase == "contacts" else "leads"
        items, more = client.page(entity, since, page, with_=None if phase == "contacts" else "contacts,catalog_elements")
        if phase == "contacts":
            field, now = integration.get("client_id_field") or DEFAULT_CLIENT_ID_FIELD, datetime.now(timezone.utc)
            rows = {(CONTACT, str(c["id"])): EntityRows(contacts=[contact_row(c, field, now, attributes=attributes)])
                    for c in items}
        else:
            rows = self._lead_entities(client, integration, mapping, attributes, items, [])
        kind = CONTACT if phase == "contacts" else ORDER
        times = {(kind, str(i["id"])): int(i.get("updated_at") or 0) for i in items}
        requests = 1 + (phase != "contacts" and any(main_contact_id(i) for i in items))
        return BackfillPage(rows, times, {"page": page + 1} if more else None, requests=requests)

    def default_mapping(self, integration: dict) -> list[dict]:
        """Proposed status mapping from the account's pipelines (142 → PAID, 143 → CANCELLED, the rest
        IN_PROGRESS)."""
        return default_mapping(self.client_for(integration).pipelines())

    def changed_since(self, integration: dict, since: int) -> list[EntityRef]:
        """Leads updated since `since` (Unix seconds), for reconciliation."""
        return [EntityRef(ORDER, str(lead["id"]), int(lead["updated_at"]), "reconcile")
                for lead in self.client_for(integration).leads_updated_since(since)]

    def webhook_health(self, integration: dict, integration_id: str) -> dict:
        """Our webhook as amoCRM lists it: registered, and not `disabled` after failed deliveries
        (https://www.amocrm.ru/developers/content/crm_platform/webhooks-api, the webhook list with its
        `disabled` flag)."""
        mine = [h for h in self.client_for(integration).webhooks()
                if f"/webhooks/amocrm/{integration_id}" in str(h.get("destination", ""))]
        return {"registered": bool(mine), "disabled": any(h.get("disabled") for h in mine),
                "events": sorted({e for h in mine for e in h.get("settings") or []})}
