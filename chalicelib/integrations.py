"""Integration config: one CRM account + one Metrika counter. Schema, secret handling, and the admin
operations behind `PUT/GET/DELETE /integrations/{id}`."""
from __future__ import annotations

import ipaddress
import re
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from .ids import is_integration_id
from .errors import ApiError, BridgeError, http_error, invalid, not_found
from .logs import log_event
from .normalize import ISO_4217
from .metrika.schemas import SCHEMA_ID, check_phone_region, resolve_time_zone
from .shared_counter import check_sent_prefix, saved_with_id_prefix

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


def _field_name(value: str) -> None:
    """A CRM field's code or name: printable, and not blank (a name of spaces matches no field)."""
    _no_control(value)
    if not value.strip():
        raise ValidationError("must name a CRM field, not be blank")


def _http_url(value: str) -> None:
    """The shape of a CRM URL: http(s), a host, no user-info, query or fragment (the URL is a base that
    paths are appended to). Which hosts and schemes an integration may use is `endpoint_problem`'s."""
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
        port = parts.port  # raises for a port out of range
    except ValueError as exc:
        raise ValidationError("must have a valid port (1-65535) or none") from exc
    if port == 0 or parts.netloc.endswith(":"):  # urlsplit takes 0 and an empty port; no one listens there
        raise ValidationError("must have a valid port (1-65535) or none")
    if hostname and not re.fullmatch(r"[a-z0-9.-]+|[0-9a-f:.]+", hostname):  # urlsplit lower-cases it
        raise ValidationError("must name a host: letters, digits, dots and hyphens (an IDN in its xn-- form)")
    if "?" in value or "#" in value:  # an empty one too: paths appended after it would not be paths
        raise ValidationError("must not carry a query or fragment")
    if parts.scheme not in ("https", "http") or not hostname:
        raise ValidationError("must be an https:// URL")


# Where the CRMs' cloud accounts live: one label (the account or portal name) under one of these.
# amoCRM: https://<account>.amocrm.ru ("API сделок", https://www.amocrm.ru/developers/content/crm_platform/leads-api);
# Kommo (amoCRM's international brand): https://<account>.kommo.com ("Long-lived token",
# https://developers.kommo.com/docs/long-lived-token), older international accounts <account>.amocrm.com.
AMOCRM_DOMAINS = ("amocrm.ru", "kommo.com", "amocrm.com")
# Bitrix24 cloud: the 18 domain zones of Bitrix24 Helpdesk's article on changing an account's zone
# ("In Bitrix24 sind folgende Domain-Zonen verfügbar", https://helpdesk.bitrix24.de/open/10252860). Only
# the vendor's list: a zone seen elsewhere (bitrix24.uk, on a partner's page) is one `custom_domain: true`
# away, as is an on-premise portal or a cloud one on its own domain.
BITRIX24_DOMAINS = tuple(f"bitrix24.{zone}" for zone in (
    "ru", "com", "de", "eu", "es", "com.br", "fr", "it", "com.tr", "ua", "pl", "kz", "by", "in", "cn", "id", "vn",
    "jp"))
# Names that never lead to a public host (RFC 6761 and 6762 special-use names, home.arpa of RFC 8375,
# cloud-internal names such as ec2.internal, and names commonly used inside company networks).
RESERVED_SUFFIXES = ("localhost", "local", "localdomain", "internal", "intranet", "lan", "home", "corp",
                     "arpa", "test", "invalid", "example", "onion")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NOT_LISTED = "must be the CRM's own address"
_TOP_LABEL = re.compile(r"[a-z]{2,63}|xn--[a-z0-9-]{1,59}")  # never all digits: "127.1" and "0x7f.1" are addresses


