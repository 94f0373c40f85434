"""Console links: a token per marketer that opens the web console on ONE integration.

A link is `<base>/console#link=<token>`. The token is shown once, when it is made; the store keeps only
its SHA-256 digest, with the integration id, `created_at` and a label (config table, item
`INTEGRATION#<id>` / `CONSOLE_LINK#<link id>`, so deleting the integration deletes its links). The token
names where its digest is kept: `cl1.<integration id>.<link id>.<secret>` — ids are `[A-Za-z0-9_-]`,
never a dot — so the authorizer checks it with one GetItem, no scan and no index. The secret is 32
random bytes; knowing an integration id and a link id (both shown to admins) gives nothing.

What a link may call is `CONSOLE_ROUTES` on its own integration, nothing else: the authorizer returns
a policy naming exactly those resources, and `check_access` (run by every route through `app.answers`)
refuses any other route or integration again, in case a policy is ever enforced differently (chalice
local emulates API Gateway's policy check; a cached policy is per token, not per route).

How fast a revocation bites: this process caches a link's answer for `LINK_CACHE_SECONDS`, and API
Gateway caches the authorizer's answer per token for `AUTHORIZER_CACHE_SECONDS` (60 s): a revoked link
stops working within 90 s. Store unreachable: the link is refused (403), as for SSM down.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from .errors import ApiError, Unavailable, invalid, not_found
from .ids import is_integration_id

PREFIX = "cl1"
LINK_CACHE_SECONDS = 30.0
CACHE_ENTRIES = 1024  # bounded: random tokens cannot grow a warm authorizer's memory
LABEL_MAX = 100
LINKS_MAX = 50  # per integration: a list an admin can read at a glance, and a bound on the Query

# (method, route path) a console link may call, on its own integration only. No secrets behind any of
# them: the integration's summary has no connection, the status page no tokens.
CONSOLE_ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/integrations/{integration_id}/summary"),
    ("GET", "/integrations/{integration_id}/stages"),
    ("GET", "/integrations/{integration_id}/fields"),
    ("GET", "/integrations/{integration_id}/delivery"),
    ("GET", "/integrations/{integration_id}/status-mapping"),
    ("PUT", "/integrations/{integration_id}/status-mapping"),
    ("GET", "/integrations/{integration_id}/status-mapping/defaults"),
    ("POST", "/integrations/{integration_id}/status-mapping/defaults"),
    ("GET", "/integrations/{integration_id}/attributes"),
    ("PUT", "/integrations/{integration_id}/attributes"),
    ("GET", "/integrations/{integration_id}/status"),
    ("POST", "/integrations/{integration_id}/replay"),
    ("GET", "/integrations/{integration_id}/backfill"),
    ("POST", "/integrations/{integration_id}/backfill"),
)


def digest(token: str) -> str:
    # surrogatepass: a header decoded from JSON may hold a lone surrogate; it is refused, not a crash.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token(integration_id: str) -> tuple[str, str]:
    """(link id, token) for a new link."""
    link_id = secrets.token_hex(8)
    return link_id, f"{PREFIX}.{integration_id}.{link_id}.{secrets.token_urlsafe(32)}"


def is_link_id(value: str) -> bool:
    """A link id as `new_token` makes it: 16 lowercase hexadecimal digits."""
    return len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def parse(token: str | None) -> tuple[str, str] | None:
    """(integration id, link id) a token names, or None for anything not shaped like a link's token."""
    if not isinstance(token, str) or len(token) > 200:
        return None
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or not is_integration_id(parts[1]):
        return None
    link_id, secret = parts[2], parts[3]
    if not is_link_id(link_id) or not 20 <= len(secret) <= 100:
        return None
    return parts[1], link_id


def label_of(body: Any) -> str:
    """The optional `label` of `POST …/console-links` (a name for whom the link is for), or a 400."""
    if body is None:
        return ""
    if not isinstance(body, dict) or set(body) - {"label"}:
        raise invalid('body must be a JSON object: {} or {"label": "<who the link is for>"}')
    label = body.get("label", "")
    if not isinstance(label, str) or len(label) > LABEL_MAX or any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise invalid(f"label must be text of at most {LABEL_MAX} characters, without control characters",
                      {"label": str(label)[:40]})
    return label.strip()


