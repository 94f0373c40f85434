"""OAuth 2.0 tokens of an installed integration, CRM-neutral: one writer refreshes, everyone else waits.

Both CRMs hand out an access token and a refresh token that is **single-use**: refreshing returns a new
pair and the old refresh token dies, even for a process that had not used it yet (amoCRM: "Авторизация
OAuth 2.0", https://www.amocrm.ru/developers/content/oauth/step-by-step; Bitrix24: "Продление
авторизации OAuth", https://apidocs.bitrix24.ru/api-reference/oauth/index.html). Two workers refreshing
at once would leave one of them — and so the integration — with a dead refresh token. So:

* The tokens live in their own store item (`TokenStore`), never in the integration's config: a PUT of
  the config cannot overwrite a refreshed token, and the admin API never shows them.
* `TokenKeeper.access_token` returns the stored access token while it is fresh. When it is due (less
  than `margin` seconds left, or the CRM just refused it), ONE conditional write
  (`take_refresh_lease`: the version read, and no live lease) elects the refresher. It calls the CRM
  (`Refresher.refresh`) and stores the new pair with version + 1 (`finish_refresh`, conditional on the
  version it read). The others wait — bounded, and within the invocation's deadline
  (`chalicelib.deadline`) — re-reading until the version changes, then use the new token.
* A refresh the CRM refuses (invalid_grant, revoked, 401) is recorded (`refused`: not our own
  configuration failing before the call, which leaves the refresh token alive) on the item and raised as
  `RefreshRefused` (a `Misconfigured`: the taxonomy's class for "a person must act"; the worker parks
  the integration's deals with its message and `GET /integrations/{id}/status` shows it). Until a
  reinstall stores a new pair (`put_tokens` clears the failure) nobody asks the CRM again: a refused
  refresh token is never accepted later.
* A refresher that dies holding the lease stops blocking others once the lease (`lease_seconds`, longer
  than any refresh call may take) has passed: the next caller takes it over. What cannot be recovered:
  a process that died after the CRM answered and before `finish_refresh` stored the answer. The CRM has
  already killed the old refresh token and the new one died with the process, so the takeover's refresh
  is refused and the integration must be reinstalled. No ordering of writes avoids this (the new pair
  exists only in the CRM's answer); the window is one HTTP answer plus one write.
* A slow refresher whose lease passed and was taken over still stores its pair if the version is still
  the one it read (its pair is the one the CRM now honours); the takeover's own attempt then fails its
  version condition, or is refused by the CRM, and re-reads the stored pair instead of recording a
  failure (`release_refresh` is conditional on the version too).

Tokens are secrets: this module never logs them, and `public_view` is all the admin API may show.
"""
from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from . import deadline
from .errors import BridgeError, Misconfigured, OutOfTime, Transient

if TYPE_CHECKING:
    from .store import IntegrationStore, TokenStore

# Seconds a refresher holds the lease: longer than the refresh call can take (a clipped (3.05, 10) s
# timeout) plus the write after it, so a live refresher is never taken over; short enough that a dead
# one blocks deliveries for half a minute only.
LEASE_SECONDS = 30.0
# How long a caller waits for another's refresh before giving up this time (a `RefreshPending`, retried
# later without counting an attempt). A refresh takes about a second; this covers a slow CRM.
WAIT_SECONDS = 15.0
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class TokenPair:
    """What the CRM's OAuth endpoint answered. `extra`: CRM-specific values kept with the tokens (e.g.
    Bitrix24's `client_endpoint`); plain JSON values, names other than the reserved ones below."""

    access_token: str
    refresh_token: str
    expires_at: int  # epoch seconds
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never show the tokens
        return f"TokenPair(expires_at={self.expires_at})"

    def fields(self) -> dict:
        reserved = set(RESERVED) & set(self.extra)
        if reserved:
            raise ValueError(f"TokenPair.extra may not set {sorted(reserved)}")
        return {**self.extra, "access_token": self.access_token, "refresh_token": self.refresh_token,
                "expires_at": int(self.expires_at)}


