"""The Bitrix24 `CrmSource`: deals with product rows, contact and source lead in `batch` calls, then
the pure translation. REST calls are spaced for the portal's 2-requests-a-second leaky bucket."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

from .. import CONTACT, ORDER, EntityRef, EntityRows, slot_waiter
from .api import BATCH_LIMIT, MIN_INTERVAL, Bitrix24Client
from .translate import contact_row, deal_rows, default_mapping

DEFAULT_CLIENT_ID_FIELD = "UF_CRM_YM_CLIENT_ID"
CALLS_PER_DEAL = 4  # deal, product rows, contact, source lead


class Bitrix24Source:
    def __init__(self, reserve_slot: Callable[[str, float, float], float], **client_options: Any) -> None:
        self._reserve_slot = reserve_slot
        self._client_options = client_options

    def client_for(self, integration: dict) -> Bitrix24Client:
        url = integration["connection"]["webhook_url"]
        # The bucket is per portal: every webhook and app on it shares the budget (§16).
        scope = "bitrix24:" + hashlib.sha256((urlsplit(url).hostname or "").encode()).hexdigest()[:16]
        wait_for_slot = slot_waiter(self._reserve_slot, scope, MIN_INTERVAL)
        return Bitrix24Client(url, wait_for_slot=wait_for_slot, **self._client_options)

    def snapshot(self, integration: dict, mapping: list[dict], refs: list[EntityRef]) -> dict[tuple[str, str], EntityRows]:
        client = self.client_for(integration)
        field = integration.get("client_id_field") or DEFAULT_CLIENT_ID_FIELD
        now = datetime.now(timezone.utc)
        rows: dict[tuple[str, str], EntityRows] = {}
        deals = [r.crm_id for r in refs if r.kind == ORDER]
        per_batch = BATCH_LIMIT // CALLS_PER_DEAL
        for start in range(0, len(deals), per_batch):
            commands: dict[str, tuple[str, dict]] = {}
            for i, deal_id in enumerate(deals[start:start + per_batch]):
                commands[f"d{i}"] = ("crm.deal.get", {"id": deal_id})
                commands[f"r{i}"] = ("crm.deal.productrows.get", {"id": deal_id})
                commands[f"c{i}"] = ("crm.contact.get", {"id": f"$result[d{i}][CONTACT_ID]"})
                commands[f"l{i}"] = ("crm.lead.get", {"id": f"$result[d{i}][LEAD_ID]"})
            results, _ = client.batch(commands)  # a missing contact or lead is an expected sub-error
            for i, deal_id in enumerate(deals[start:start + per_batch]):
                deal = results.get(f"d{i}")
                if not deal:
                    rows[(ORDER, deal_id)] = EntityRows(gone=True)  # "Not found": deleted
                    continue
                rows[(ORDER, deal_id)] = deal_rows(deal, contact=results.get(f"c{i}") or None,
                                                   lead=results.get(f"l{i}") or None,
                                                   product_rows=results.get(f"r{i}") or [], mapping=mapping,
                                                   client_id_field=field, now=now)
        contacts = [r.crm_id for r in refs if r.kind == CONTACT]
        for start in range(0, len(contacts), BATCH_LIMIT):
            chunk = contacts[start:start + BATCH_LIMIT]
            results, _ = client.batch({f"k{i}": ("crm.contact.get", {"id": cid}) for i, cid in enumerate(chunk)})
            for i, contact_id in enumerate(chunk):
                contact = results.get(f"k{i}")
                rows[(CONTACT, contact_id)] = (EntityRows(contacts=[contact_row(contact, field, now)]) if contact
                                               else EntityRows(gone=True))
        return rows

    def default_mapping(self, integration: dict) -> list[dict]:
        client = self.client_for(integration)
        return default_mapping(list(client.deal_stages()), client.deal_categories())

    def changed_since(self, integration: dict, since: int) -> list[EntityRef]:
        """Deals modified since `since` (Unix seconds), for reconciliation."""
        iso = datetime.fromtimestamp(since, timezone.utc).isoformat()
        return [EntityRef(ORDER, str(d["ID"]), int(datetime.fromisoformat(d["DATE_MODIFY"]).timestamp()), "reconcile")
                for d in self.client_for(integration).deals_modified_since(iso)]
