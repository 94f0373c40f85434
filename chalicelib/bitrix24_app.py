"""The Bitrix24 application: install, uninstall, the offline-event nudge and the drain.

Why an application: Bitrix24's outgoing webhooks are never retried, so an event sent while we are down is
gone until reconciliation finds the deal. An application binds the deal and contact events as *offline*
events instead: the portal keeps them in a queue until we fetch them (`event.offline.get`), so nothing is
lost while we are unreachable ("Offline events",
https://training.bitrix24.com/support/training/course/index.php?COURSE_ID=169&LESSON_ID=20066).

Install (`POST /install/bitrix24`, ONAPPINSTALL with the tokens of a server-side application; formats in
`crm/bitrix24/app_events.py`). Everything the form says is the sender's claim, so before any write:

1. the refresh token is refreshed at OUR OAuth server (`Settings.bitrix24_oauth_url`, never an address
   from the request) with our client secret. Only a refresh token Bitrix24 issued to our application
   passes; the answer names the portal authoritatively (`member_id`, `client_endpoint`);
2. that `member_id` must be the one the form claims, and the `client_endpoint` a Bitrix24 cloud portal
   (`integrations.endpoint_problem`; loopback only where the deployment allows it). The form's DOMAIN is
   never called.

Then: the new token pair goes to the integration's TOKENS item (`chalicelib/oauth.py`, version + 1,
which also makes any refresh still under way store nothing over it), the integration `b24-<member_id>` is
created or updated (its Metrika part kept; `disabled` cleared) with the `application_token` (compared
in constant time on every later event), and the events are bound: the deal and contact events as
OFFLINE events, ONOFFLINEEVENT and ONAPPUNINSTALL online to `/install/bitrix24/events`. Every install
(each app version's) re-binds: whatever the application has bound that is not wanted now is unbound,
and what is missing is bound (`event.get` first, so a repeated install binds nothing twice).

Events (`POST /install/bitrix24/events`): ONAPPUNINSTALL (its `application_token` is its only proof)
disables the integration (`disabled`, as the amoCRM install's disable hook does): webhooks are refused
(410), the worker parks what is queued with a message saying to install again, the drain and the jobs
skip it, `GET …/status` shows it; installing again enables it (then `replay`). ONOFFLINEEVENT (same
proof) queues a drain of the portal's queue, at most one per NUDGE_SECONDS.

Drain (a worker job, kind `drain`: on a nudge, and before every reconciliation of an application's
integration, so on the reconciliation schedule, RECONCILE_MINUTES). Record BEFORE clearing:
`event.offline.get` with `clear=0` and our own `process_id` (one per integration) reserves up to 50
records for that process and answers every record it holds; they are recorded as the webhook path
records events (`Ingest.record`: mark_dirty + queue), and only then removed with `event.offline.clear`
(`process_id` + the records' `ID`s). A worker that dies between the two leaves the records reserved for
our process id, and the next drain, asking with the same id, gets them again: recorded twice, which
mark_dirty absorbs. With `clear=1` a crash after the answer would lose the page. (That the portal
honours a process_id we chose is not documented: "process_id … used if you need to re-select any
unprocessed records from the current process", "Get a List of Offline Events with event.offline.get",
https://apidocs.bitrix24.com/api-reference/events/event-offline-get.html. If it assigns its own, a crash
in that window leaves the page reserved; reconciliation still finds changed deals within its period.)
"""
from __future__ import annotations

import hmac
import time
from typing import Any, Callable

from .crm import WebhookError
from .crm.bitrix24.api import SOURCE, Bitrix24Client
from .crm.bitrix24.app_events import OFFLINE_EVENTS, integration_id_for, parse_install, parse_offline_page
from .crm.bitrix24.oauth import REINSTALL, Bitrix24OAuth, Grant
from .crm.bitrix24.webhook import parse_bitrix24_event
from .errors import ApiError, BridgeError, Misconfigured, Permanent, Transient, http_error, invalid
from .integrations import BITRIX24_DOMAINS, endpoint_problem
from .logs import log_event
from .oauth import TokenKeeper, TokenPair, due_by_margin