# Attributes of the tokens item the store manages itself.
RESERVED = ("version", "refreshing_until", "lease_owner", "failure", "refreshed_at")


class Refresher(Protocol):
    """One per CRM, in its adapter package. `refresh` calls the CRM's OAuth endpoint and raises the
    taxonomy: `Transient` (no answer, 5xx: try again), `Misconfigured`/`Permanent` (the CRM refused the
    refresh token: invalid_grant, revoked, 401). It must send the refresh token and the client secret
    only to the CRM's own OAuth host."""

    source: str  # "amocrm", "bitrix24": the error's source
    reinstall_hint: str  # what a person does when the refresh is refused

    def refresh(self, integration: dict, refresh_token: str) -> TokenPair: ...


class RefreshRefused(Misconfigured):
    """The CRM refused the refresh token: nothing of this integration can be read until it is installed
    again. Parks the integration's deals with the message."""


class RefreshPending(OutOfTime):
    """Another worker is refreshing and did not finish while we waited: retried later, not counted as a
    failed attempt (nothing is wrong with the entity)."""


def public_view(tokens: dict | None) -> dict | None:
    """What the admin API shows of the tokens item: times and the failure, never a token."""
    if tokens is None:
        return None
    view = {k: tokens[k] for k in ("expires_at", "refreshed_at", "version") if k in tokens}
    if tokens.get("failure"):
        view["refresh_failure"] = dict(tokens["failure"])
    return view


def refused(exc: BridgeError) -> bool:
    """Whether a refresh's failure is the CRM refusing the refresh token (recorded: nobody asks again
    until a reinstall), not our own side failing before or around the call: a `Misconfigured` without a
    4xx answer (no client id, the SSM client secret missing, a host our checks refuse, a redirect) is
    raised as it is with the lease given back, and the same refresh token is tried again once a person
    has fixed the stage; recording it would make every integration that came due meanwhile need a
    reinstall by its own account."""
    if isinstance(exc, Misconfigured):
        return exc.status is not None and 400 <= exc.status < 500
    return True


def due_by_margin(margin: float) -> Callable[[dict, float], bool]:
    """A due rule: the access token has less than `margin` seconds left (amoCRM: 1 h of its 24 h)."""
    def due(tokens: dict, now: float) -> bool:
        expires_at = tokens.get("expires_at")
        return not isinstance(expires_at, (int, float)) or expires_at - now < margin
    return due