def endpoint_problem(url: str, *, domains: tuple[str, ...], custom_domain: bool = False,
                     allow_loopback: bool = False) -> str | None:
    """Why a CRM URL that has `_http_url`'s shape may not be called, or None. Pure.

    https only, to a DNS name (no IP literal in any spelling: inet_aton reads "2130706433", "127.1"
    and "0x7f.1" as addresses), one label under one of `domains`; with `custom_domain`, any public
    name (still no IP literal, no reserved or internal name; the adapters refuse, when connecting, a
    name that resolves to a private address: `chalicelib.outbound`). With `allow_loopback` (the local
    stack and the tests) http:// or https:// to localhost or a loopback address passes too."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if allow_loopback and _is_loopback(host):
        return None
    if parts.scheme != "https":
        return "must be an https:// URL"
    if _is_ip_literal(host):
        return "must name the CRM's host, not an IP address"
    labels = host.split(".")
    if (len(host) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels)
            or not _TOP_LABEL.fullmatch(labels[-1])):
        return "must name a host on the internet: labels of letters, digits and hyphens, ending in a top-level domain"
    if custom_domain:
        if any(host == suffix or host.endswith("." + suffix) for suffix in RESERVED_SUFFIXES):
            return "names a local or internal host, which this service does not call"
        return None
    if not any(host.endswith("." + domain) and host.count(".") == domain.count(".") + 1 for domain in domains):
        return f"{_NOT_LISTED}: " + ", ".join(f"<name>.{domain}" for domain in domains)
    return None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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


def _iso_4217(value: str) -> None:
    if value not in ISO_4217:
        raise ValidationError(f"{value} is no ISO 4217 currency code in use (such as RUB, USD, EUR, BYN, KZT)")


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


class _Connection(Schema):
    """A CRM connection. `allow_loopback`: the deployment's `Settings.allow_loopback_crm` (the local
    stack and the tests, whose sandboxes listen on loopback)."""

    class Meta:
        unknown = RAISE

    def __init__(self, *, allow_loopback: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow_loopback = allow_loopback

    def _check_endpoint(self, data: dict, field: str, domains: Any, *, custom_domain: bool = False,
                        hint: str = "") -> None:
        """A ValidationError naming `field` when its URL is not one this deployment may call
        (`endpoint_problem`); `hint` is added to a host the CRM's domains do not list."""
        problem = endpoint_problem(data[field], domains=domains, custom_domain=custom_domain,
                                   allow_loopback=self.allow_loopback)
        if problem and hint and problem.startswith(_NOT_LISTED):
            problem += hint
        if problem:
            raise ValidationError({field: [problem]})


def _no_path(value: str) -> None:
    try:
        path = urlsplit(value).path
    except ValueError:
        return  # `_http_url` says so
    if path not in ("", "/"):
        raise ValidationError("must be the account's address alone, such as https://shop.amocrm.ru (no path)")


def _below(limit: int) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value.isascii() and value.isdigit() and int(value) >= limit:
            raise ValidationError(f"must be a numeric id below {limit}")
    return check


class AmoCrmConnection(_Connection):
    """amoCRM: account URL, long-lived token (Kommo "Long-lived Token",
    https://developers.kommo.com/docs/long-lived-token), and our webhook secret."""

    class Meta:
        unknown = RAISE

    base_url = _string(MAX_URL, _http_url, _no_path, required=True)
    access_token = _string(MAX_SECRET, _fullmatch(r"[\x21-\x7e]+", "must be printable ASCII without spaces"),
                           load_only=True)
    # "oauth": installed from amoCRM (chalicelib/amocrm_install.py); its tokens live apart (TokenStore),
    # never here. Absent or "long_lived": the long-lived token above.
    auth = fields.String(validate=validate.OneOf(("long_lived", "oauth")))
    # Compared with the webhook's account[id], which is checked the same way (crm/form.py `crm_id`).
    account_id = _string(19, _fullmatch(r"0*[1-9][0-9]{0,18}", "must be the numeric account id (ASCII digits, not 0)"),
                         _below(2**63))
    # Sent by amoCRM in the webhook URL's query: long enough not to be guessed.
    webhook_secret = _secret(min_length=16)

    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def _endpoint(self, data: dict, original: dict, **kwargs: Any) -> None:
        if "base_url" in data:
            self._check_endpoint(data, "base_url", AMOCRM_DOMAINS)
        if data.get("auth") == "oauth":
            if "access_token" in data:
                raise ValidationError({"access_token": ["an installed (OAuth) integration keeps its tokens apart: "
                                                        "leave access_token out, or set auth to long_lived"]})
            if "account_id" not in data:
                raise ValidationError({"account_id": ["required for an installed (OAuth) integration"]})
        elif "access_token" not in original:  # sent but invalid: that field's own error says why
            raise ValidationError({"access_token": ["Missing data for required field."]})

    @post_load
    def _canonical(self, data: dict, **kwargs: Any) -> dict:
        """The account id as amoCRM's webhooks are compared with it: no leading zeros."""
        if "account_id" in data:
            data["account_id"] = str(int(data["account_id"]))
        return data


