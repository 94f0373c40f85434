"""Bitrix24 REST records → raw Metrika rows (validated later by `metrika.schemas`). Pure; no I/O.

Sources (Bitrix24 REST documentation):

* Deal fields (`STAGE_ID`, `OPPORTUNITY`, `LEAD_ID`, `UF_CRM_*`, multiple fields as arrays) —
  "Get Deal by Id crm.deal.get", https://apidocs.bitrix24.com/api-reference/crm/deals/crm-deal-get.html
* Contacts and their `PHONE` / `EMAIL` multi-fields — "Get Contact by Id crm.contact.get",
  https://apidocs.bitrix24.com/api-reference/crm/contacts/crm-contact-get.html
* Product rows — "Get Deal Products crm.deal.productrows.get",
  https://apidocs.bitrix24.com/api-reference/crm/deals/crm-deal-productrows-get.html, and
  "Get Product Rows of the CRM Object crm.item.productrow.list",
  https://apidocs.bitrix24.com/api-reference/crm/universal/product-rows/crm-item-productrow-list.html
* Stages and their semantics — "Get a List of Directory Items by Filter crm.status.list",
  https://apidocs.bitrix24.com/api-reference/crm/status/crm-status-list.html
* Dates (ISO 8601 with the portal's offset) — "Data Types and Parameter Formats in REST API",
  https://apidocs.bitrix24.com/api-reference/data-types.html

Bitrix24 has no standard ClientID field: it is read from a configured `UF_CRM_…` field on the deal,
its source lead, or the contact. Nor does its REST API document a portal country: phones are read as
written in the integration's `phone_region`, else Russia. Orders carry the deal's own `CURRENCY_ID`,
else (a deal that names none) the integration's `currency`.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from .. import EntityRows, unmapped_stage
from ..notes import merge_notes, order_cost, phone_notes
from ...normalize import (
    DEFAULT_PHONE_REGION,
    keep_valid,
    normalize_client_id,
    normalize_email,
    normalize_product_id,
    parse_decimal,
    split_phones,
)
from ...status_mapping import status_for

SYNTHETIC_CONTACT_PREFIX = "deal-"


def _time(value: Any, now: datetime) -> datetime | None:
    """ISO 8601 with the portal's offset → aware, never later than now."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return min(parsed, now)


def client_ids(record: dict | None, field: str) -> list[str]:
    """ClientIDs from a `UF_CRM_*` field (string or, for multiple fields, a list), kept as strings."""
    value = (record or {}).get(field)
    values = value if isinstance(value, list) else [value]
    return keep_valid((str(v).strip() for v in values if v not in (None, "", False)), normalize_client_id)



def _multi(record: dict, key: str) -> list[str]:
    return [str(item.get("VALUE")) for item in record.get(key) or [] if item.get("VALUE")]


def attribute_values(record: dict | None, attributes: Iterable[dict], entity: str) -> dict[str, list]:
    """Raw values of the mapped fields (`UF_CRM_…`, `SOURCE_ID`, …) for `entity`, by Metrika attribute
    name; multiple fields come back as arrays ("Get Deal by Id crm.deal.get"). Typed and checked later
    by the row schema."""
    out: dict[str, list] = {}
    for attribute in attributes:
        if attribute["entity"] == entity:
            value = (record or {}).get(attribute["crm_field"])
            values = value if isinstance(value, list) else [value]
            out[attribute["name"]] = [v for v in values if v not in (None, "", False)]
    return out


def contact_row(contact: dict, field: str, now: datetime, extra_client_ids: Iterable[str] = (),
                attributes: Iterable[dict] = (), *, phone_region: str = DEFAULT_PHONE_REGION) -> tuple[dict, dict]:
    """A contact → (its row, notes on what was left out: phones that are not valid numbers in
    `phone_region`, masked)."""
    name = " ".join(p for p in (contact.get("NAME"), contact.get("SECOND_NAME"), contact.get("LAST_NAME")) if p)
    uniq_id = str(contact["ID"])
    phones, dropped = split_phones(_multi(contact, "PHONE"), region=phone_region)
    row = {"uniq_id": uniq_id, "name": name or None,
           "create_date_time": _time(contact.get("DATE_CREATE"), now),
           "update_date_time": _time(contact.get("DATE_MODIFY"), now),
           "phones": phones,
           "emails": keep_valid(_multi(contact, "EMAIL"), normalize_email),
           "client_ids": keep_valid([*client_ids(contact, field), *extra_client_ids], normalize_client_id),
           "attribute_values": attribute_values(contact, attributes, "contact")}
    return {k: v for k, v in row.items() if v not in (None, [], {})}, phone_notes(uniq_id, dropped)


def product_id(row: dict) -> str:
    """Catalogue products by id; free-text rows (PRODUCT_ID 0) by row id, both fitting ^[\\w-:]+$."""
    if str(row.get("PRODUCT_ID") or "0") != "0":
        return normalize_product_id(row["PRODUCT_ID"])
    return normalize_product_id(f"row-{row.get('ID')}")