class TokenKeeper:
    """The single writer of an integration's tokens. Thread-safe: it keeps no state of its own between
    calls (everything is in the store), so one keeper serves the worker's threads side by side.

    `clock` (epoch seconds) and `sleep` are injectable: tests run races without real waits."""

    def __init__(self, store: TokenStore, refresher: Refresher, *, due: Callable[[dict, float], bool],
                 integrations: IntegrationStore | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, lease_seconds: float = LEASE_SECONDS,
                 wait_seconds: float = WAIT_SECONDS, poll_seconds: float = POLL_SECONDS) -> None:
        self._store = store
        self._refresher = refresher
        self._due = due
        self._integrations = integrations
        self._clock, self._sleep = clock, sleep
        self._lease, self._wait, self._poll = lease_seconds, wait_seconds, poll_seconds

    def access_token(self, integration_id: str, integration: dict | None = None, *,
                     rejected: str | None = None) -> str:
        """The integration's current access token, refreshed first when due. `rejected`: the token the
        CRM just answered 401 to — refreshed unless the stored one is already another (someone else
        refreshed meanwhile). Raises `RefreshRefused` (recorded), `RefreshPending`, or the refresher's
        `Transient`; `Misconfigured` when the integration has no tokens at all."""
        give_up_at = self._clock() + self._wait
        while True:
            tokens = self._store.get_tokens(integration_id)
            if tokens is None:
                raise Misconfigured("this integration has no OAuth tokens: install it again from the CRM",
                                    source=self._refresher.source)
            now = self._clock()
            stale = rejected is not None and hmac.compare_digest(str(tokens.get("access_token", "")), rejected)
            if not stale and not self._due(tokens, now):
                return tokens["access_token"]
            leased = (tokens.get("refreshing_until") or 0) >= now
            if tokens.get("failure") and not leased:
                raise RefreshRefused(tokens["failure"].get("message") or "the CRM refused the refresh token",
                                     source=self._refresher.source)
            if not leased:
                owner = uuid.uuid4().hex
                if not deadline.has(deadline.MIN_CALL_SECONDS):
                    raise RefreshPending("no time left in this invocation to refresh the OAuth token",
                                         source=self._refresher.source, retry_after=1)
                if self._store.take_refresh_lease(integration_id, version=tokens["version"], owner=owner,
                                                  now=now, until=now + self._lease):
                    token = self._refresh(integration_id, integration, tokens, owner)
                    if token is not None:
                        return token
                    continue  # our pair was not stored (a reinstall's or a slower refresher's was): read it
                # Lost the election: wait as the others do. Never straight back: a store that keeps times
                # rounded (0.1 ms) can see a live lease where the unrounded `leased` above did not, and
                # the loop would spin for as long as the clock stands still (a test's clock: forever).
            if self._clock() + self._poll > give_up_at or not deadline.has(self._poll + deadline.MIN_CALL_SECONDS):
                raise RefreshPending("another worker is refreshing this integration's OAuth token; retried later",
                                     source=self._refresher.source, retry_after=max(1.0, self._lease))
            self._sleep(self._poll)

    def keep_alive(self, integration_id: str, integration: dict | None = None, *, max_idle: float) -> bool:
        """The scheduled refresh: refresh when the last refresh (or install) is more than `max_idle`
        seconds ago, so an integration without deals keeps its refresh token alive. True when it
        refreshed (or another worker just did). Raises as `access_token`."""
        tokens = self._store.get_tokens(integration_id)
        if tokens is None or tokens.get("failure"):
            return False
        if self._clock() - (tokens.get("refreshed_at") or 0) <= max_idle:
            return False
        self.access_token(integration_id, integration, rejected=tokens["access_token"])
        return True

    def _refresh(self, integration_id: str, integration: dict | None, tokens: dict, owner: str) -> str | None:
        """We hold the lease at `tokens["version"]`: ask the CRM, store the pair. None when the pair was
        not stored (a reinstall or a slower refresher got there first): the caller re-reads."""
        version = tokens["version"]
        try:
            if integration is None:
                integration = (self._integrations.get_integration(integration_id) if self._integrations else None) or {}
            pair = self._refresher.refresh(integration, tokens["refresh_token"])
        except Transient:
            self._store.release_refresh(integration_id, version=version, owner=owner, failure=None)
            raise
        except BridgeError as exc:
            if not refused(exc):  # our side (a setting, a host our checks refuse): the refresh token still lives
                self._store.release_refresh(integration_id, version=version, owner=owner, failure=None)
                raise
            message = (f"{self._refresher.source} refused to refresh the OAuth token ({exc.message}): "
                       f"{self._refresher.reinstall_hint}")
            failure = {"code": exc.status if exc.status is not None else exc.kind, "message": message,
                       "at": int(self._clock())}
            if self._store.release_refresh(integration_id, version=version, owner=owner, failure=failure):
                raise RefreshRefused(message, source=self._refresher.source, status=exc.status) from exc
            return None  # the version moved on (a reinstall or a slow refresher stored a pair): use that
        except BaseException:
            self._store.release_refresh(integration_id, version=version, owner=owner, failure=None)
            raise
        if self._store.finish_refresh(integration_id, version=version, tokens=pair.fields()):
            return pair.access_token
        return None