class Bitrix24Connection(_Connection):
    """Bitrix24: incoming-webhook URL for REST calls (a secret itself) and the outbound webhook's
    application_token (Bitrix24 "Security in Handlers",
    https://apidocs.bitrix24.com/api-reference/events/safe-event-handlers.html; "Входящие и исходящие вебхуки",
    https://apidocs.bitrix24.ru/local-integrations/local-webhooks.html)."""

    class Meta:
        unknown = RAISE

    webhook_url = _string(MAX_URL, _http_url, _fullmatch(r"https?://[^/]+/rest/[0-9]+/[^/]+/?",
                                                         "must look like https://<portal>/rest/<user id>/<code>/"),
                          required=False, load_only=True)
    application_token = _secret()
    # Set by the Bitrix24 application's install (chalicelib/bitrix24_app.py), never by hand: REST calls go
    # to the portal's `client_endpoint` (as the OAuth server named it) with an OAuth access token kept in
    # the integration's TOKENS item (chalicelib/oauth.py) instead of an incoming-webhook URL.
    # "oauth": installed as the Bitrix24 application; absent or "webhook": the incoming webhook above.
    auth = fields.String(validate=validate.OneOf(("webhook", "oauth")))
    client_endpoint = _string(MAX_URL, _http_url)
    # Compared with the event's auth[member_id] / auth[domain] (crm/bitrix24/webhook.py).
    member_id = _string(MAX_ID, _fullmatch(r"[A-Za-z0-9_.-]+", "must be the portal's member id (Latin letters and digits)"))
    domain = _string(MAX_ID, _printable)
    # An on-premise portal, or a cloud portal on its own domain: webhook_url may name any public host.
    custom_domain = StrictBoolean()

    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def _endpoint(self, data: dict, original: dict, **kwargs: Any) -> None:
        if "client_endpoint" in data and data.get("auth") != "oauth":
            # Unused without the application's tokens, but a CRM URL all the same: never an IP literal,
            # a private or an internal host, whoever set it.
            self._check_endpoint(data, "client_endpoint", BITRIX24_DOMAINS, custom_domain=data.get("custom_domain") is True)
        if data.get("auth") == "oauth":
            if "webhook_url" in data:
                raise ValidationError({"webhook_url": ["an application's integration calls its client_endpoint: "
                                                       "leave webhook_url out"]})
            for key in ("client_endpoint", "member_id"):
                if key not in original:  # sent but invalid: that field's own error says why
                    raise ValidationError({key: ["Missing data for required field."]})
            if "client_endpoint" in data:
                self._check_endpoint(data, "client_endpoint", BITRIX24_DOMAINS)
            return
        if "webhook_url" not in data:
            if "webhook_url" not in original:  # sent but invalid: that field's own error says why
                raise ValidationError({"webhook_url": ["Missing data for required field."]})
            return
        self._check_endpoint(data, "webhook_url", BITRIX24_DOMAINS, custom_domain=data.get("custom_domain") is True,
                             hint="; for an on-premise portal, or one on its own domain, set connection.custom_domain to true")


CONNECTION_SCHEMAS = {"amocrm": AmoCrmConnection, "bitrix24": Bitrix24Connection}


