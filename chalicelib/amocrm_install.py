"""Installing the service into an amoCRM account as an external integration (OAuth 2.0), and the
integration being disabled there. What `GET /install/amocrm`, `GET /oauth/amocrm` and
`GET /oauth/amocrm/disable` do (app.py keeps them a few lines each).

The install, in order; everything it takes is checked before anything is written:

1. `start_url`: amoCRM's authorization page with our client id and a `state` signed with the client
   secret (expiry + nonce, `crm.amocrm.oauth.sign_state`): no store item, nothing to clean up.
2. `complete`: the redirect back. `state` verified, `referer` accepted as an amoCRM account host (or the
   deployment's sandbox host), `code` shaped like one — a 400 naming the field otherwise, before any call.
   The code is exchanged at that account's `/oauth2/access_token` (amoCRM refuses a used or expired
   code: a replay changes nothing); the account's id read with the new token (`GET /api/v4/account`).
3. The integration's id comes from the account (`amocrm-<account id>`), so a reinstall updates the
   same integration: its Metrika settings and mappings stay. Tokens are stored first (their own item,
   `TokenStore.put_tokens`), then the config (`connection.auth = "oauth"`, no token in it): a crash
   between the two leaves tokens without a config, which the next install overwrites.
4. Our webhook is registered (`POST /api/v4/webhooks`, the secret URL the webhook route expects) and
   the stage defaults for the status mapping are proposed (shown; applied by the admin's
   `POST /integrations/{id}/status-mapping/defaults` once a Metrika counter is connected).

A new account's integration has no Metrika counter yet: deliveries park with a message saying so
(`unusable`) until an admin PUTs `counter_id` and `metrika_token`, then replays.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
import time
from typing import Any, Callable
from urllib.parse import urlencode

from .crm.amocrm.api import AmoCrmClient
from .crm.amocrm.oauth import DEFAULT_AUTH_URL, AmoOAuth, disable_signature_ok, sign_state, state_problem
from .errors import ApiError, BridgeError, http_error, invalid, not_found
from .logs import log_event
from .oauth import public_view
from .settings import Settings

PREFIX = "amocrm-"
SECRET_TTL_SECONDS = 300.0  # how long a container trusts its read of the client secret (a rotation shows after ≤ 5 min)
_CODE = re.compile(r"[\x21-\x7e]{1,4096}")


def integration_id_for(account_id: str) -> str:
    return f"{PREFIX}{account_id}"


def webhook_secret_for(client_secret: str, integration_id: str) -> str:
    """A new integration's webhook secret: derived from our client secret, so two installs of one account
    racing (a double click) register and store the same one — a random one each would leave amoCRM
    posting with one secret and the config holding the other. Unguessable without the client secret;
    a reinstall keeps the stored one."""
    digest = hmac.new(client_secret.encode(), f"amocrm-webhook|{integration_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def unusable(integration: dict, integration_id: str = "") -> str | None:
    """Why nothing of this integration can be delivered now, or None: it was disabled in the CRM, or an
    install created it and no Metrika counter is connected yet. Pure."""
    disabled = integration.get("disabled")
    if isinstance(disabled, dict):
        return (f"the integration was disabled in {integration.get('crm', 'the CRM')} ({disabled.get('reason', 'uninstalled')}): "
                "install it again to resume deliveries, then replay the parked deals")
    if not integration.get("counter_id") or not integration.get("metrika_token"):
        return (f"no Metrika counter is connected yet: PUT /integrations/{integration_id or '<id>'} with counter_id "
                "and metrika_token, then replay the parked deals")
    return None


class ClientSecret:
    """Our app's client secret: the env override (local stack, tests), else the stage's SSM
    SecureString, read on first use and kept SECRET_TTL_SECONDS. Thread-safe."""

    def __init__(self, settings: Settings, *, ssm: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings, self._ssm, self._clock = settings, ssm, clock
        self._lock = threading.Lock()
        self._value: tuple[float, str] | None = None

    def __call__(self) -> str:
        if self._settings.amocrm_client_secret:
            return self._settings.amocrm_client_secret
        with self._lock:
            if self._value is None or self._clock() - self._value[0] > SECRET_TTL_SECONDS:
                self._value = (self._clock(), self._read())
            return self._value[1]

    def _read(self) -> str:
        from .errors import Unavailable
        name = self._settings.amocrm_client_secret_parameter
        if not name:
            raise not_configured("no client secret parameter (AMOCRM_CLIENT_SECRET_PARAMETER)")
        ssm = self._ssm
        if ssm is None:
            from .admin import _ssm_client
            ssm = self._ssm = _ssm_client()
        try:
            return ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        except Exception as exc:  # botocore's errors; the value is never in a message
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code == "ParameterNotFound":  # an answer, not an outage: the stage lacks the secret
                raise not_configured(f"the SSM parameter {name} does not exist") from exc
            raise Unavailable("ssm", f"GetParameter: {code or type(exc).__name__}") from exc


def not_configured(what: str) -> ApiError:
    """501: this stage cannot take amoCRM installs (a deployment setting is missing, README "Installing
    from amoCRM"). Not a 503: retrying will not help until an operator sets it."""
    return ApiError(501, "not_configured", f"amoCRM installs are not configured in this stage: {what}")


def oauth_for(settings: Settings, secret: Callable[[], str]) -> AmoOAuth:
    if not settings.amocrm_client_id or not settings.public_url:
        raise not_configured("set AMOCRM_CLIENT_ID and PUBLIC_URL")
    return AmoOAuth(settings.amocrm_client_id, secret, redirect_uri(settings),
                    sandbox_hosts=settings.amocrm_sandbox_hosts)


def redirect_uri(settings: Settings) -> str:
    return f"{settings.public_url}/oauth/amocrm"


def start_url(settings: Settings, secret: Callable[[], str], *, now: float) -> str:
    """amoCRM's authorization page for our integration, with a fresh signed state."""
    if not settings.amocrm_client_id:
        raise not_configured("set AMOCRM_CLIENT_ID")
    query = urlencode({"client_id": settings.amocrm_client_id, "state": sign_state(secret(), now=now),
                       "mode": "post_message"})
    return f"{settings.amocrm_auth_url or DEFAULT_AUTH_URL}?{query}"


def complete(store: Any, oauth: AmoOAuth, query: dict, *, secret: str, client_id: str, public_url: str,
             now: float, propose: Callable[[str], list[dict]] | None = None,
             client_options: dict | None = None) -> dict:
    """The redirect back from amoCRM: verify, exchange, store, register the webhook. Raises `ApiError`."""
    query = query or {}
    problem = state_problem(secret, query.get("state"), now=now)
    if problem:
        raise ApiError(400, "invalid_state", f"{problem}; nothing was installed", {"state": [problem]})
    if query.get("client_id") not in (None, client_id):
        raise invalid("client_id is not this service's amoCRM integration; nothing was installed",
                      {"client_id": ["not ours"]})
    code = query.get("code")
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        raise invalid("code is missing or malformed; nothing was installed", {"code": ["required: amoCRM's code"]})
    try:
        base_url = oauth.base_url(query.get("referer"))
    except ValueError as exc:
        raise invalid(f"{exc}; nothing was installed", {"referer": [str(exc)]}) from exc
    try:
        pair = oauth.exchange(base_url, code)
        account = AmoCrmClient(base_url, pair.access_token, attempts=2, **(client_options or {})).get("/api/v4/account")
    except BridgeError as exc:
        raise http_error("amoCRM refused the installation (a code works once and for 20 minutes: start again)", exc) from exc
    account_id = (account or {}).get("id") if isinstance(account, dict) else None
    if isinstance(account_id, bool) or not isinstance(account_id, int) or not 0 < account_id < 10 ** 19:
        raise ApiError(502, "crm_unavailable", "amoCRM's account answer carries no account id; try again")
    integration_id = integration_id_for(str(account_id))
    stored = store.get_integration(integration_id)
    if stored is not None and stored.get("crm") != "amocrm":
        raise ApiError(409, "conflict", f"integration {integration_id!r} exists and is not an amoCRM integration")
    connection = dict((stored or {}).get("connection") or {})
    webhook_secret = connection.get("webhook_secret") or webhook_secret_for(secret, integration_id)
    connection = {"base_url": base_url, "account_id": str(account_id), "auth": "oauth", "webhook_secret": webhook_secret}
    config = {k: v for k, v in (stored or {"client_id_field": "_YM_UID", "deleted_deal_status": "CANCELLED"}).items()
              if k != "disabled"}
    config.update(crm="amocrm", connection=connection)
    store.put_tokens(integration_id, pair.fields())  # first: a config naming OAuth always finds tokens
    store.put_integration(integration_id, config)
    log_event("amocrm_installed", integration_id=integration_id, reinstall=stored is not None)
    destination = webhook_destination(public_url, integration_id, webhook_secret)
    answer: dict[str, Any] = {"installed": integration_id, "account_id": str(account_id), "base_url": base_url,
                              "reinstall": stored is not None,
                              "webhook": f"{public_url}/webhooks/amocrm/{integration_id}?secret=…"}
    try:
        oauth.register_webhook(base_url, pair.access_token, destination)
        answer["webhook_registered"] = True
    except BridgeError as exc:
        answer["webhook_registered"] = False
        answer["webhook_error"] = f"{exc.message}: install again to retry"
    waiting = unusable(config, integration_id)
    answer["next"] = waiting or "deliveries are on: deals changed in amoCRM now reach Metrika"
    if propose is not None:
        try:
            answer["status_mapping_proposed"] = propose(integration_id)
        except (ApiError, BridgeError) as exc:
            answer["status_mapping_proposed"] = {"error": getattr(exc, "message", str(exc))}
    return answer


def disable(store: Any, query: dict, *, client_id: str, client_secret: str, now: float) -> dict:
    """amoCRM's disable hook: verified by its signature (else 403, nothing changes), then the account's
    integration is marked disabled (deliveries and webhooks refuse it; status shows it)."""
    query = query or {}
    if not disable_signature_ok(client_id, client_secret, query):
        raise ApiError(403, "forbidden", "the disable hook's signature does not verify; nothing was changed",
                       {"signature": ["does not verify"]})
    account_id = query["account_id"]
    if not (account_id.isascii() and account_id.isdigit()) or len(account_id) > 19:
        raise invalid("account_id must be the numeric account id", {"account_id": ["must be numeric"]})
    integration_id = integration_id_for(account_id)
    config = store.get_integration(integration_id)
    if config is None:
        raise not_found(f"integration {integration_id!r}")
    if not config.get("disabled"):
        config["disabled"] = {"at": int(now), "reason": "disabled in amoCRM by the account's administrator"}
        store.put_integration(integration_id, config)
        log_event("amocrm_disabled", integration_id=integration_id)
    return {"disabled": integration_id, "at": config["disabled"]["at"]}


def webhook_destination(public_url: str, integration_id: str, webhook_secret: str) -> str:
    return f"{public_url}/webhooks/amocrm/{integration_id}?{urlencode({'secret': webhook_secret})}"


def remove_webhook(store: Any, integration_id: str, *, keeper: Any, oauth: AmoOAuth | None, public_url: str | None) -> dict:
    """Before `DELETE /integrations/{id}` of an installed integration: unregister our webhook from the
    account (`DELETE /api/v4/webhooks`), so amoCRM stops posting to a route that would refuse it. Best
    effort: what happened is said in the answer, and the deletion goes on either way (the account's
    administrator can remove the hook in amoCRM). Nothing for other integrations, or a disabled one
    (its tokens are revoked)."""
    config = store.get_integration(integration_id)
    connection = (config or {}).get("connection") or {}
    if config is None or connection.get("auth") != "oauth" or isinstance(config.get("disabled"), dict):
        return {}
    if keeper is None or oauth is None or not public_url:
        return {"webhook_removed": False, "webhook_error": "amoCRM installs are not configured in this stage"}
    destination = webhook_destination(public_url, integration_id, connection.get("webhook_secret", ""))
    try:
        token = keeper.access_token(integration_id_for(connection.get("account_id", "")), config)
        oauth.unregister_webhook(connection["base_url"], token, destination)
    except BridgeError as exc:
        return {"webhook_removed": False, "webhook_error": exc.message}
    return {"webhook_removed": True}


def token_status(store: Any, integration_id: str, integration: dict) -> dict:
    """What `GET …/status` adds for an installed integration: the tokens' times and a refresh failure
    (never a token), and why deliveries stop, if they do."""
    extra: dict[str, Any] = {}
    if (integration.get("connection") or {}).get("auth") == "oauth":
        extra["oauth"] = public_view(store.get_tokens(integration_id))
    if integration.get("disabled"):
        extra["disabled"] = integration["disabled"]
    problem = unusable(integration, integration_id)
    if problem:
        extra["deliveries_stopped"] = problem
    return extra