DRAIN = "drain"  # the worker's message kind (chalicelib/queue.py)
EVENTS_PATH = "/install/bitrix24/events"
ONLINE_EVENTS = ("ONOFFLINEEVENT", "ONAPPUNINSTALL")
DRAIN_PAGE = 50  # records per event.offline.get (its default and the sandbox's)
DRAIN_PAGES = 20  # pages per drain job (1,000 records, ~40 REST calls): more is queued as another drain
# A nudge queues at most one drain per integration this often: ONOFFLINEEVENT comes after every change.
NUDGE_SECONDS = 10
# An access token is refreshed only once it has expired or the portal answered 401 expired_token: the
# docs warn that refreshing more often can get an application blocked ("Full OAuth 2.0 Authorization
# Protocol", https://apidocs.bitrix24.com/settings/oauth/index.html).
DUE = due_by_margin(0)
# event.bind's answer for a binding that exists: two installs at once (a double click) both bind.
ALREADY_BOUND = "ERROR_EVENT_HANDLER_ALREADY_EXISTS"
FORBIDDEN = "this event does not carry the application token of an installed portal"


class Bitrix24Refresher:
    """`chalicelib.oauth.Refresher` for Bitrix24: always the configured OAuth server."""

    source = SOURCE
    reinstall_hint = REINSTALL

    def __init__(self, oauth: Bitrix24OAuth) -> None:
        self._oauth = oauth

    def refresh(self, integration: dict, refresh_token: str) -> TokenPair:
        grant = self._oauth.refresh(refresh_token)
        expected = ((integration or {}).get("connection") or {}).get("member_id")
        if expected and not hmac.compare_digest(grant.member_id, expected):
            # The pair belongs to another portal: never stored under this one.
            raise Permanent(f"the OAuth server answered for another portal ({grant.member_id[:64]})", source=SOURCE)
        return pair_of(grant)


def pair_of(grant: Grant) -> TokenPair:
    return TokenPair(grant.access_token, grant.refresh_token, grant.expires_at,
                     {"client_endpoint": grant.client_endpoint, "member_id": grant.member_id})


def tokens_for(keeper: TokenKeeper) -> Callable[[dict], Callable[[bool], str]]:
    """`Bitrix24Source`'s `tokens_for`: an application's integration is `b24-<member_id>`."""
    def for_integration(integration: dict) -> Callable[[bool], str]:
        member_id = str((integration.get("connection") or {}).get("member_id", ""))
        return token_source(keeper, integration, integration_id_for(member_id))
    return for_integration


# A refresh token lives 180 days per the current docs ("Full OAuth 2.0 Authorization Protocol"), 28 days
# per older ones (dev.1c-bitrix.ru "Продление авторизации", "28 дней или до первого использования"):
# refreshed after 20 idle days, inside both. A refresh costs one call per portal per 20 days.
IDLE_REFRESH_SECONDS = 20 * 86400


def keep_alive_for(keeper: TokenKeeper) -> Callable[[dict], bool]:
    """`Bitrix24Source`'s `keep_alive`: the scheduled refresh of an idle application's tokens."""
    def keep_alive(integration: dict) -> bool:
        member_id = str((integration.get("connection") or {}).get("member_id", ""))
        return keeper.keep_alive(integration_id_for(member_id), integration, max_idle=IDLE_REFRESH_SECONDS)
    return keep_alive


def token_source(keeper: TokenKeeper, integration: dict, integration_id: str) -> Callable[[bool], str]:
    """The `auth` callable of a `Bitrix24Client`: the current access token; `True` after the portal
    answered 401 expired_token (one forced refresh, unless another worker already did one)."""
    last: list[str] = []

    def auth(expired: bool) -> str:
        token = keeper.access_token(integration_id, integration, rejected=last[-1] if expired and last else None)
        last.append(token)
        return token
    return auth