def deal_rows(deal: dict, *, contact: dict | None, lead: dict | None, product_rows: list[dict],
              mapping: list[dict], client_id_field: str, now: datetime,
              stage_names: dict[str, str] | None = None, attributes: Iterable[dict] = (),
              phone_region: str = DEFAULT_PHONE_REGION, cost_field: str | None = None,
              currency: str | None = None) -> EntityRows:
    """A deal → its contact (or one made from the deal) and its order. The ClientID is looked up on
    the deal, then its source lead (`LEAD_ID`), then the contact. `cost_field` names a deal field
    (`UF_CRM_COST`; a money field's `1500|RUB` is read too) whose value becomes the order's `cost`; one
    that is not an amount is left out and noted, the order still goes. The order's currency is the deal's
    `CURRENCY_ID`, else `currency` (the integration's)."""
    stage = str(deal.get("STAGE_ID") or "")
    status = status_for(mapping, stage)
    if status is None:
        name = (stage_names or {}).get(stage)
        return unmapped_stage(stage, name)
    found = client_ids(deal, client_id_field) or client_ids(lead, client_id_field)
    notes: dict = {}
    parts = {}  # the contact's own row and the deal's ClientIDs, kept apart (`EntityRows.contact_parts`)
    if contact is not None:
        customer, notes = contact_row(contact, client_id_field, now, extra_client_ids=found, attributes=attributes,
                                      phone_region=phone_region)
        parts[customer["uniq_id"]] = (contact_row(contact, client_id_field, now, attributes=attributes,
                                                  phone_region=phone_region)[0], found)
    else:
        customer = {"uniq_id": f"{SYNTHETIC_CONTACT_PREFIX}{deal['ID']}", "name": deal.get("TITLE") or None,
                    "create_date_time": _time(deal.get("DATE_CREATE"), now), "client_ids": found}
        customer = {k: v for k, v in customer.items() if v not in (None, [])}
    try:  # people type amounts: one that is not a number parks this deal, naming the field
        revenue = _amount(deal, "OPPORTUNITY")
        quantities = [_amount(row, "QUANTITY") or 0 for row in product_rows]
    except ValueError as exc:
        return EntityRows(error={"kind": "permanent", "code": "bad_value", "message": f"deal {deal.get('ID')}: {exc}"})
    products: dict[str, Any] = {}
    names: dict[str, dict] = {}
    for row, quantity in zip(product_rows, quantities):
        products[product_id(row)] = products.get(product_id(row), 0) + quantity
        names[product_id(row)] = {"name": row.get("PRODUCT_NAME") or None}
    closed = deal.get("CLOSED") == "Y"
    currency = str(deal.get("CURRENCY_ID") or "").strip().upper() or currency or None
    cost_value = deal.get(cost_field) if cost_field else None
    cost, cost_notes = order_cost(cost_value if isinstance(cost_value, list) else [cost_value], currency)
    order = {"id": str(deal["ID"]), "client_uniq_id": customer["uniq_id"], "order_status": status,
             "create_date_time": _time(deal.get("DATE_CREATE"), now),
             "update_date_time": _time(deal.get("DATE_MODIFY"), now),
             "finish_date_time": _time(deal.get("MOVED_TIME"), now) if closed else None,
             "revenue": revenue,
             "cost": cost,
             "currency": currency,
             "products": products,
             "attribute_values": attribute_values(deal, attributes, "order")}
    return EntityRows(contacts=[customer], orders=[{k: v for k, v in order.items() if v not in (None, {})}],
                      products=names, notes=merge_notes(notes, cost_notes), contact_parts=parts)


def _amount(record: dict, field: str) -> Any:
    try:
        return parse_decimal(record.get(field))
    except ValueError:
        raise ValueError(f"{field} {str(record.get(field))[:40]!r} is not a number") from None


def from_item_product_row(row: dict) -> dict:
    """A `crm.item.productrow.list` row (camelCase) in the shape of `crm.deal.productrows.get` (upper-case
    keys), so both paths translate, and hash, alike."""
    return {"ID": row.get("id"), "OWNER_ID": row.get("ownerId"), "PRODUCT_ID": row.get("productId"),
            "PRODUCT_NAME": row.get("productName"), "PRICE": row.get("price"), "QUANTITY": row.get("quantity")}


def default_mapping(stages: list[dict], funnels: dict[str, str] | None = None) -> list[dict]:
    """Every stage of every funnel: semantics S → PAID, F → CANCELLED, others IN_PROGRESS. The Metrika
    id is the stage id itself (`WON`, `C2:WON` fit ^[\\w-:]+$), labelled "funnel: stage"."""
    types = {"S": "PAID", "F": "CANCELLED"}
    entries = []
    for stage in stages:
        semantics = stage.get("SEMANTICS") or (stage.get("EXTRA") or {}).get("SEMANTICS", "")
        semantics = {"success": "S", "failure": "F"}.get(semantics, semantics)
        funnel = (funnels or {}).get(str(stage.get("CATEGORY_ID") or "0"))
        humanized = f"{funnel}: {stage.get('NAME', '')}" if funnel else stage.get("NAME", "")
        entries.append({"crm_status": stage["STATUS_ID"], "metrika_status_id": stage["STATUS_ID"],
                        "humanized": humanized[:4096] or stage["STATUS_ID"], "type": types.get(semantics, "IN_PROGRESS")})
    return entries
