"""The Bitrix24 `CrmSource`: deals with product rows, contact and source lead in `batch` calls, then
the pure translation. REST calls are spaced for the portal's 2-requests-a-second leaky bucket."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

from ...metrika.schemas import normalize_product_id
from .. import CONTACT, ORDER, BackfillPage, EntityRef, EntityRows, slot_waiter
from .api import BATCH_LIMIT, MIN_INTERVAL, Bitrix24Client
from .translate import contact_row, deal_rows, default_mapping, from_item_product_row

DEFAULT_CLIENT_ID_FIELD = "UF_CRM_YM_CLIENT_ID"
CALLS_PER_DEAL = 4  # deal, product rows, contact, source lead
LIST_PAGE = 50  # items per page of a list method (§16)
# History import: deals per step. Their list pages and then their contacts, leads and product rows
# (three lists per 50 deals) each fit one batch request.
BACKFILL_DEALS = 16 * LIST_PAGE
BACKFILL_CONTACTS = BATCH_LIMIT * LIST_PAGE
CONTACT_SELECT = ["*", "UF_*", "PHONE", "EMAIL"]  # `*` alone leaves out UF and multi-fields (§16)


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

    def snapshot(self, integration: dict, mapping: list[dict], refs: list[EntityRef],
                 attributes: list[dict] = ()) -> dict[tuple[str, str], EntityRows]:
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
                                                   client_id_field=field, now=now, attributes=attributes)
        contacts = [r.crm_id for r in refs if r.kind == CONTACT]
        for start in range(0, len(contacts), BATCH_LIMIT):
            chunk = contacts[start:start + BATCH_LIMIT]
            results, _ = client.batch({f"k{i}": ("crm.contact.get", {"id": cid}) for i, cid in enumerate(chunk)})
            for i, contact_id in enumerate(chunk):
                contact = results.get(f"k{i}")
                rows[(CONTACT, contact_id)] = (EntityRows(contacts=[contact_row(contact, field, now, attributes=attributes)])
                                               if contact else EntityRows(gone=True))
        return rows

    def product_names(self, integration: dict, products: dict[str, dict]) -> dict[str, str]:
        """Catalogue names by id (`crm.product.list`); product rows usually carry them already."""
        ids = [p for p in products if p.isdigit()]
        if not ids:
            return {}
        found = self.client_for(integration).call("crm.product.list", {"filter": {"ID": ids}, "select": ["ID", "NAME"]})
        return {normalize_product_id(p["ID"]): p.get("NAME") or str(p["ID"]) for p in found.get("result") or []}

    def catalog(self, integration: dict) -> dict[str, str]:
        """Every catalogue product (`crm.product.list`, all pages)."""
        client = self.client_for(integration)
        return {normalize_product_id(p["ID"]): p.get("NAME") or str(p["ID"])
                for p in client._list("crm.product.list", {"order": {"ID": "ASC"}, "select": ["ID", "NAME"]})}

    def backfill_page(self, integration: dict, mapping: list[dict], attributes: list[dict], phase: str,
                      since: int, cursor: dict | None) -> BackfillPage:
        """Id-ordered list pages fetched many at a time in one `batch` (offsets from the last id seen,
        so entities changed meanwhile keep their place); for deals a second batch reads their
        contacts, source leads and product rows in lists of 50 ids (§7, §15)."""
        client = self.client_for(integration)
        after = int((cursor or {}).get("after_id", 0))
        since_iso = datetime.fromtimestamp(since, timezone.utc).isoformat()
        method, size = ("crm.contact.list", BACKFILL_CONTACTS) if phase == "contacts" else ("crm.deal.list", BACKFILL_DEALS)
        query = {"filter": {">ID": after, ">=DATE_MODIFY": since_iso}, "order": {"ID": "ASC"},
                 "select": CONTACT_SELECT if phase == "contacts" else ["*", "UF_*"]}
        results, _, _, totals = client.batch_pages({f"p{n}": (method, {**query, "start": n * LIST_PAGE})
                                                    for n in range(size // LIST_PAGE)})
        items = sorted((i for n in range(size // LIST_PAGE) for i in results.get(f"p{n}") or []), key=lambda i: int(i["ID"]))
        items = list({i["ID"]: i for i in items}.values())
        requests = 1
        field = integration.get("client_id_field") or DEFAULT_CLIENT_ID_FIELD
        now = datetime.now(timezone.utc)
        rows: dict[tuple[str, str], EntityRows] = {}
        if phase == "contacts":
            for contact in items:
                rows[(CONTACT, str(contact["ID"]))] = EntityRows(contacts=[contact_row(contact, field, now, attributes=attributes)])
        elif items:
            related, calls = self._deal_relations(client, items)
            requests += calls
            for deal in items:
                rows[(ORDER, str(deal["ID"]))] = deal_rows(
                    deal, contact=related["contacts"].get(str(deal.get("CONTACT_ID"))),
                    lead=related["leads"].get(str(deal.get("LEAD_ID"))), product_rows=related["rows"].get(str(deal["ID"]), []),
                    mapping=mapping, client_id_field=field, now=now, attributes=attributes)
        kind = CONTACT if phase == "contacts" else ORDER
        times = {(kind, str(i["ID"])): int(datetime.fromisoformat(i["DATE_MODIFY"]).timestamp()) for i in items}
        done = len(items) < size
        return BackfillPage(rows, times, None if done else {"after_id": int(items[-1]["ID"])}, requests=requests,
                            total=totals.get("p0"))

    def _deal_relations(self, client: Bitrix24Client, deals: list[dict]) -> tuple[dict, int]:
        """Contacts, source leads and product rows of these deals, 50 ids per list call, in one batch
        (plus one per further page of product rows)."""
        wanted = {"contacts": sorted({str(d["CONTACT_ID"]) for d in deals if d.get("CONTACT_ID")}),
                  "leads": sorted({str(d["LEAD_ID"]) for d in deals if d.get("LEAD_ID")}),
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
            results, _, following, _ = client.batch_pages({k: commands[k] for k in keys})
            calls += 1
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

    def changed_since(self, integration: dict, since: int) -> list[EntityRef]:
        """Deals modified since `since` (Unix seconds), for reconciliation."""
        iso = datetime.fromtimestamp(since, timezone.utc).isoformat()
        return [EntityRef(ORDER, str(d["ID"]), int(datetime.fromisoformat(d["DATE_MODIFY"]).timestamp()), "reconcile")
                for d in self.client_for(integration).deals_modified_since(iso)]