class IntegrationConfig(Schema):
    class Meta:
        unknown = RAISE

    def __init__(self, *, allow_loopback: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow_loopback = allow_loopback  # passed on to the connection's schema

    crm = fields.String(required=True, validate=validate.OneOf(CRMS))
    counter_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1, max=2**31 - 1))
    metrika_token = _secret()
    timezone = _string(MAX_TIME_ZONE, _time_zone)
    client_id_field = _string(MAX_ID, _field_name)  # a field code or name ("Yandex CID"): spaces allowed
    hash_pii = StrictBoolean(load_default=False)
    currency = _string(3, _fullmatch(r"[A-Z]{3}", "must be an ISO 4217 code such as RUB"), _iso_4217)
    # How people in the CRM write phones (ISO 3166-1 alpha-2); absent: amoCRM's account country, else RU.
    phone_region = _string(2, check_phone_region)
    # A CRM field (amoCRM custom field id, code or name; Bitrix24 field code) → the order's `cost`.
    cost_field = _string(MAX_ID, _field_name)
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
                schema(allow_loopback=self.allow_loopback).load(data.get("connection") or {})
            except ValidationError as exc:
                raise ValidationError({"connection": exc.messages}) from exc

    @post_load
    def _typed_connection(self, data: dict, **kwargs: Any) -> dict:
        """Store what was validated, not what was sent."""
        if "connection" in data:  # absent only in the partial load that names errors besides it
            data["connection"] = CONNECTION_SCHEMAS[data["crm"]](allow_loopback=self.allow_loopback).load(data["connection"])
        return data


def validate_integration_id(integration_id: str) -> None:
    if not is_integration_id(integration_id):
        raise invalid("integration id must be 1-64 characters: Latin letters, digits, _ and -")


def carry_over_secrets(incoming: dict, stored: dict | None) -> dict:
    """A secret left out (or sent back masked, as GET shows it) keeps its stored value, so a user can
    GET, edit a field and PUT without re-entering tokens. Only when the CRM stays the same, and only
    while the endpoint the secret belongs to does (`withheld_secrets`)."""
    merged = {**incoming, "connection": dict(incoming.get("connection") or {})}
    if not stored or stored.get("crm") != incoming.get("crm"):
        return merged
    withheld = withheld_secrets(incoming, stored)
    for path in SECRET_PATHS:
        if ".".join(path) in withheld:
            continue
        parent_in, parent_stored = merged, stored
        for key in path[:-1]:
            parent_in, parent_stored = parent_in.get(key, {}), parent_stored.get(key, {})
        if parent_in.get(path[-1]) in (None, MASK) and path[-1] in parent_stored:
            parent_in[path[-1]] = parent_stored[path[-1]]
    return merged


def withheld_secrets(incoming: dict, stored: dict | None) -> dict[str, str]:
    """Stored secrets a PUT may not keep by leaving them out or masked, because the endpoint they
    belong to changed: dotted path → why. Otherwise amoCRM's token would be sent to the new
    `base_url`'s host (whoever controls it), and a Bitrix24 portal's webhook URL and application token
    would go on serving another portal. The Metrika token is not tied to a configurable host."""
    if not stored or stored.get("crm") != incoming.get("crm") or not isinstance(incoming.get("connection"), dict):
        return {}
    new, old = incoming["connection"], stored.get("connection") or {}
    if incoming.get("crm") == "amocrm":
        moved = _moved(new.get("base_url"), old.get("base_url"), "connection.base_url")
        if not moved:
            return {}
        return {"connection.access_token": f"{moved}: send the access token for the new address (the stored "
                                           "one is never sent to another host)",
                "connection.webhook_secret": f"{moved}: send a webhook_secret for the new account's webhook URL "
                                             "(the stored one belongs to the old account's webhooks)"}
    if incoming.get("crm") == "bitrix24":
        withheld: dict[str, str] = {}
        url = new.get("webhook_url")
        moved = _moved(url, old.get("webhook_url"), "the portal (connection.webhook_url's host)") if url != MASK else None
        for key in ("member_id", "domain"):
            if not moved and isinstance(new.get(key), str) and old.get(key) and new[key].lower() != old[key].lower():
                moved = f"connection.{key} changed: this is another portal"
                withheld["connection.webhook_url"] = f"{moved}: send its incoming-webhook URL"
        if moved:
            withheld["connection.application_token"] = (f"{moved}: send its application_token (the stored one "
                                                        "belongs to the old portal)")
        return withheld
    return {}


