"""Integration config: one CRM account + one Metrika counter. Schema, secret handling, and the admin
operations behind `PUT/GET/DELETE /integrations/{id}`."""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from .errors import ApiError, invalid, not_found
from .logs import log_event
from .metrika.cdp import MetrikaError
from .metrika.schemas import SCHEMA_ID, resolve_time_zone

CRMS = ("amocrm", "bitrix24")
MASK = "********"
# Paths of write-only values: never returned, never logged.
SECRET_PATHS = (("metrika_token",), ("connection", "access_token"), ("connection", "webhook_secret"),
                ("connection", "webhook_url"), ("connection", "application_token"))
INTEGRATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_CLIENT_ID_FIELD = {"amocrm": "_YM_UID", "bitrix24": "UF_CRM_YM_CLIENT_ID"}


def _https_url(value: str) -> None:
    """CRM URLs must be HTTPS; plain HTTP only to loopback, where the sandboxes live."""
    parts = urlsplit(value)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ValidationError("must be an https:// URL (http:// only for loopback sandboxes)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _time_zone(name: str) -> None:
    resolve_time_zone(name)  # raises ValidationError for an unknown zone


def _secret(min_length: int = 1) -> fields.String:
    return fields.String(required=True, load_only=True, validate=validate.Length(min=min_length, max=4096))


class AmoCrmConnection(Schema):
    """amoCRM: account URL, long-lived token (amoCRM reference §13.2), and our webhook secret."""

    class Meta:
        unknown = RAISE

    base_url = fields.String(required=True, validate=_https_url)
    access_token = _secret()
    account_id = fields.String(validate=validate.Regexp(r"^\d+$", error="must be the numeric account id"))
    # Sent by amoCRM in the webhook URL's query: long enough not to be guessed.
    webhook_secret = _secret(min_length=16)


class Bitrix24Connection(Schema):
    """Bitrix24: incoming-webhook URL for REST calls (a secret itself) and the outbound webhook's
    application_token (Bitrix24 reference §5, §8)."""

    class Meta:
        unknown = RAISE

    webhook_url = fields.String(required=True, load_only=True,
                                validate=[_https_url, validate.Regexp(r"^https?://[^/]+/rest/\d+/[^/]+/?$",
                                                                      error="must look like https://<portal>/rest/<user id>/<code>/")])
    application_token = _secret()
    member_id = fields.String()
    domain = fields.String()


CONNECTION_SCHEMAS = {"amocrm": AmoCrmConnection, "bitrix24": Bitrix24Connection}


class IntegrationConfig(Schema):
    class Meta:
        unknown = RAISE

    crm = fields.String(required=True, validate=validate.OneOf(CRMS))
    counter_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1, max=2**31 - 1))
    metrika_token = _secret()
    timezone = fields.String(validate=_time_zone)
    client_id_field = fields.String(validate=validate.Length(min=1, max=255))
    hash_pii = fields.Boolean(load_default=False)
    currency = fields.String(validate=validate.Regexp(r"^[A-Z]{3}$", error="must be an ISO 4217 code such as RUB"))
    # Metrika has no delete: a deleted deal is re-sent with this status id; null keeps it as it was.
    deleted_deal_status = fields.String(allow_none=True, validate=validate.Regexp(
        SCHEMA_ID, error="must be a Metrika status id (IN_PROGRESS, PAID, CANCELLED, SPAM or a mapped id)"))
    connection = fields.Dict(required=True)

    @validates_schema(skip_on_field_errors=False)
    def _connection(self, data: dict, **kwargs: Any) -> None:
        schema = CONNECTION_SCHEMAS.get(data.get("crm"))
        if schema is not None:
            try:
                schema().load(data.get("connection") or {})
            except ValidationError as exc:
                raise ValidationError({"connection": exc.messages}) from exc


def validate_integration_id(integration_id: str) -> None:
    if not INTEGRATION_ID.match(integration_id):
        raise invalid("integration id must be 1-64 characters: Latin letters, digits, _ and -")


def carry_over_secrets(incoming: dict, stored: dict | None) -> dict:
    """A secret left out (or sent back masked, as GET shows it) keeps its stored value, so a user can
    GET, edit a field and PUT without re-entering tokens. Only when the CRM stays the same."""
    merged = {**incoming, "connection": dict(incoming.get("connection") or {})}
    if not stored or stored.get("crm") != incoming.get("crm"):
        return merged
    for path in SECRET_PATHS:
        parent_in, parent_stored = merged, stored
        for key in path[:-1]:
            parent_in, parent_stored = parent_in.get(key, {}), parent_stored.get(key, {})
        if parent_in.get(path[-1]) in (None, MASK) and path[-1] in parent_stored:
            parent_in[path[-1]] = parent_stored[path[-1]]
    return merged


def public_view(config: dict) -> dict:
    """The integration as GET shows it: secrets masked."""
    view = {**config, "connection": dict(config.get("connection") or {})}
    for path in SECRET_PATHS:
        parent = view
        for key in path[:-1]:
            parent = parent.get(key, {})
        if path[-1] in parent:
            parent[path[-1]] = MASK
    return view


def save_integration(store: Any, integration_id: str, body: Any,
                     counter_time_zone: Callable[[dict], str]) -> dict:
    """Validate and store an integration. When `timezone` is absent it is read from the counter, which
    also proves the token can see the counter before anything is stored."""
    validate_integration_id(integration_id)
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object")
    merged = carry_over_secrets(body, store.get_integration(integration_id))
    try:
        IntegrationConfig().load(merged)
    except ValidationError as exc:
        raise invalid("integration config is invalid", exc.messages) from exc
    config = dict(merged)
    config.setdefault("hash_pii", False)
    config.setdefault("client_id_field", DEFAULT_CLIENT_ID_FIELD[config["crm"]])
    config.setdefault("deleted_deal_status", "CANCELLED")
    if not config.get("timezone"):
        try:
            config["timezone"] = counter_time_zone(config)
        except MetrikaError as exc:
            raise metrika_refused("could not read the counter's time zone", exc) from exc
        config["timezone_source"] = "counter"
    store.put_integration(integration_id, config)
    log_event("integration_saved", integration_id=integration_id, crm=config["crm"], counter_id=config["counter_id"])
    return public_view(config)


def get_integration(store: Any, integration_id: str) -> dict:
    config = store.get_integration(integration_id)
    if config is None:
        raise not_found(f"integration {integration_id!r}")
    return config


def metrika_refused(what: str, exc: MetrikaError) -> ApiError:
    """Metrika's answer, passed on: 502/503 when it failed or throttled us, 422 when it refused."""
    if exc.retryable:
        return ApiError(503 if exc.status in (420, 429) else 502, "metrika_unavailable",
                        f"{what}: {exc.message}; try again later", exc.describe())
    return ApiError(422, "metrika_refused", f"{what}: {exc.message}", exc.describe())
