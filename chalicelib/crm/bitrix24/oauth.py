"""Bitrix24's OAuth server: refreshing an application's token pair (requests adapter + pure parsing).

The request and its answer ("Full OAuth 2.0 Authorization Protocol",
https://apidocs.bitrix24.com/settings/oauth/index.html): `GET {oauth server}/oauth/token/?grant_type=
refresh_token&client_id=…&client_secret=…&refresh_token=…` answers `access_token`, `refresh_token` (a new
one: the old one is spent), `expires` (Unix seconds), `expires_in` (3600), `client_endpoint`,
`server_endpoint`, `member_id`, `domain`, `scope`, `status`, `user_id`.

The OAuth server is a setting (`Settings.bitrix24_oauth_url`, default `https://oauth.bitrix.info`, the
address the vendor's documentation names), never an address taken from a request: the client secret and
the refresh tokens go to it alone. What it answers (`member_id`, `client_endpoint`) is what the install
trusts, not the install form's DOMAIN (chalicelib/bitrix24_app.py).

Errors: 400/401 with `invalid_grant` / `invalid_client` / `expired_token` / `NO_AUTH_FOUND` mean the
refresh token (or our client) is refused: `Permanent` (a person must reinstall the application); 429,
5xx, no answer, an answer that is not JSON → `Transient`; a redirect → `Misconfigured` (not followed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import requests

from ... import deadline
from ...errors import BridgeError, Misconfigured, Permanent, Transient
from ...outbound import PrivateAddress
from ...outbound import session as checked_session

SOURCE = "bitrix24"
DEFAULT_OAUTH_URL = "https://oauth.bitrix.info"
REINSTALL = ("install the application on the Bitrix24 portal again (Applications → the app → Reinstall): the "
             "portal refused its refresh token (revoked, already used, or unused for 180 days)")
MAX_TOKEN = 1024  # Bitrix24 tokens are ~70 characters; anything near this is not one


@dataclass(frozen=True)
class Grant:
    """One answer of the OAuth server: the new pair and the portal it belongs to."""

    access_token: str
    refresh_token: str
    expires_at: int  # Unix seconds
    member_id: str
    client_endpoint: str
    domain: str | None = None

    def __repr__(self) -> str:  # tokens are secrets: never in a log line or a traceback
        return f"Grant(member_id={self.member_id!r}, client_endpoint={self.client_endpoint!r}, expires_at={self.expires_at})"


def parse_grant(status: int, body: bytes, *, now: float) -> Grant | BridgeError:
    """The OAuth server's answer as a `Grant`, or the failure it means. Pure."""
    if 300 <= status < 400:
        return Misconfigured(f"the Bitrix24 OAuth server answered {status} (a redirect, not followed)", source=SOURCE,
                             status=status)
    try:
        data = json.loads(body)
    except ValueError:
        return Transient(f"the Bitrix24 OAuth server answered {status} with a body that is not JSON", source=SOURCE,
                         status=status)
    data = data if isinstance(data, dict) else {}
    if status == 429 or status >= 500:
        return Transient(f"the Bitrix24 OAuth server answered {status}", source=SOURCE, status=status)
    if status >= 400 or "error" in data:
        code = str(data.get("error") or status)[:60]
        if code.lower() == "invalid_client":  # our client id or secret, not the refresh token: still alive
            return Misconfigured("the Bitrix24 OAuth server refused this application's client id or secret "
                                 "(invalid_client): check BITRIX24_CLIENT_ID and the stage's SSM client secret",
                                 source=SOURCE)
        return Permanent(f"the Bitrix24 OAuth server refused the refresh ({code}); {REINSTALL}", source=SOURCE,
                         status=status)
    tokens = {key: data.get(key) for key in ("access_token", "refresh_token", "member_id", "client_endpoint")}
    bad = [key for key, value in tokens.items() if not isinstance(value, str) or not value or len(value) > MAX_TOKEN
           or not value.isascii() or not value.isprintable()]
    expires_in = data.get("expires_in")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or not 0 < expires_in <= 86400:
        bad.append("expires_in")
    if bad:
        return Transient(f"the Bitrix24 OAuth server's answer lacks a valid {', '.join(bad)}", source=SOURCE,
                         status=status)
    domain = data.get("domain") if isinstance(data.get("domain"), str) else None
    # `expires_in` from our own clock, not the server's `expires`: a skewed clock must not keep a dead token.
    return Grant(tokens["access_token"], tokens["refresh_token"], int(now) + expires_in, tokens["member_id"],
                 tokens["client_endpoint"], domain)


class Bitrix24OAuth:
    """Refreshes through the configured OAuth server. `client_secret` is read when first needed (SSM)."""

    def __init__(self, oauth_url: str, client_id: str, client_secret: Callable[[], str], *,
                 session: requests.Session | None = None, timeout: tuple[float, float] = (3.05, 10.0),
                 clock: Callable[[], float] | None = None) -> None:
        import time
        self._url = oauth_url.rstrip("/") + "/oauth/token/"
        self._client_id, self._client_secret = client_id, client_secret
        self._session = session or checked_session()
        self._timeout, self._clock = timeout, clock or time.time

    def __repr__(self) -> str:
        return f"Bitrix24OAuth({self._url!r})"

    def refresh(self, refresh_token: str) -> Grant:
        """One refresh: the new pair, or the failure raised (module docstring). Never retried here: a
        refresh whose answer was lost may have spent the token already, and the caller decides."""
        if not self._client_id:
            raise Misconfigured("BITRIX24_CLIENT_ID is not set (the application's client id, in the stage's "
                                "environment): this deployment cannot refresh Bitrix24 tokens", source=SOURCE)
        params: dict[str, Any] = {"grant_type": "refresh_token", "client_id": self._client_id,
                                  "client_secret": self._client_secret(), "refresh_token": refresh_token}
        timeout = deadline.clip(self._timeout, source=SOURCE, what="the Bitrix24 OAuth server")
        try:
            response = self._session.get(self._url, params=params, timeout=timeout, allow_redirects=False)
        except PrivateAddress as exc:
            raise Misconfigured(f"the Bitrix24 OAuth server {exc.host} resolves to a private address", source=SOURCE) from exc
        except requests.RequestException as exc:
            if isinstance(exc, requests.Timeout) and timeout != self._timeout:
                # Not chained: the exception's message holds the URL, whose query carries the client secret
                # and the refresh token, and a traceback would print it.
                raise deadline.cut_short(timeout, source=SOURCE, what="the Bitrix24 OAuth server") from None
            raise Transient(f"the Bitrix24 OAuth server is unreachable: {type(exc).__name__}", source=SOURCE) from None
        answer = parse_grant(response.status_code, response.content, now=self._clock())
        if isinstance(answer, BridgeError):
            raise answer
        return answer
