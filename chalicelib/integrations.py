"""Integration config: one CRM account + one Metrika counter. Schema, secret handling, and the admin
operations behind `PUT/GET/DELETE /integrations/{id}`."""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from .ids import is_integration_id
from .errors import ApiError, BridgeError, http_error, invalid, not_found
from .logs import log_event
from .metrika.schemas import SCHEMA_ID, resolve_time_zone
from .shared_counter import assigned_id_prefix

CRMS = ("amocrm", "bitrix24")
MASK = "********"
# Paths of write-only values: never returned, never logged.
SECRET_PATHS = (("metrika_token",), ("connection", "access_token"), ("connection", "webhook_secret"),
                ("connection", "webhook_url"), ("connection", "application_token"))
DEFAULT_CLIENT_ID_FIELD = {"amocrm": "_YM_UID", "bitrix24": "UF_CRM_YM_CLIENT_ID"}
# Limits on every string, so no stored item comes near DynamoDB's 400 KB.
MAX_URL, MAX_SECRET, MAX_ID, MAX_TIME_ZONE = 2048, 4096, 255, 64
# A PUT body is two levels deep (config → connection); anything much deeper or larger is not a config.
MAX_BODY_DEPTH, MAX_BODY_NODES, MAX_KEY = 8, 200, 255


def _fullmatch(pattern: str | re.Pattern, error: str) -> Callable[[str], None]:
    """Like `validate.Regexp`, but the whole value must match (`$` would let a trailing newline in)."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern

    def check(value: str) -> None:
        if compiled.fullmatch(value) is None:
            raise ValidationError(error)
    return check


def _printable(value: str) -> None:
    """No whitespace or control characters (they end in HTTP headers, URLs and log lines)."""
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValidationError("must not contain spaces or control characters")


def _no_control(value: str) -> None:
    if not value.isprintable():
        raise ValidationError("must not contain control characters")


def _https_url(value: str) -> None:
    """CRM URLs must be HTTPS; plain HTTP only to loopback, where the sandboxes live. No user-info,
    query or fragment: the URL is a base that paths are appended to."""
    if len(value) > MAX_URL:
        return  # the length validator says so; nothing to parse
    _printable(value)
    try:
        parts = urlsplit(value)
        hostname = parts.hostname
    except ValueError as exc:
        raise ValidationError("must be an https:// URL") from exc
    if "@" in parts.netloc:
        raise ValidationError("must not carry a user name or password")
    try:
        parts.port  # noqa: B018 — raises for a port out of range
    except ValueError as exc:
        raise ValidationError("must have a valid port (1-65535) or none") from exc
    if hostname and not re.fullmatch(r"[a-z0-9.-]+|[0-9a-f:.]+", hostname):  # urlsplit lower-cases it
        raise ValidationError("must name a host: letters, digits, dots and hyphens")
    if parts.query or parts.fragment:
        raise ValidationError("must not carry a query or fragment")
    if parts.scheme == "https" and hostname:
        return
    if parts.scheme == "http" and hostname and _is_loopback(hostname):
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
    if len(name) > MAX_TIME_ZONE:
        raise ValidationError(f"must be an IANA time zone name of at most {MAX_TIME_ZONE} characters")
    resolve_time_zone(name)  # raises ValidationError for an unknown zone


class StrictBoolean(fields.Boolean):
    """Only JSON true/false: not "false" (a truthy string once stored), not 0/1."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input="value")
        return value


def _string(max_length: int, *validators: Callable[[str], None], min_length: int = 1, **kwargs: Any) -> fields.String:
    """A string field with a length limit; the other validators run only on a value within it."""
    length = validate.Length(min=min_length, max=max_length)

    def check(value: str) -> None:
        length(value)
        for validator in validators:
            validator(value)
    return fields.String(validate=check, **kwargs)


def _secret(min_length: int = 1) -> fields.String:
    return _string(MAX_SECRET, _fullmatch(r"[\x21-\x7e]+", "must be printable ASCII without spaces"),
                   min_length=min_length, required=True, load_only=True)


class AmoCrmConnection(Schema):
    """amoCRM: account URL, long-lived token (Kommo "Long-lived Token",
    https://developers.kommo.com/docs/long-lived-token), and our webhook secret."""

    class Meta:
        unknown = RAISE

    base_url = _string(MAX_URL, _https_url, required=True)
    access_token = _secret()
    # Compared with the webhook's account[id], which is checked the same way (crm/form.py `crm_id`).
    account_id = _string(19, _fullmatch(r"[0-9]{1,19}", "must be the numeric account id"))
    # Sent by amoCRM in the webhook URL's query: long enough not to be guessed.
    webhook_secret = _secret(min_length=16)


class Bitrix24Connection(Schema):
    """Bitrix24: incoming-webhook URL for REST calls (a secret itself) and the outbound webhook's
    application_token (Bitrix24 "Security in Handlers",
    https://apidocs.bitrix24.com/api-reference/events/safe-event-handlers.html; "Входящие и исходящие вебхуки",
    https://apidocs.bitrix24.ru/local-integrations/local-webhooks.html)."""

    class Meta:
        unknown = RAISE

    webhook_url = _string(MAX_URL, _https_url, _fullmatch(r"https?://[^/]+/rest/[0-9]+/[^/]+/?",
                                                          "must look like https://<portal>/rest/<user id>/<code>/"),
                          required=True, load_only=True)
    application_token = _secret()
    # Compared with the event's auth[member_id] / auth[domain] (crm/bitrix24/webhook.py).
    member_id = _string(MAX_ID, _fullmatch(r"[A-Za-z0-9_.-]+", "must be the portal's member id (Latin letters and digits)"))
    domain = _string(MAX_ID, _printable)


