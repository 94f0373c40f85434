"""The admin token: where it comes from, how it rotates, and how a request's bearer token is checked.

Locally the token is `ADMIN_TOKEN`. In AWS it is an SSM SecureString named by `ADMIN_TOKEN_PARAMETER`,
so it never sits in `.chalice/config.json` or the Lambda's environment.

Rotation uses the parameter's own versions, so one `aws ssm put-parameter --overwrite` rotates and no
second parameter exists:

* the current version's value is the token;
* the version before it (read with GetParameter's `name:<version>` selector, "GetParameter",
  https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_GetParameter.html) stays valid
  until the current version's `LastModifiedDate` + `admin_token_overlap_seconds` (900 s by default),
  so clients can switch over without an outage;
* immediate revocation (a leaked token): overwrite twice with the same new value. The version before
  the current one then holds the new value too, and the leaked one is no longer consulted.

How fast a change is seen. A container re-reads the parameter every `PARAMETER_TTL_SECONDS`; a bearer
token that matches nothing re-reads it at once (at most once per `MISS_REREAD_SECONDS`, so random tokens
cannot hammer SSM), which is why a freshly rotated token works immediately. On top of that API Gateway
keeps the authorizer's answer per token for `AUTHORIZER_CACHE_SECONDS` (Allow and Deny alike, "Use API
Gateway Lambda authorizers", https://docs.aws.amazon.com/apigateway/latest/developerguide/apigateway-use-lambda-authorizer.html).
So: a new token works at once (unless it was tried, and refused, before it was written: then after
≤ 60 s); an old token is refused from the end of the overlap + ≤ 60 s; a revoked one after ≤ 120 s.

The parameter deleted (SSM answers ParameterNotFound): no token is valid, from the next read on (≤ 60 s),
as after a revocation. SSM unreachable, refusing or answering nonsense: the last tokens read stay in use for
`STALE_LIMIT_SECONDS` after the last good read (the previous token still ends with its overlap, the clock
decides that); after that, and on a cold start with SSM down, every token is refused (the authorizer's Deny: 403, never a 500).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import Unavailable
from .settings import Settings

# Seconds a container trusts its last read of the parameter. 60 s bounds how long a revoked token
# lives in a warm container; one GetParameter a minute per container is far below Parameter Store's
# default throughput (40 transactions a second per account and region).
PARAMETER_TTL_SECONDS = 60.0
# An unknown bearer token re-reads the parameter at once, but at most this often per container: a
# freshly rotated token works on its first request, and a flood of random tokens costs at most one
# GetParameter every 5 s per container.
MISS_REREAD_SECONDS = 5.0
# Tokens read more than this long ago are not used: SSM down for 10 minutes locks the admin routes (the
# webhooks and the worker never ask for the token) rather than keeping a possibly revoked token alive.
STALE_LIMIT_SECONDS = 600.0
# API Gateway's authorizer result TTL (`@app.authorizer(ttl_seconds=…)`; API Gateway's default is 300,
# its maximum 3600). 60 s: an admin session pays one authorizer invocation a minute at most, and a
# revoked or expired token is refused at most a minute after this Lambda stopped accepting it. REST
# API TOKEN authorizers cannot shorten it per answer, so a Deny is also kept for 60 s.
AUTHORIZER_CACHE_SECONDS = 60
# Wire limits of a read: GetParameter answers in milliseconds; two reads (current and previous version)
# of at most 2.5 s each fit well inside the authorizer's 10 s. No retries: the stale tokens (or a
# refusal) answer now, and the next request tries again after MISS_REREAD_SECONDS.
SSM_CONNECT_TIMEOUT = 1.0
SSM_READ_TIMEOUT = 1.5


def _digest(token: str) -> bytes:
    # Compared as SHA-256 digests: equal lengths, so compare_digest leaks not even the token's length.
    # surrogatepass: a header value decoded from JSON may hold a lone surrogate; it must be refused, not
    # crash the authorizer.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class AdminTokens:
    """The tokens accepted now: the current one, and the previous one until `previous_until` (Unix s).
    Kept as digests only."""

    current: bytes | None = None
    previous: bytes | None = None
    previous_until: float = 0.0

    @classmethod
    def of(cls, current: str | None, previous: str | None = None, previous_until: float = 0.0) -> "AdminTokens":
        """Blank values (a parameter holding only whitespace) accept nobody; surrounding whitespace (a
        value written from a file with its newline) is not part of the token."""
        current = (current or "").strip() or None
        previous = (previous or "").strip() or None
        if previous is not None and previous == current:
            previous = None  # an immediate revocation: the version before holds the new value too
        return cls(current=_digest(current) if current else None,
                   previous=_digest(previous) if previous else None,
                   previous_until=previous_until if previous else 0.0)

    def accepts(self, token: str, now: float) -> bool:
        """Constant time in the token: both comparisons always run."""
        offered = _digest(token)
        is_current = hmac.compare_digest(offered, self.current or b"")
        is_previous = hmac.compare_digest(offered, self.previous or b"")
        return (is_current and self.current is not None) or (
            is_previous and self.previous is not None and now < self.previous_until)


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None (another scheme, nothing after it)."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def read_tokens(ssm: Any, name: str, *, overlap_seconds: float, now: float) -> AdminTokens:
    """The SSM adapter: the parameter's current version, and the version before it while the overlap
    lasts (read by its number, so a rotation between the two reads cannot pair the wrong values).
    The current version unreadable is `Unavailable("ssm", <why>)`, except a parameter that does not exist
    (deleted): that is no token at all, so nobody is admin until it is written again (the stale tokens are
    for SSM being down, not for an answer). The previous one is a grace: unreadable (no such version,
    throttled, refused, a malformed answer) it is left out and logged, the current token works. No
    message ever holds a value."""
    try:
        value, version, modified_at = _read_version(ssm, name)
    except _Unreadable as exc:
        if exc.reason == "ParameterNotFound":  # an answer, not an outage: there is no token now
            from .logs import log_event
            log_event("admin_token_missing", parameter=name)
            return AdminTokens()
        raise Unavailable("ssm", exc.reason) from None
    previous_until = modified_at + overlap_seconds
    previous = None
    if version > 1 and now < previous_until:
        try:
            previous = _read_version(ssm, f"{name}:{version - 1}")[0]
        except _Unreadable as exc:
            from .logs import log_event
            log_event("admin_token_previous_unreadable", version=version - 1, error=exc.reason)
    return AdminTokens.of(value, previous, previous_until)


class _Unreadable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read_version(ssm: Any, name: str) -> tuple[str, int, float]:
    """One GetParameter: (value, version, LastModifiedDate in Unix s), or `_Unreadable` naming why: the
    error code, or "malformed answer" when the SDK could not parse SSM's answer or a field is missing or
    of another type (a proxy's error page, a truncated body). Such a token cannot be checked: the
    authorizer refuses (403) as for SSM down, instead of crashing (API Gateway's 500)."""
    from botocore.exceptions import BotoCoreError, ClientError
    try:
        parameter = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
        value, version, modified_at = parameter["Value"], parameter["Version"], parameter["LastModifiedDate"].timestamp()
    except (ClientError, BotoCoreError) as exc:
        raise _Unreadable(_error_code(exc)) from None
    except Exception as exc:  # noqa: BLE001 — the answer's fault, not ours: botocore's parsers raise ValueError,
        # RuntimeError (a date out of range) or ResponseParserError; a missing field is a KeyError here
        raise _Unreadable(f"malformed answer ({type(exc).__name__})") from None
    if not isinstance(value, str) or type(version) is not int or not math.isfinite(modified_at):
        raise _Unreadable("malformed answer")
    return value, version, modified_at


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code") or type(exc).__name__


class AdminTokenCache:
    """The admin check of one process: the tokens from `read(now)`, re-read on the schedule above.

    `read` raises `Unavailable` when the tokens cannot be read; anything else is a bug and propagates.
    `clock` gives Unix seconds (the overlap is measured against SSM's LastModifiedDate)."""

    def __init__(self, read: Callable[[float], AdminTokens], *, ttl: float = PARAMETER_TTL_SECONDS,
                 miss_interval: float = MISS_REREAD_SECONDS, stale_limit: float = STALE_LIMIT_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self._read, self._clock = read, clock
        self._ttl, self._miss_interval, self._stale_limit = ttl, miss_interval, stale_limit
        self._tokens: AdminTokens | None = None
        self._read_at = -math.inf    # last successful read
        self._tried_at = -math.inf   # last attempt, successful or not (a failing SSM is tried again after
        #                              miss_interval, not on every request)
        self._missed_at = -math.inf  # last re-read for an unknown token
        self._lock = threading.Lock()  # `chalice local` serves requests on threads

    def is_admin(self, authorization: str | None) -> bool:
        """True if the request's `Authorization: Bearer <token>` holds a token accepted now."""
        token = bearer_token(authorization)
        if token is None:
            return False  # no header, another scheme: nothing to look up
        with self._lock:
            now = self._clock()
            due = now - self._read_at >= self._ttl and now - self._tried_at >= self._miss_interval
            if due:
                self._refresh(now)
            if self._accepts(token, now):
                return True
            if not due and now - self._missed_at >= self._miss_interval:  # perhaps rotated since our last read
                self._missed_at = now
                self._refresh(now)
                return self._accepts(token, now)
            return False

    def _accepts(self, token: str, now: float) -> bool:
        return (self._tokens is not None and now - self._read_at <= self._stale_limit
                and self._tokens.accepts(token, now))

    def _refresh(self, now: float) -> None:
        self._tried_at = now
        try:
            self._tokens, self._read_at = self._read(now), now
        except Unavailable as exc:
            from .logs import log_event
            log_event("admin_token_unreadable", error=str(exc),
                      stale_seconds=None if self._tokens is None else round(now - self._read_at))


def _ssm_client() -> Any:
    import boto3
    from botocore.config import Config
    return boto3.client("ssm", config=Config(connect_timeout=SSM_CONNECT_TIMEOUT, read_timeout=SSM_READ_TIMEOUT,
                                             retries={"total_max_attempts": 1}))


def admin_tokens(settings: Settings, *, ssm: Any = None, clock: Callable[[], float] = time.time) -> AdminTokenCache:
    """The admin check for these settings: `ADMIN_TOKEN` if set (local stack, tests), else the SSM
    parameter, else nobody is admin."""
    if settings.admin_token:
        fixed = AdminTokens.of(settings.admin_token)
        return AdminTokenCache(lambda now: fixed, clock=clock)
    if settings.admin_token_parameter:
        client = ssm if ssm is not None else _ssm_client()
        name, overlap = settings.admin_token_parameter, settings.admin_token_overlap_seconds
        return AdminTokenCache(lambda now: read_tokens(client, name, overlap_seconds=overlap, now=now), clock=clock)
    nobody = AdminTokens()
    return AdminTokenCache(lambda now: nobody, clock=clock)
