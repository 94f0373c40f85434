"""The amoCRM `CrmSource`: bulk reads through the API client, then the pure translation."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Callable

from .. import CONTACT, ORDER, EntityRef, EntityRows, slot_waiter
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

    def snapshot(self, integration: dict, mapping: list[dict], refs: list[EntityRef]) -> dict[tuple[str, str], EntityRows]:
        """Two to four requests for a whole batch: leads (with contacts and products), then contacts."""
        client = self.client_for(integration)
        field = integration.get("client_id_field") or DEFAULT_CLIENT_ID_FIELD
        lead_ids = [r.crm_id for r in refs if r.kind == ORDER]
        leads = {str(lead["id"]): lead for lead in client.leads(lead_ids)} if lead_ids else {}
        contact_ids = [str(cid) for cid in map(main_contact_id, leads.values()) if cid is not None]
        contact_ids += [r.crm_id for r in refs if r.kind == CONTACT]
        contacts = {c["id"]: c for c in client.contacts(contact_ids)} if contact_ids else {}
        now = datetime.now(timezone.utc)
        pipelines = None
        rows: dict[tuple[str, str], EntityRows] = {}
        for ref in refs:
            if ref.kind == ORDER:
                lead = leads.get(ref.crm_id)
                if lead is None:
                    rows[(ref.kind, ref.crm_id)] = EntityRows(gone=True)
                    continue
                entity = lead_rows(lead, contacts, mapping=mapping, client_id_field=field, now=now,
                                   currency=integration.get("currency"), pipelines=pipelines)
                if entity.error and pipelines is None:  # name the stage for the person who must map it
                    pipelines = {p["id"]: p for p in client.pipelines()}
                    entity = lead_rows(lead, contacts, mapping=mapping, client_id_field=field, now=now,
                                       currency=integration.get("currency"), pipelines=pipelines)
                rows[(ref.kind, ref.crm_id)] = entity
            else:
                contact = contacts.get(int(ref.crm_id))
                rows[(ref.kind, ref.crm_id)] = (EntityRows(gone=True) if contact is None
                                                else EntityRows(contacts=[contact_row(contact, field, now)]))
        return rows

    def default_mapping(self, integration: dict) -> list[dict]:
        """Proposed status mapping from the account's pipelines (142 → PAID, 143 → CANCELLED, the rest
        IN_PROGRESS)."""
        return default_mapping(self.client_for(integration).pipelines())

    def changed_since(self, integration: dict, since: int) -> list[EntityRef]:
        """Leads updated since `since` (Unix seconds), for reconciliation."""
        return [EntityRef(ORDER, str(lead["id"]), int(lead["updated_at"]), "reconcile")
                for lead in self.client_for(integration).leads_updated_since(since)]

    def webhook_health(self, integration: dict, integration_id: str) -> dict:
        """Our webhook as amoCRM lists it: registered, and not `disabled` after failed deliveries (§8.3)."""
        mine = [h for h in self.client_for(integration).webhooks()
                if f"/webhooks/amocrm/{integration_id}" in str(h.get("destination", ""))]
        return {"registered": bool(mine), "disabled": any(h.get("disabled") for h in mine),
                "events": sorted({e for h in mine for e in h.get("settings") or []})}