def _moved(new_url: Any, old_url: Any, what: str) -> str | None:
    """"<what> changed (old host → new host)" when the two URLs lead to different places (scheme, host
    or port), else None. A value that is not a string is the schema's to refuse."""
    if not isinstance(new_url, str) or not isinstance(old_url, str):
        return None
    new, old = _origin(new_url), _origin(old_url)
    if new == old:
        return None
    return f"{what} changed ({_shown(old[1])} → {_shown(new[1])})"


def _origin(url: str) -> tuple[str, str, int | None]:
    try:
        parts = urlsplit(url.strip())
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
        return parts.scheme.lower(), (parts.hostname or "").rstrip("."), port
    except ValueError:
        return "", url, None


def _shown(host: str) -> str:
    host = "".join(ch for ch in host if ch.isprintable() and not ch.isspace())
    return (host if len(host) <= 80 else host[:80] + "…") or "?"


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
                     counter_time_zone: Callable[[dict], str], *, allow_loopback: bool = False,
                     around_save: Callable[[dict], AbstractContextManager] | None = None) -> dict:
    """Validate and store an integration. When `timezone` is absent it is read from the counter, which
    also proves the token can see the counter before anything is stored. `allow_loopback`: CRM URLs may
    point at loopback (`Settings.allow_loopback_crm`, the local stack and the tests only). `around_save`:
    called with the validated config; the config is stored inside the context it returns, and what it
    raises is the answer (the app pushes the status mapping to a new counter there and holds that
    counter's status lease until the config is stored, `mapping_admin.push_to_new_counter`).

    Every way a body can be wrong is an `ApiError` 400 naming the field (in `details`, or in the
    message for the body's shape); what is stored is the validated config, not the body as sent."""
    validate_integration_id(integration_id)
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object")
    _check_shape(body)
    # Assigned by the service (shared_counter): only the stored value may come back, checked below.
    sent_prefix, body = body.get("id_prefix"), {k: v for k, v in body.items() if k != "id_prefix"}
    # Read-only too, so that GET → edit → PUT works: kept while the time zone stays the counter's.
    sent_source, body = body.get("timezone_source"), {k: v for k, v in body.items() if k != "timezone_source"}
    body = {k: v for k, v in body.items() if k != "disabled"}  # read-only: set by the CRM's disable hook
    if sent_source not in (None, "counter"):
        raise invalid("integration config is invalid",
                      {"timezone_source": ["read-only: \"counter\" when the time zone was read from the counter"]})
    body = installed_parts(body, store.get_integration(integration_id))
    if "connection" in body and not isinstance(body["connection"], dict):
        # Before carry-over touches it; the other fields are still checked, to name every problem at once.
        errors: dict = {}
        try:
            IntegrationConfig(partial=("connection",)).load({k: v for k, v in body.items() if k != "connection"})
        except ValidationError as exc:
            errors = exc.messages if isinstance(exc.messages, dict) else {}
        raise invalid("integration config is invalid", {**errors, "connection": ["must be a JSON object"]})
    stored = store.get_integration(integration_id)
    merged = carry_over_secrets(body, stored)
    # A secret whose endpoint changed must come anew: named with the reason, before any other error
    # about the same field ("missing", or the mask's length) would say less.
    refused = {path: [reason] for path, reason in withheld_secrets(body, stored).items()
               if _at(merged, tuple(path.split("."))) in (None, MASK)}
    masked = [".".join(path) for path in SECRET_PATHS if _at(merged, path) == MASK and ".".join(path) not in refused]
    try:
        config = IntegrationConfig(allow_loopback=allow_loopback).load(merged)
    except ValidationError as exc:
        errors = exc.messages if isinstance(exc.messages, dict) else {"body": exc.messages}
        raise invalid("integration config is invalid", {**_without(errors, refused), **refused}) from exc
    if refused:
        raise invalid("integration config is invalid", refused)
    if masked:  # GET's mask sent back where nothing is stored to keep (another id, another CRM)
        raise invalid("integration config is invalid",
                      {path: [f"{MASK} stands for a stored secret; there is none here, send the value"] for path in masked})
    config.setdefault("client_id_field", DEFAULT_CLIENT_ID_FIELD[config["crm"]])
    config.setdefault("deleted_deal_status", "CANCELLED")
    read_from_counter = (sent_source == "counter" and stored is not None and stored.get("timezone_source") == "counter"
                         and stored.get("timezone") == config.get("timezone"))
    if read_from_counter and stored.get("counter_id") != config["counter_id"]:
        config.pop("timezone")  # the GET's time zone was the old counter's: read the new one's
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
    elif read_from_counter:
        config["timezone_source"] = "counter"  # a GET sent back as it was
    if stored is not None and stored.get("disabled"):  # only a reinstall from the CRM enables it again
        config["disabled"] = stored["disabled"]
    check_sent_prefix(stored, sent_prefix)  # a 400 before the status push below
    if config["crm"] == "amocrm":
        # The account's currency and country are read again on the next delivery. Before the save: should
        # this write fail, nothing is stored and the PUT can simply be sent again (after it, a 503 would
        # answer a config already stored); a save that then fails costs one extra account read.
        from .crm.amocrm.account import expire_account
        expire_account(store, str((config.get("connection") or {}).get("base_url") or ""))
    with around_save(config) if around_save is not None else nullcontext():
        config = saved_with_id_prefix(store, integration_id, config, sent_prefix)
    log_event("integration_saved", integration_id=integration_id, crm=config["crm"], counter_id=config["counter_id"])
    return public_view(config)