class Bitrix24App:
    def __init__(self, store: Any, queue: Any, oauth: Bitrix24OAuth, *, client_for: Callable[..., Bitrix24Client],
                 allow_loopback: bool = False, clock: Callable[[], float] = time.time) -> None:
        self._store, self._queue, self._oauth = store, queue, oauth
        self._client_for = client_for  # (client_endpoint, auth) → Bitrix24Client
        self._allow_loopback, self._clock = allow_loopback, clock

    # --- install ------------------------------------------------------------------------------------

    def install(self, raw: bytes, handler_base: str) -> dict:
        try:
            claim = parse_install(raw)
        except WebhookError as exc:
            raise invalid(str(exc)) from exc
        try:
            grant = self._oauth.refresh(claim.refresh_token)  # the proof: only our app's tokens pass
        except Transient as exc:
            raise http_error("could not verify the install at the Bitrix24 OAuth server", exc) from exc
        except Misconfigured as exc:  # our side: no client id, no client secret parameter, a redirecting server
            raise ApiError(501, "not_configured", f"Bitrix24 application installs are not configured in this stage: "
                                                  f"{exc.message}") from exc
        except BridgeError as exc:
            log_event("install_refused", crm="bitrix24", reason="refresh refused", member_id=claim.member_id[:64])
            raise ApiError(403, "forbidden", "install not verified: the Bitrix24 OAuth server refused its refresh "
                                             "token") from exc
        if not hmac.compare_digest(grant.member_id.encode(), claim.member_id.encode()):
            log_event("install_refused", crm="bitrix24", reason="member_id mismatch", member_id=claim.member_id[:64])
            raise ApiError(403, "forbidden", "install not verified: auth[member_id] is not the portal its tokens "
                                             "belong to")
        problem = endpoint_problem(grant.client_endpoint, domains=BITRIX24_DOMAINS, allow_loopback=self._allow_loopback)
        if problem:
            raise ApiError(422, "crm_refused", f"the portal's client_endpoint {problem}")
        integration_id = integration_id_for(grant.member_id)
        stored = self._store.get_integration(integration_id) or {}
        if stored and (stored.get("crm") != "bitrix24" or (stored.get("connection") or {}).get("auth") != "oauth"):
            raise ApiError(409, "conflict", f"integration {integration_id} exists and is not this application's")
        # Tokens first: a crash before the config leaves tokens nobody uses until the next install.
        self._store.put_tokens(integration_id, pair_of(grant).fields())
        config = {k: v for k, v in stored.items() if k != "disabled"}
        config.update(crm="bitrix24", connection={
            "auth": "oauth", "member_id": grant.member_id, "client_endpoint": grant.client_endpoint,
            "domain": _host(grant.client_endpoint), "application_token": claim.application_token})
        self._store.put_integration(integration_id, config)
        handler = handler_base.rstrip("/") + EVENTS_PATH
        keeper = self.keeper()
        client = self._client_for(grant.client_endpoint, token_source(keeper, config, integration_id))
        try:
            bound = rebind(client, handler)
        except BridgeError as exc:
            raise http_error("installed, but binding the events failed: install again", exc) from exc
        log_event("installed", crm="bitrix24", integration_id=integration_id, version=claim.version, **bound)
        needs = [key for key in ("counter_id", "metrika_token") if key not in config]
        return {"integration_id": integration_id, "installed": True, **bound,
                "needs": needs, "next": (f"PUT /integrations/{integration_id} with counter_id and metrika_token"
                                         if needs else "deliveries run")}

    def keeper(self) -> TokenKeeper:
        return TokenKeeper(self._store, Bitrix24Refresher(self._oauth), due=DUE, integrations=self._store,
                           clock=self._clock)

    # --- uninstall and the nudge ------------------------------------------------------------------------

    def event(self, raw: bytes) -> dict:
        """ONAPPUNINSTALL or ONOFFLINEEVENT, verified by `auth[application_token]` against the portal's
        integration (by `auth[member_id]`), in constant time; a forged one changes nothing (403)."""
        try:
            event = parse_bitrix24_event(raw)
        except WebhookError as exc:
            raise ApiError(401 if "application_token" in str(exc) else 400,
                           "unauthenticated" if "application_token" in str(exc) else "invalid_request", str(exc)) from exc
        member_id = event.member_id or ""
        integration_id = (integration_id_for(member_id) if member_id.isascii() and member_id.isalnum()
                          and len(member_id) <= 56 else None)
        integration = self._store.get_integration(integration_id) if integration_id else None
        connection = (integration or {}).get("connection") or {}
        expected = connection.get("application_token") if connection.get("auth") == "oauth" else None
        if not expected or not hmac.compare_digest(event.application_token.encode(), str(expected).encode()):
            log_event("app_event_refused", crm="bitrix24", name=event.event[:40])
            raise ApiError(403, "forbidden", FORBIDDEN)
        now = int(self._clock())
        if event.event == "ONAPPUNINSTALL":
            self._store.put_integration(integration_id, {**integration, "disabled": {
                "reason": "uninstalled", "at": now,
                "message": "the Bitrix24 application was uninstalled from the portal: install it again to resume"}})
            log_event("uninstalled", crm="bitrix24", integration_id=integration_id)
            return {"integration_id": integration_id, "disabled": True}
        if event.event == "ONOFFLINEEVENT":
            if integration.get("disabled"):
                return {"integration_id": integration_id, "queued": 0, "skipped": "disabled"}
            last = self._store.get_cursor(integration_id, "drain_nudge")
            if last is not None and now - last < NUDGE_SECONDS:
                return {"integration_id": integration_id, "queued": 0, "skipped": "a drain was queued just now"}
            from .queue import message
            self._store.put_cursor(integration_id, "drain_nudge", now)
            self._queue.send([message(integration_id, DRAIN, str(now))])
            return {"integration_id": integration_id, "queued": 1}
        return {"integration_id": integration_id, "ignored": event.event[:40]}