CONNECTION_SCHEMAS = {"amocrm": AmoCrmConnection, "bitrix24": Bitrix24Connection}


class IntegrationConfig(Schema):
    class Meta:
        unknown = RAISE

    crm = fields.String(required=True, validate=validate.OneOf(CRMS))
    counter_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1, max=2**31 - 1))
    metrika_token = _secret()
    timezone = _string(MAX_TIME_ZONE, _time_zone)
    client_id_field = _string(MAX_ID, _no_control)  # a field code or name ("Yandex CID"): spaces allowed
    hash_pii = StrictBoolean(load_default=False)
    currency = _string(3, _fullmatch(r"[A-Z]{3}", "must be an ISO 4217 code such as RUB"))
    # Metrika has no delete: a deleted deal is re-sent with this status id; null keeps it as it was.
    deleted_deal_status = _string(MAX_ID, _fullmatch(
        SCHEMA_ID, "must be a Metrika status id (IN_PROGRESS, PAID, CANCELLED, SPAM or a mapped id)"), allow_none=True)
    connection = fields.Dict(required=True)

    @validates_schema(skip_on_field_errors=False)
    def _connection(self, data: dict, **kwargs: Any) -> None:
        crm = data.get("crm")
        schema = CONNECTION_SCHEMAS.get(crm) if isinstance(crm, str) else None
        if schema is not None:
            try:
                schema().load(data.get("connection") or {})
            except ValidationError as exc:
                raise ValidationError({"connection": exc.messages}) from exc

    @post_load
    def _typed_connection(self, data: dict, **kwargs: Any) -> dict:
        """Store what was validated, not what was sent."""
        if "connection" in data:  # absent only in the partial load that names errors besides it
            data["connection"] = CONNECTION_SCHEMAS[data["crm"]]().load(data["connection"])
        return data


def validate_integration_id(integration_id: str) -> None:
    if not is_integration_id(integration_id):
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
    also proves the token can see the counter before anything is stored.

    Every way a body can be wrong is an `ApiError` 400 naming the field (in `details`, or in the
    message for the body's shape); what is stored is the validated config, not the body as sent."""
    validate_integration_id(integration_id)
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object")
    _check_shape(body)
    # Assigned by the service (shared_counter): only the stored value may come back, checked below.
    sent_prefix, body = body.get("id_prefix"), {k: v for k, v in body.items() if k != "id_prefix"}
    if "connection" in body and not isinstance(body["connection"], dict):
        # Before carry-over touches it; the other fields are still checked, to name every problem at once.
        errors: dict = {}
        try:
            IntegrationConfig(partial=("connection",)).load({k: v for k, v in body.items() if k != "connection"})
        except ValidationError as exc:
            errors = exc.messages if isinstance(exc.messages, dict) else {}
        raise invalid("integration config is invalid", {**errors, "connection": ["must be a JSON object"]})
    merged = carry_over_secrets(body, store.get_integration(integration_id))
    masked = [".".join(path) for path in SECRET_PATHS if _at(merged, path) == MASK]
    try:
        config = IntegrationConfig().load(merged)
    except ValidationError as exc:
        raise invalid("integration config is invalid", exc.messages) from exc
    if masked:  # GET's mask sent back where nothing is stored to keep (another id, another CRM)
        raise invalid("integration config is invalid",
                      {path: [f"{MASK} stands for a stored secret; there is none here, send the value"] for path in masked})
    config.setdefault("client_id_field", DEFAULT_CLIENT_ID_FIELD[config["crm"]])
    config.setdefault("deleted_deal_status", "CANCELLED")
    if not config.get("timezone"):
        try:
            time_zone = counter_time_zone(config)
        except BridgeError as exc:
            raise http_error("could not read the counter's time zone", exc) from exc
        try:
            _time_zone(time_zone if isinstance(time_zone, str) else "")
        except ValidationError as exc:
            raise ApiError(422, "metrika_refused", f"the counter's time zone {str(time_zone)[:MAX_TIME_ZONE]!r} "
                                                   "is not one this service knows: set `timezone` explicitly") from exc
        config["timezone"], config["timezone_source"] = time_zone, "counter"
    config.update(assigned_id_prefix(store, integration_id, config["counter_id"], sent_prefix))
    store.put_integration(integration_id, config)
    log_event("integration_saved", integration_id=integration_id, crm=config["crm"], counter_id=config["counter_id"])
    return public_view(config)


def _check_shape(body: dict) -> None:
    """Bound the body before anything walks it recursively: depth, size and key length. Iterative, so
    a body nested 1,000 deep is a 400 here, not a RecursionError further on."""
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    nodes = 0
    while stack:
        node, depth, path = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            nodes += 1
            name = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and len(key) > MAX_KEY:
                raise invalid(f"field names are at most {MAX_KEY} characters; {name[:60]}… is longer")
            if nodes > MAX_BODY_NODES:
                raise invalid(f"body has more than {MAX_BODY_NODES} fields; an integration config has about 15")
            if isinstance(child, (dict, list)):
                if depth >= MAX_BODY_DEPTH:
                    raise invalid(f"body is nested deeper than {MAX_BODY_DEPTH} levels (at {name[:200]})",
                                  {name.split(".")[0]: [f"nested deeper than {MAX_BODY_DEPTH} levels"]})
                stack.append((child, depth + 1, name))


def _at(config: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def get_integration(store: Any, integration_id: str) -> dict:
    config = store.get_integration(integration_id)
    if config is None:
        raise not_found(f"integration {integration_id!r}")
    return config