def installed_parts(body: dict, stored: dict | None) -> dict:
    """An integration installed from its CRM (the amoCRM install, the Bitrix24 application: `connection.auth`
    "oauth") keeps the install's connection: a PUT may send it back as GET shows it, or leave it out, but
    not change it. Its tokens are found by the connection's account (`account_id`, `member_id`) and sent
    to its address (`base_url`, `client_endpoint`): an admin PUT changing them pointed one account's
    tokens at another account's host, and a refresh refused there was recorded on the real integration's
    tokens. For the same reason `auth: "oauth"` is never set by hand: only an install stores tokens.
    Anything else in the body is the caller's."""
    stored_connection = (stored or {}).get("connection") or {}
    sent = body.get("connection")
    if not stored or stored_connection.get("auth") != "oauth":
        if isinstance(sent, dict) and sent.get("auth") == "oauth":
            raise invalid("integration config is invalid", {"connection.auth": [
                "\"oauth\" is set by installing from the CRM (GET /install/amocrm, or the Bitrix24 application), "
                "never by hand"]})
        return body
    shown = public_view(stored)["connection"]
    if sent is not None and sent != shown and sent != stored_connection:
        raise invalid("integration config is invalid", {"connection": [
            "set by the install from the CRM: send it back as GET shows it or leave it out; to change the "
            "account or portal, install there"]})
    return {**body, "connection": dict(stored_connection)}


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


def _without(errors: dict, paths: dict) -> dict:
    """marshmallow's nested messages less those about the connection fields in `paths` (dotted), which
    are named otherwise."""
    connection = errors.get("connection")
    if not isinstance(connection, dict):
        return errors
    rest = {key: value for key, value in errors.items() if key != "connection"}
    left = {key: value for key, value in connection.items() if f"connection.{key}" not in paths}
    return {**rest, "connection": left} if left else rest


def _at(config: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def get_integration(store: Any, integration_id: str) -> dict:
    config = store.get_integration(integration_id)
    if config is None:
        raise not_found(f"integration {integration_id!r}")
    return config
