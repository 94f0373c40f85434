"""Custom attribute mapping: CRM fields → Metrika custom attributes of contacts and orders, behind
`GET/PUT /integrations/{id}/attributes`.

Metrika side (https://yandex.ru/dev/metrika/ru/management/openapi/schema/createAttributes "Создание
атрибутов", https://yandex.ru/dev/metrika/ru/management/openapi/schema/getAttributes "Информация о всех
атрибутах"): names `^[\\w-:]+$`, 1–255 chars, no clash with system attributes (read with GET
schema/attributes); types numeric, date, datetime, email, text (no boolean); created with
POST schema/attributes?entity_type=CONTACT|ORDER; there is no update and no delete, so an existing
attribute is reused only when its type and multivaluedness match. Values travel with every row (as
CSV columns: https://yandex.ru/dev/metrika/ru/management/openapi/schema/uploadContacts "Загрузка данных о
клиентах (CSV)") and are coerced by `metrika.schemas.AttributeValues`. A failed Metrika call answers as
`errors.http_error` says (502/503 metrika_unavailable, 422 metrika_refused).
"""
from __future__ import annotations

import json
from typing import Any, Callable

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from .errors import ApiError, BridgeError, http_error, invalid
from .integrations import StrictBoolean, get_integration
from .logs import log_event
from .metrika.schemas import ATTRIBUTE_TYPES, SCHEMA_ID
from .status_mapping import MAX_MAPPING_BYTES

ENTITY_TYPES = {"contact": "CONTACT", "order": "ORDER"}
MAX_ATTRIBUTES = 100


class AttributeMappingEntry(Schema):
    """One CRM field → one Metrika attribute. `crm_field`: an amoCRM field id or code (e.g. `752015`,
    `UTM_SOURCE`), or a Bitrix24 field (`UF_CRM_…`, `SOURCE_ID`)."""

    class Meta:
        unknown = RAISE

    crm_field = fields.String(required=True, validate=[validate.Length(min=1, max=255),
                                                       validate.Regexp(r"\S", error="must not be blank")])
    entity = fields.String(required=True, validate=validate.OneOf(list(ENTITY_TYPES)))
    name = fields.String(required=True, validate=[
        validate.Length(min=1, max=255),
        validate.Regexp(SCHEMA_ID, error="must match ^[\\w-:]+$ (Latin letters, digits, _, - and :)")])
    type = fields.String(required=True, validate=validate.OneOf(
        ATTRIBUTE_TYPES, error="must be one of text, numeric, date, datetime, email (Metrika has no boolean: "
                               "map yes/no fields as text)"))
    multivalued = StrictBoolean(load_default=False)
    humanized = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=4096))


class AttributeMapping(Schema):
    class Meta:
        unknown = RAISE

    entries = fields.List(fields.Nested(AttributeMappingEntry), required=True,
                          validate=validate.Length(max=MAX_ATTRIBUTES))

    @validates_schema
    def _unique(self, data: dict, **kwargs: Any) -> None:
        seen: set[tuple[str, str]] = set()
        for entry in data.get("entries", []):
            key = (entry["entity"], entry["name"])
            if key in seen:
                raise ValidationError(f"attribute {entry['name']!r} is mapped twice for {entry['entity']}", "entries")
            seen.add(key)
        # Stored as one item after Metrika created the attributes, which the API cannot delete: a
        # mapping too large to store must be refused first (100 entries with 4,096-character labels are).
        size = len(json.dumps(data.get("entries", []), ensure_ascii=False).encode("utf-8"))
        if size > MAX_MAPPING_BYTES:
            raise ValidationError(f"the entries take {size:,} bytes; at most {MAX_MAPPING_BYTES:,} can be kept "
                                  "(shorten the humanized labels)", "entries")


def read_attributes(store: Any, integration_id: str) -> dict:
    get_integration(store, integration_id)
    return {"integration_id": integration_id, "entries": store.get_attribute_mapping(integration_id)}


def replace_attributes(store: Any, integration_id: str, body: Any, metrika_for: Callable[[dict], Any]) -> dict:
    """Validate, check against the counter's attributes, create the missing ones, then store. Nothing
    is stored unless Metrika has every attribute the mapping names."""
    integration = get_integration(store, integration_id)
    if not isinstance(body, dict):
        raise invalid('body must be a JSON object: {"entries": [{"crm_field", "entity", "name", "type"}]}')
    try:
        entries = AttributeMapping().load(body)["entries"]
    except ValidationError as exc:
        raise invalid("invalid attribute mapping", exc.messages) from exc
    metrika = metrika_for(integration)
    counter_id = integration["counter_id"]
    created: list[str] = []
    try:
        for entity, entity_type in ENTITY_TYPES.items():
            wanted = [e for e in entries if e["entity"] == entity]
            if not wanted:
                continue
            existing = metrika.attributes(counter_id, entity_type)
            system = {a.get("name") for a in existing["system"]}
            custom = {a.get("name"): a for a in existing["custom"]}
            problems = {}
            for entry in wanted:
                if entry["name"] in system:
                    problems[entry["name"]] = f"is a Metrika system attribute of {entity_type}; choose another name"
                elif entry["name"] in custom and not _same(custom[entry["name"]], entry):
                    have = custom[entry["name"]]
                    problems[entry["name"]] = (
                        f"already exists on counter {counter_id} as {have.get('type_name')}"
                        f"{' (multivalued)' if have.get('multivalued') else ''}; Metrika cannot change or delete "
                        "attributes through the API, so choose another name")
            if problems:
                raise ApiError(409, "attribute_conflict", "the mapping clashes with the counter's attributes",
                               {"attributes": problems})
            new = [_metrika_attribute(e) for e in wanted if e["name"] not in custom]
            if new:
                metrika.create_attributes(counter_id, entity_type, new)
                created += [f"{entity}:{a['name']}" for a in new]
    except BridgeError as exc:
        raise http_error("Metrika did not accept the attributes, so the mapping was not stored", exc) from exc
    store.put_attribute_mapping(integration_id, entries)
    log_event("attribute_mapping_saved", integration_id=integration_id, entries=len(entries), created=len(created))
    return {"integration_id": integration_id, "entries": entries, "created_in_metrika": created}


def _same(existing: dict, entry: dict) -> bool:
    return (str(existing.get("type_name", "")).lower() == entry["type"]
            and bool(existing.get("multivalued")) == entry["multivalued"])


def _metrika_attribute(entry: dict) -> dict:
    attribute = {"name": entry["name"], "type_name": entry["type"], "multivalued": entry["multivalued"]}
    if entry.get("humanized"):
        attribute["humanized"] = entry["humanized"]
    return attribute