def create(store: Any, integration_id: str, body: Any, base_url: str, *, now: float | None = None) -> dict:
    """Make a link; the only answer that ever holds its token."""
    from .integrations import get_integration
    label = label_of(body)
    get_integration(store, integration_id)  # a 404 for an unknown integration
    if len(store.console_links(integration_id)) >= LINKS_MAX:
        raise invalid(f"an integration has at most {LINKS_MAX} console links: revoke one first")
    link_id, token = new_token(integration_id)
    created_at = int(time.time() if now is None else now)
    if not store.put_console_link(integration_id, link_id, {"hash": digest(token), "label": label, "created_at": created_at}):
        raise not_found(f"integration {integration_id!r}")  # deleted while the link was being made
    return {"link_id": link_id, "label": label, "created_at": created_at, "link": f"{base_url}/console#link={token}",
            "note": "shown once: only its SHA-256 digest is kept"}


def listing(store: Any, integration_id: str) -> dict:
    from .integrations import get_integration
    get_integration(store, integration_id)  # a 404 for an unknown integration
    links = sorted(store.console_links(integration_id), key=lambda link: (link["created_at"], link["link_id"]))
    return {"integration_id": integration_id,
            "links": [{k: link[k] for k in ("link_id", "label", "created_at")} for link in links]}


def revoke(store: Any, integration_id: str, link_id: str) -> dict:
    if not is_link_id(link_id):
        raise invalid("link id must be 16 hexadecimal digits", {"link_id": link_id[:40]})
    if not store.delete_console_link(integration_id, link_id):
        raise not_found(f"console link {link_id!r} of integration {integration_id!r}")
    return {"revoked": link_id}


class ConsoleLinks:
    """The authorizer's check of link tokens in one process: `integration_for(token)` is the integration
    a live link's token opens, else None. Answers (yes and no) are cached per token digest for
    `ttl` seconds, at most CACHE_ENTRIES of them."""

    def __init__(self, get_link: Callable[[str, str], dict | None], *, ttl: float = LINK_CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._get_link, self._ttl, self._clock = get_link, ttl, clock
        self._cache: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._lock = threading.Lock()  # `chalice local` serves requests on threads

    def integration_for(self, token: str | None) -> str | None:
        named = parse(token)
        if named is None:
            return None
        offered = digest(token)  # type: ignore[arg-type]
        now = self._clock()
        with self._lock:
            cached = self._cache.get(offered)
            if cached is not None and now - cached[0] < self._ttl:
                return cached[1]
        try:
            link = self._get_link(*named)
        except Unavailable:
            return None  # cannot be checked: refused, never a 500
        stored = link.get("hash") if isinstance(link, dict) else None
        # Constant time in the token: both are SHA-256 hex digests of the same length.
        valid = isinstance(stored, str) and hmac.compare_digest(offered, stored)
        answer = named[0] if valid else None
        with self._lock:
            self._cache[offered] = (now, answer)
            self._cache.move_to_end(offered)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return answer


def policy_routes(integration_id: str) -> list[tuple[str, list[str]]]:
    """(concrete path, methods) a link's policy allows, for `chalice.AuthRoute`."""
    paths: dict[str, list[str]] = {}
    for method, route in CONSOLE_ROUTES:
        paths.setdefault(route.replace("{integration_id}", integration_id), []).append(method)
    return list(paths.items())


def check_access(authorizer: Any, method: str, route: str | None, integration_id: str | None) -> None:
    """Defence in depth for a request the authorizer let through: a console link's caller reaches only
    `CONSOLE_ROUTES` of its own integration; anything else is a 403 saying so. Admin and public
    requests pass."""
    if not isinstance(authorizer, dict) or authorizer.get("role") != "console":
        return
    if (method, route) not in CONSOLE_ROUTES:
        raise ApiError(403, "forbidden", "a console link cannot use this route")
    if integration_id != authorizer.get("integration_id"):
        raise ApiError(403, "forbidden", "this console link is for another integration",
                       {"integration_id": str(integration_id)[:80]})
