"""amoCRM API v4 records → raw Metrika rows (validated later by `metrika.schemas`). Pure; no I/O.

Sources (amoCRM developer documentation):

* Lead fields, `_embedded.contacts[].is_main`, `_embedded.catalog_elements` — "Сделки",
  https://www.amocrm.ru/developers/content/crm_platform/leads-api
* `custom_fields_values`, field types (Unix seconds for dates, bools for checkboxes) and the
  predefined `tracking_data` fields such as `_YM_UID` that carry the Metrika ClientID — "Поля и группы
  полей", https://www.amocrm.ru/developers/content/crm_platform/custom-fields
* Pipelines and the fixed statuses 142/143 — "Воронки и этапы",
  https://www.amocrm.ru/developers/content/crm_platform/leads_pipelines
* Catalog element names — "Списки", https://www.amocrm.ru/developers/content/crm_platform/catalogs-api
* The account's `country` and `currency` (the defaults for `phone_region` and orders' `currency`) —
  "Параметры аккаунта", https://www.amocrm.ru/developers/content/crm_platform/account-info (Kommo:
  "Account parameters", https://developers.kommo.com/reference/account-parameters)
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable

from .. import EntityRows, unmapped_stage
from ..notes import merge_notes, order_cost, phone_notes
from ...metrika.schemas import SCHEMA_ID
from ...normalize import (
    DEFAULT_PHONE_REGION,
    keep_valid,
    normalize_client_id,
    normalize_email,
    normalize_product_id,
    split_phones,
)
from ...status_mapping import status_for

WON, LOST = 142, 143
SYNTHETIC_CONTACT_PREFIX = "lead-"


def stage_key(pipeline_id: Any, status_id: Any) -> str:
    """Stages are identified by the pair: 142 and 143 exist, with the same ids, in every pipeline."""
    return f"{pipeline_id}:{status_id}"


def field_values(custom_fields: list[dict] | None, field: str, raw: bool = False) -> list[Any]:
    """Values of one custom field, matched by id (digits) or by code or name (case-insensitive).
    As strings, or with `raw` as amoCRM typed them (Unix ints for dates, bools for checkboxes: "Поля и
    группы полей")."""
    wanted = str(field).strip()
    out: list[Any] = []
    for item in custom_fields or []:
        if wanted.isascii() and wanted.isdigit():  # "²" and "٣" are isdigit() too: names, not ids
            match = str(item.get("field_id")) == wanted
        else:
            match = wanted.lower() in (str(item.get("field_code") or "").lower(), str(item.get("field_name") or "").lower())
        if match:
            out += [v["value"] if raw else str(v["value"])
                    for v in item.get("values") or [] if v.get("value") not in (None, "")]
    return out


def attribute_values(custom_fields: list[dict] | None, attributes: Iterable[dict], entity: str) -> dict[str, list]:
    """Raw values of the mapped custom fields for `entity` (contact/order), by Metrika attribute name;
    typed and checked later by the row schema."""
    return {a["name"]: field_values(custom_fields, a["crm_field"], raw=True) for a in attributes if a["entity"] == entity}



def _time(ts: Any, now: datetime) -> datetime | None:
    """Unix seconds → aware UTC, never later than now (amoCRM's clock may run ahead of ours)."""
    if ts in (None, "", 0):
        return None
    return min(datetime.fromtimestamp(int(ts), timezone.utc), now)


def contact_row(contact: dict, client_id_field: str, now: datetime, *, phone_region: str = DEFAULT_PHONE_REGION,
                extra_client_ids: Iterable[str] = (), attributes: Iterable[dict] = ()) -> tuple[dict, dict]:
    """A contact → (its row, notes on what was left out: phones that are not valid numbers in
    `phone_region`, masked)."""
    fields = contact.get("custom_fields_values")
    uniq_id = str(contact["id"])
    phones, dropped = split_phones(field_values(fields, "PHONE"), region=phone_region)
    row = {"uniq_id": uniq_id, "name": contact.get("name") or None,
           "create_date_time": _time(contact.get("created_at"), now),
           "update_date_time": _time(contact.get("updated_at"), now),
           "phones": phones,
           "emails": keep_valid(field_values(fields, "EMAIL"), normalize_email),
           "client_ids": keep_valid([*field_values(fields, client_id_field), *extra_client_ids], normalize_client_id),
           "attribute_values": attribute_values(fields, attributes, "contact")}
    return {k: v for k, v in row.items() if v not in (None, [], {})}, phone_notes(uniq_id, dropped)


def contact_entity(contact: dict, client_id_field: str, now: datetime, *, phone_region: str = DEFAULT_PHONE_REGION,
                   attributes: Iterable[dict] = ()) -> EntityRows:
    """A contact on its own (a contact webhook, the history import's contacts phase)."""
    row, notes = contact_row(contact, client_id_field, now, phone_region=phone_region, attributes=attributes)
    return EntityRows(contacts=[row], notes=notes)


def main_contact_id(lead: dict) -> int | None:
    """The contact flagged `is_main` ("Сделки": `_embedded.contacts`); never simply the first one."""
    contacts = (lead.get("_embedded") or {}).get("contacts") or []
    return next((c["id"] for c in contacts if c.get("is_main")), None)


def lead_rows(lead: dict, contacts: dict[int, dict], *, mapping: list[dict], client_id_field: str,
              now: datetime, currency: str | None = None, phone_region: str = DEFAULT_PHONE_REGION,
              cost_field: str | None = None, pipelines: dict[int, dict] | None = None,
              attributes: Iterable[dict] = ()) -> EntityRows:
    """A lead → its main contact (or one synthesised from the lead) and its order.

    The ClientID is read from the lead (where amoCRM's tracking fields live) and from the contact.
    A stage missing from the mapping holds the deal with an explanation, never a guessed status.
    `currency` is the integration's, else the account's; `cost_field` a lead custom field (id, code or
    name) whose value becomes the order's `cost` — one that is not an amount is left out and noted.
    """
    key = stage_key(lead.get("pipeline_id"), lead.get("status_id"))
    status = status_for(mapping, key)
    if status is None:
        name = _stage_name(pipelines or {}, lead.get("pipeline_id"), lead.get("status_id"))
        return unmapped_stage(key, name)
    lead_client_ids = keep_valid(field_values(lead.get("custom_fields_values"), client_id_field), normalize_client_id)
    contact_id = main_contact_id(lead)
    contact = contacts.get(contact_id) if contact_id is not None else None
    notes: dict = {}
    parts = {}  # the contact's own row and the lead's ClientIDs, kept apart (`EntityRows.contact_parts`)
    if contact is not None:
        customer, notes = contact_row(contact, client_id_field, now, phone_region=phone_region,
                                      extra_client_ids=lead_client_ids, attributes=attributes)
        parts[customer["uniq_id"]] = (contact_row(contact, client_id_field, now, phone_region=phone_region,
                                                  attributes=attributes)[0], lead_client_ids)
    else:
        # No contact (or it was deleted): the ClientID on the lead still ties the deal to a visit.
        customer = {"uniq_id": f"{SYNTHETIC_CONTACT_PREFIX}{lead['id']}", "name": lead.get("name") or None,
                    "create_date_time": _time(lead.get("created_at"), now), "client_ids": lead_client_ids}
        customer = {k: v for k, v in customer.items() if v not in (None, [])}
    cost, cost_notes = order_cost(field_values(lead.get("custom_fields_values"), cost_field, raw=True)
                                  if cost_field else [], currency)
    order = {"id": str(lead["id"]), "client_uniq_id": customer["uniq_id"], "order_status": status,
             "create_date_time": _time(lead.get("created_at"), now),
             "update_date_time": _time(lead.get("updated_at"), now),
             "finish_date_time": _time(lead.get("closed_at"), now),
             "revenue": lead.get("price_with_minor_units", lead.get("price")),
             "cost": cost,
             "currency": currency,
             "products": products_of(lead),
             "attribute_values": attribute_values(lead.get("custom_fields_values"), attributes, "order")}
    return EntityRows(contacts=[customer], orders=[{k: v for k, v in order.items() if v not in (None, {})}],
                      products=product_hints(lead), notes=merge_notes(notes, cost_notes), contact_parts=parts)


def products_of(lead: dict) -> dict[str, Any]:
    """Catalog elements linked to the lead → `{product id: quantity}`; the id is the element id."""
    products: dict[str, Any] = {}
    for element in (lead.get("_embedded") or {}).get("catalog_elements") or []:
        quantity = (element.get("metadata") or {}).get("quantity") or 0
        product = normalize_product_id(element["id"])
        products[product] = products.get(product, 0) + quantity
    return products


def product_hints(lead: dict) -> dict[str, dict]:
    """Where each linked element's name can be read: its catalog. A lead's `catalog_elements` carry only
    id and metadata ("Сделки"); names need `GET /api/v4/catalogs/{catalog_id}/elements` ("Списки")."""
    return {normalize_product_id(e["id"]): {"catalog_id": (e.get("metadata") or {}).get("catalog_id"), "element_id": e["id"]}
            for e in (lead.get("_embedded") or {}).get("catalog_elements") or []}


def default_mapping(pipelines: list[dict]) -> list[dict]:
    """Proposed mapping for every stage of every pipeline: 142 → PAID, 143 → CANCELLED, the rest
    IN_PROGRESS, labelled with the stage names ("Воронки и этапы": 142 and 143 exist, with the same ids,
    in every pipeline). Won and lost share one Metrika id each."""
    entries: list[dict] = []
    shared: dict[int, dict] = {}
    for pipeline in pipelines:
        for status in (pipeline.get("_embedded") or {}).get("statuses") or []:
            status_id = status["id"]
            if status_id in (WON, LOST):
                first = shared.setdefault(status_id, {"metrika_status_id": "won" if status_id == WON else "lost",
                                                      "humanized": status.get("name") or str(status_id),
                                                      "type": "PAID" if status_id == WON else "CANCELLED"})
                entries.append({"crm_status": stage_key(pipeline["id"], status_id), **first})
                continue
            humanized = f"{pipeline.get('name', '')}: {status.get('name', '')}".strip(": ")
            metrika_id = f"amo_{pipeline['id']}_{status_id}"
            assert SCHEMA_ID.match(metrika_id)
            entries.append({"crm_status": stage_key(pipeline["id"], status_id), "metrika_status_id": metrika_id,
                            "humanized": humanized[:4096], "type": "IN_PROGRESS"})
    return entries


def _stage_name(pipelines: dict[int, dict], pipeline_id: Any, status_id: Any) -> str | None:
    pipeline = pipelines.get(pipeline_id) if isinstance(pipeline_id, int) else None
    for status in ((pipeline or {}).get("_embedded") or {}).get("statuses") or []:
        if status["id"] == status_id:
            return f"{pipeline.get('name')}: {status.get('name')}"
    return None
