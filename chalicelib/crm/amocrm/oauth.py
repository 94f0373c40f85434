"""amoCRM as an external integration (OAuth 2.0, authorization code): the pure checks of what an install
brings, and the calls to the account's OAuth endpoint and webhooks API.

Vendor documentation: "Авторизация OAuth 2.0. Пример по шагам",
https://www.amocrm.ru/developers/content/oauth/step-by-step (the authorization page, the redirect with
`code`, `state`, `referer`; `POST https://<account host>/oauth2/access_token` for `authorization_code` and
`refresh_token`; the access token lives 24 h, the refresh token 3 months and is replaced on every
refresh; the integration's disable hook); "Вебхуки" (API), https://www.amocrm.ru/developers/content/crm_platform/webhooks-api
(`POST /api/v4/webhooks` with `destination` and `settings`, `DELETE /api/v4/webhooks` with `destination`).

Secrets never follow a changed endpoint: the client secret and a refresh token are sent only to an
account host that `account_base_url` accepts (one label under amocrm.ru, kommo.com or amocrm.com, or
an exact sandbox host the deployment names), checked again before every call, through the outbound
session (no redirects, public addresses only).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any, Callable, Mapping

import requests

from ... import deadline
from ...errors import BridgeError, Misconfigured, Permanent, Transient
from ...integrations import AMOCRM_DOMAINS, endpoint_problem
from ...oauth import TokenPair, due_by_margin
from ...outbound import PrivateAddress
from ...outbound import session as checked_session
from .api import SOURCE, _retry_after

DEFAULT_AUTH_URL = "https://www.amocrm.ru/oauth"
# amoCRM's access token lives 24 h: refreshed when less than an hour is left (one refresh a day per
# integration, with an hour of margin for a busy worker).
DUE = due_by_margin(3600)
# The scheduled refresh: an integration not refreshed for 30 days is refreshed, far inside the refresh
# token's 3 months (an integration without deals never refreshes on its own).
MAX_IDLE_SECONDS = 30 * 86400
STATE_SECONDS = 20 * 60  # an install's state lives as long as amoCRM's code (20 minutes)
REINSTALL_HINT = ("install the integration again from amoCRM (amoMarket → the integration → install): the refresh "
                  "token was revoked (the integration disabled, or refreshed elsewhere) or went unused for 3 months")
WEBHOOK_EVENTS = ("add_lead", "update_lead", "status_lead", "delete_lead", "restore_lead", "add_contact",
                  "update_contact")
MAX_TOKEN = 8192  # an amoCRM access token is a JWT of ~1 KB; anything far longer is not one
_HOST = re.compile(r"[a-z0-9.-]{1,253}(:[0-9]{1,5})?")


# --- pure checks ---------------------------------------------------------------------------------------

def account_base_url(referer: Any, *, sandbox_hosts: tuple[str, ...] = ()) -> str:
    """The account's base URL from the redirect's `referer` (the account's host, e.g. shop.amocrm.ru),
    or ValueError naming why it is refused. `sandbox_hosts`: exact host:port names the deployment allows
    over http (the local stack's and the tests' sandbox); never a pattern."""
    if not isinstance(referer, str) or not _HOST.fullmatch(referer.lower()):
        raise ValueError("referer must be the amoCRM account's host, such as shop.amocrm.ru")
    host = referer.lower()
    if host in sandbox_hosts:
        return f"http://{host}"
    if ":" in host:  # an account is its host alone: no port takes the client secret elsewhere on it
        raise ValueError("referer must be the amoCRM account's host without a port, such as shop.amocrm.ru")
    problem = endpoint_problem(f"https://{host}", domains=AMOCRM_DOMAINS)
    if problem:
        raise ValueError(f"referer {problem}")
    return f"https://{host}"


def sign_state(secret: str, *, now: float, ttl: float = STATE_SECONDS) -> str:
    """A `state` for the authorization page: its expiry and a nonce, signed with a stage secret."""
    expires, nonce = int(now + ttl), secrets.token_urlsafe(12)
    return f"{expires}.{nonce}.{_state_mac(secret, expires, nonce)}"


def state_problem(secret: str, state: Any, *, now: float) -> str | None:
    """Why a `state` is not one we issued in the last STATE_SECONDS, or None. Constant-time compare."""
    # ASCII only, as we issue it: a lone surrogate (a JSON event may carry one) cannot even be encoded.
    if not isinstance(state, str) or len(state) > 200 or state.count(".") != 2 or not state.isascii():
        return "state is missing or malformed"
    expires, nonce, mac = state.split(".")
    if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:  # "²".isdigit(), but int() refuses it
        return "state is malformed"
    if not hmac.compare_digest(mac.encode(), _state_mac(secret, int(expires), nonce).encode()):
        return "state was not issued by this service"
    if int(expires) < now:
        return "state has expired: start the installation again"
    return None


def _state_mac(secret: str, expires: int, nonce: str) -> str:
    digest = hmac.new(secret.encode(), f"amocrm-install|{expires}|{nonce}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def disable_signature_ok(client_id: str, client_secret: str, query: Mapping[str, Any]) -> bool:
    """The disable hook's proof: `signature` = hex HMAC-SHA256 of "<client_uuid>|<account_id>" keyed
    by the client secret, and `client_uuid` is our client id. Constant time."""
    client_uuid, account_id, signature = (query.get(k) for k in ("client_uuid", "account_id", "signature"))
    # ASCII only (what amoCRM sends): a lone surrogate (a JSON event may carry one) cannot even be encoded.
    if not all(isinstance(v, str) and 0 < len(v) <= 200 and v.isascii() for v in (client_uuid, account_id, signature)):
        return False
    expected = hmac.new(client_secret.encode(), f"{client_uuid}|{account_id}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(client_uuid.encode(), client_id.encode()) & \
        hmac.compare_digest(str(signature).lower().encode(), expected.encode())


def token_pair(status: int, body: bytes, *, now: float) -> TokenPair | BridgeError:
    """The answer of `/oauth2/access_token` as a pair, or the error the taxonomy has for it: no JSON or
    a 5xx/429 `Transient`; 400/401/403 (invalid_grant, revoked, bad client) `Misconfigured`; a 200
    without sane tokens `Transient` (a proxy's page). Pure."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if status == 429 or status >= 500:
        return Transient(f"amoCRM's OAuth endpoint answered {status}", source=SOURCE, status=status)
    if status != 200:
        detail = ""
        if isinstance(data, dict):
            detail = str(data.get("hint") or data.get("detail") or data.get("title") or "")[:300]
            said = " ".join(str(data.get(k) or "") for k in ("error", "hint", "detail", "message")).lower()
            if "invalid_client" in said or "client authentication failed" in said:
                # Our client id or secret (league/oauth2-server's words, which amoCRM's endpoint answers
                # with), not the refresh token, which is still alive: no 4xx status, so not recorded as
                # a refused refresh (chalicelib.oauth `refused`).
                return Misconfigured(f"amoCRM's OAuth endpoint refused this integration's client id or secret "
                                     f"({status}: {detail or 'invalid_client'}): check AMOCRM_CLIENT_ID and the "
                                     "stage's SSM client secret", source=SOURCE)
        return Misconfigured(f"amoCRM's OAuth endpoint answered {status}{': ' + detail if detail else ''}",
                             source=SOURCE, status=status)
    if not isinstance(data, dict):
        return Transient("amoCRM's OAuth endpoint answered 200 without JSON", source=SOURCE, status=status)
    access, refresh, expires_in = data.get("access_token"), data.get("refresh_token"), data.get("expires_in")
    if not (isinstance(access, str) and isinstance(refresh, str) and 0 < len(access) <= MAX_TOKEN
            and 0 < len(refresh) <= MAX_TOKEN and re.fullmatch(r"[\x21-\x7e]+", access + refresh)):
        return Transient("amoCRM's OAuth endpoint answered 200 without a usable token pair", source=SOURCE)
    # expires_in: a positive int, at most a year (a bool, a string or 10**2000 means "refresh soon")
    if not (isinstance(expires_in, int) and not isinstance(expires_in, bool) and 0 < expires_in <= 366 * 86400):
        expires_in = 3600
    return TokenPair(access, refresh, int(now) + expires_in)


# --- calls ---------------------------------------------------------------------------------------------

class AmoOAuth:
    """Our app's side of amoCRM's OAuth: code exchange, refresh (the `chalicelib.oauth.Refresher` of
    amoCRM), and webhook (un)registration. `client_secret` is a callable: read lazily (SSM)."""

    source = SOURCE
    reinstall_hint = REINSTALL_HINT

    def __init__(self, client_id: str, client_secret: Callable[[], str], redirect_uri: str, *,
                 sandbox_hosts: tuple[str, ...] = (), session: requests.Session | None = None,
                 timeout: tuple[float, float] = (3.05, 10.0), clock: Callable[[], float] = time.time) -> None:
        self._client_id, self._secret, self._redirect_uri = client_id, client_secret, redirect_uri
        self._sandbox_hosts = sandbox_hosts
        self._session = session or checked_session()
        self._timeout, self._clock = timeout, clock

    def __repr__(self) -> str:
        return f"AmoOAuth({self._client_id!r})"

    def base_url(self, referer: str) -> str:
        return account_base_url(referer, sandbox_hosts=self._sandbox_hosts)

    def exchange(self, base_url: str, code: str) -> TokenPair:
        return self._token_call(base_url, {"grant_type": "authorization_code", "code": code})

    def refresh(self, integration: dict, refresh_token: str) -> TokenPair:
        base_url = str((integration.get("connection") or {}).get("base_url") or "")
        return self._token_call(base_url, {"grant_type": "refresh_token", "refresh_token": refresh_token})

    def _token_call(self, base_url: str, grant: dict) -> TokenPair:
        host = base_url.split("://", 1)[-1].rstrip("/")
        try:  # checked again here: the secret goes to nothing else, whatever the config says
            checked = account_base_url(host, sandbox_hosts=self._sandbox_hosts)
        except ValueError as exc:
            raise Misconfigured(f"the account's address {host[:100]!r} is not amoCRM's: {exc}", source=SOURCE) from exc
        if checked != base_url.rstrip("/"):
            raise Misconfigured(f"the account's address {base_url[:100]!r} is not amoCRM's", source=SOURCE)
        body = {"client_id": self._client_id, "client_secret": self._secret(), "redirect_uri": self._redirect_uri,
                **grant}
        answer = self._call("POST", checked + "/oauth2/access_token", json_body=body)
        result = token_pair(answer.status_code, answer.content, now=self._clock())
        if isinstance(result, BridgeError):
            raise result
        return result

    def register_webhook(self, base_url: str, access_token: str, destination: str) -> None:
        answer = self._paced_call("POST", base_url + "/api/v4/webhooks", token=access_token,
                                  json_body={"destination": destination, "settings": list(WEBHOOK_EVENTS), "sort": 10})
        _raise_for(answer, "registering the webhook")

    def unregister_webhook(self, base_url: str, access_token: str, destination: str) -> None:
        answer = self._paced_call("DELETE", base_url + "/api/v4/webhooks", token=access_token,
                                  json_body={"destination": destination})
        if answer.status_code != 404:  # already gone: nothing to do
            _raise_for(answer, "removing the webhook")

    def _paced_call(self, method: str, url: str, *, json_body: dict, token: str) -> requests.Response:
        """A webhook call made once per install or deletion, outside the worker's shared rate limiter:
        the account's 7 requests a second may be spent by deliveries running at the same moment, so a
        429 is tried once more after its Retry-After (at most 2 s, and only with the time left)."""
        answer = self._call(method, url, json_body=json_body, token=token)
        if answer.status_code == 429:
            asked = _retry_after(answer.headers)
            wait = asked if asked is not None and 0.0 <= asked <= 2.0 else (2.0 if asked and asked > 2.0 else 1.0)
            if deadline.has(wait + self._timeout[0] + 1.0):
                time.sleep(wait)
                answer = self._call(method, url, json_body=json_body, token=token)
        return answer

    def _call(self, method: str, url: str, *, json_body: dict, token: str | None = None) -> requests.Response:
        timeout = deadline.clip(self._timeout, source=SOURCE, what="amoCRM")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            return self._session.request(method, url, json=json_body, headers=headers, timeout=timeout,
                                         allow_redirects=False)
        except PrivateAddress as exc:
            raise Misconfigured(f"amoCRM's host {exc.host} resolves to {exc.address}, not a public address",
                                source=SOURCE) from exc
        except requests.Timeout as exc:
            if timeout != self._timeout:
                raise deadline.cut_short(timeout, source=SOURCE, what="amoCRM") from exc
            raise Transient("amoCRM did not answer in time", source=SOURCE) from exc
        except requests.RequestException as exc:
            raise Transient(f"amoCRM unreachable: {type(exc).__name__}", source=SOURCE) from exc


def _raise_for(answer: requests.Response, what: str) -> None:
    status = answer.status_code
    if 200 <= status < 300:
        return
    if status == 429 or status >= 500:
        raise Transient(f"amoCRM answered {status} {what}", source=SOURCE, status=status)
    if status in (401, 403) or 300 <= status < 400:
        raise Misconfigured(f"amoCRM answered {status} {what}", source=SOURCE, status=status)
    raise Permanent(f"amoCRM answered {status} {what}", source=SOURCE, status=status)