def rebind(client: Bitrix24Client, handler: str) -> dict:
    """Make the application's bindings exactly: OFFLINE_EVENTS offline, ONLINE_EVENTS online to
    `handler`. Unbinds the rest first (an older version's or an older address's), binds what is missing."""
    wanted = {(event, "offline", "") for event in OFFLINE_EVENTS} | {(event, "online", handler) for event in ONLINE_EVENTS}
    present = set()
    for binding in client.call("event.get").get("result") or []:
        if not isinstance(binding, dict):
            continue
        offline = str(binding.get("offline", "0")) in ("1", "true", "True")
        present.add((str(binding.get("event", "")).upper(), "offline" if offline else "online",
                     "" if offline else str(binding.get("handler") or "")))
    unbound, bound = [], []
    for event, kind, url in sorted(present - wanted):
        params = {"event": event, "event_type": kind, **({"handler": url} if url else {})}
        client.call("event.unbind", params)
        unbound.append(f"{event} ({kind})")
    for event, kind, url in sorted(wanted - present):
        try:
            client.call("event.bind", {"event": event, "event_type": kind, **({"handler": url} if url else {})})
        except Permanent as exc:
            if ALREADY_BOUND not in exc.message:
                raise
            continue  # another install of the same portal at once bound it after our event.get: as wanted
        bound.append(f"{event} ({kind})")
    return {"bound": bound, "unbound": unbound}


def drain(store: Any, queue: Any, source: Any, integration_id: str, integration: dict, *,
          clock: Callable[[], float] = time.time) -> dict:
    """One drain of the portal's offline-event queue (module docstring: record before clearing)."""
    from .ingest import Ingest
    from .queue import message
    if integration.get("crm") != "bitrix24" or (integration.get("connection") or {}).get("auth") != "oauth":
        return {"skipped": "not a Bitrix24 application"}
    if integration.get("disabled"):
        return {"skipped": "disabled (uninstalled)"}
    if "metrika_token" not in integration or "counter_id" not in integration:
        # The portal keeps the events until the integration is configured.
        return {"skipped": "no Metrika counter yet: PUT counter_id and metrika_token"}
    client = source.client_for(integration)
    ingest = Ingest(store, queue, max_body_bytes=0, clock=clock)
    process_id = "mcb-" + integration_id  # ours alone: a crashed drain's reservations come back to the next
    recorded = skipped = pages = 0
    for _ in range(DRAIN_PAGES):
        answer = client.call("event.offline.get", {"clear": 0, "process_id": process_id, "limit": DRAIN_PAGE})
        try:
            page = parse_offline_page(answer.get("result"), now=int(clock()))
        except ValueError as exc:
            raise Transient(f"Bitrix24 {exc}", source=SOURCE) from exc
        pages += 1
        if not page.record_ids:
            break
        if page.refs:
            ingest.record(integration_id, page.refs, origin="drain")
        client.call("event.offline.clear", {"process_id": page.process_id, "id": page.record_ids})
        recorded, skipped = recorded + len(page.refs), skipped + page.skipped
        if len(page.record_ids) < DRAIN_PAGE:
            break
    else:
        queue.send([message(integration_id, DRAIN, str(int(clock())))])  # more waiting: another job goes on
    log_event("offline_drained", integration_id=integration_id, recorded=recorded, skipped=skipped, pages=pages)
    return {"recorded": recorded, "skipped": skipped, "pages": pages}


_SECRET: dict[str, tuple[float, str]] = {}  # parameter → (read at, value): one SSM read per container and 5 min
SECRET_TTL_SECONDS = 300.0


def client_secret(settings: Any, *, ssm: Any = None, clock: Callable[[], float] = time.monotonic) -> str:
    """Our application's client secret: `BITRIX24_CLIENT_SECRET` (the local stack, tests), else the SSM
    SecureString `/metrika-crm-bridge/<stage>/bitrix24-client-secret`, read when a refresh first needs it
    and kept for SECRET_TTL_SECONDS (a rotation shows within 5 minutes). Never logged."""
    if settings.bitrix24_client_secret:
        return settings.bitrix24_client_secret
    name = settings.bitrix24_client_secret_parameter
    cached = _SECRET.get(name)
    if cached is not None and clock() - cached[0] < SECRET_TTL_SECONDS:
        return cached[1]
    from .errors import Misconfigured, Unavailable
    try:
        if ssm is None:
            import boto3
            ssm = boto3.client("ssm")
        value = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
    except Exception as exc:  # noqa: BLE001 — SSM's errors, whatever their class
        if type(exc).__name__ == "ParameterNotFound" or "ParameterNotFound" in str(exc):
            raise Misconfigured(f"the SSM parameter {name} (the Bitrix24 application's client secret) does not exist",
                                source=SOURCE) from None
        raise Unavailable("ssm", type(exc).__name__) from None
    _SECRET[name] = (clock(), value)
    return value


def handler_base(headers: dict, stage: str | None, configured: str | None) -> str:
    """Our API's public address for the bound handlers: the `PUBLIC_URL` setting, else the request's
    Host (with the stage for an execute-api host, whose paths start with it)."""
    if configured:
        return configured
    lower = {str(k).lower(): v for k, v in (headers or {}).items()}
    host = str(lower.get("host") or "")
    if not host or any(ch in host for ch in "/@?# \\"):
        raise ApiError(500, "misconfigured", "cannot tell this service's public address: set PUBLIC_URL")
    proto = "http" if str(lower.get("x-forwarded-proto", "https")).lower() == "http" else "https"
    prefix = f"/{stage}" if stage and host.endswith(".amazonaws.com") else ""
    return f"{proto}://{host}{prefix}"


def _host(url: str) -> str:
    from urllib.parse import urlsplit
    return urlsplit(url).hostname or ""
