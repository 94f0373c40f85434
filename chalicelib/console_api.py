"""What the web console reads beyond the operator API: the integrations with their health at a glance,
an integration's secret-free summary, its CRM stages beside the mapping (with the deals each unmapped
stage holds), the CRM's fields, and the delivery figures by day. Also the console's static files.

Every answer here is safe for a console link: no token, secret or connection detail (the summary
names the CRM account's host, which the CRM shows its users anyway)."""
from __future__ import annotations

import contextvars
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from .errors import BridgeError, http_error, invalid

# The list of integrations reads a page of them, and at most this many entity items of each: the
# answer's time is bounded however large an integration grows (`complete: false` says the counts
# cover only what was read).
PAGE_SIZE = 20
SUMMARY_ENTITIES = 2000
SERIES_DAYS = 30
# The stages and delivery views count at most this many of an integration's entities (orders first), with
# only the attributes they count: a large integration's page answers in a few seconds, never a 504 or a
# Lambda out of memory, and `complete: false` says the figures cover only what was read.
CONSOLE_ENTITIES = 10_000

# --- static files -------------------------------------------------------------------------------------

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
# The allow-list: nothing else under the folder (or outside it) is ever read.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "i18n.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
}
# No inline script or style, nothing from another origin; the API is same-origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
# Short: a deployment's new page shows within minutes; the page holds no data, so caching is safe.
CACHE_CONTROL = "public, max-age=300"


def asset(name: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of a console file by its allow-listed name."""
    content_type = ASSETS.get(name)
    if content_type is None:
        return 404, {"Content-Type": "application/json; charset=utf-8", **SECURITY_HEADERS}, \
            '{"error": "not_found", "message": "no such console file"}'
    body = (CONSOLE_DIR / name).read_text(encoding="utf-8")
    return 200, {"Content-Type": content_type, "Cache-Control": CACHE_CONTROL, **SECURITY_HEADERS}, body


def base_url(request: Any, route_path: str) -> str:
    """The API's public base (`https://<host>/<stage>` in AWS, `http://127.0.0.1:8000` locally), from
    the request that reached `route_path` (its concrete path)."""
    headers = {k.lower(): v for k, v in (request.headers or {}).items()}
    scheme = headers.get("x-forwarded-proto", "http").split(",")[0].strip() or "http"
    host = headers.get("host", "localhost")
    path = ((request.context or {}).get("path") or route_path)
    prefix = path[: -len(route_path)] if path.endswith(route_path) else ""
    return f"{scheme}://{host}{prefix.rstrip('/')}"


# --- the integrations page ----------------------------------------------------------------------------

def page_of_integrations(store: Any, *, after: str | None, limit: Any, health: Callable[[str, dict], dict]) -> dict:
    """A page of integrations (ids after `after`, sorted), each with its health: `health(id, config)`."""
    from .ids import is_integration_id
    from .parallel import each
    if after is not None and not is_integration_id(after):
        raise invalid("after must be an integration id", {"after": str(after)[:80]})
    size = PAGE_SIZE if limit is None else _whole(limit, "limit", 1, 100)
    ids = [i for i in store.list_integration_ids() if after is None or i > after]
    page, more = ids[:size], len(ids) > size

    def row(integration_id: str) -> dict | None:
        config = store.get_integration(integration_id)
        if config is None:
            return None  # deleted meanwhile
        return {**summary_of(integration_id, config), "health": health(integration_id, config)}
    # Each row in a copy of this request's context, so the CRM and Metrika calls on the pool's threads
    # keep the request's deadline (chalicelib.deadline is a contextvar; threads start without it).
    contexts = [(contextvars.copy_context(), integration_id) for integration_id in page]
    rows = [r for r in each(lambda pair: pair[0].run(row, pair[1]), contexts) if r is not None]
    return {"integrations": rows, "next": page[-1] if more and page else None}


def _whole(value: Any, name: str, low: int, high: int) -> int:
    # ASCII digits only (str.isdigit also takes "٣"), and short: never a 2,000-digit int() to parse.
    number = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 6 else None
    if number is None or not low <= number <= high:
        raise invalid(f"{name} must be a whole number from {low} to {high}", {name: str(value)[:40]})
    return number


def health(store: Any, integration_id: str, *, requests_left: int | None, webhook: dict | None) -> dict:
    counts = store.entity_summary(integration_id, limit=SUMMARY_ENTITIES)
    return {**counts, "metrika_requests_left_today": requests_left, "webhook": webhook}


def summary_of(integration_id: str, config: dict) -> dict:
    """An integration without its connection: what a console link may see."""
    connection = config.get("connection") or {}
    if config.get("crm") == "amocrm":
        account = urlsplit(str(connection.get("base_url") or "")).hostname
    else:
        account = connection.get("domain") or None
    return {"integration_id": integration_id, "crm": config.get("crm"), "counter_id": config.get("counter_id"),
            "timezone": config.get("timezone"), "currency": config.get("currency"),
            "id_prefix": config.get("id_prefix"), "crm_account": account}


def integration_summary(store: Any, integration_id: str) -> dict:
    from .integrations import get_integration
    return summary_of(integration_id, get_integration(store, integration_id))


# --- the mapping page ---------------------------------------------------------------------------------

def stages(store: Any, proposed: list[dict], integration_id: str) -> dict:
    """Every CRM stage (from `proposed`, the CRM's defaults) beside its mapping, with the deals held
    because it is not mapped; then mapped stages the CRM no longer has, and held stages it does not list."""
    mapping = store.get_status_mapping(integration_id) or {"entries": [], "pushed_at": None}
    mapped = {e["crm_status"]: e for e in mapping["entries"]}
    entities, complete = store.console_entities(integration_id, limit=CONSOLE_ENTITIES)
    held = Counter((e.get("last_error") or {}).get("crm_status") for e in entities
                   if (e.get("last_error") or {}).get("code") == "unmapped_stage" and e.get("dirty") is not True)
    pipelines = _pipeline_names(proposed)
    rows, seen = [], set()
    for entry in proposed:
        key = entry["crm_status"]
        seen.add(key)
        rows.append({"crm_status": key, "name": _display_name(entry, pipelines), "in_crm": True,
                     "proposed": {k: entry[k] for k in ("metrika_status_id", "type", "humanized") if k in entry},
                     "mapped": mapped.get(key), "held": held.get(key, 0)})
    for key in sorted(set(mapped) - seen):
        rows.append({"crm_status": key, "name": mapped[key].get("humanized") or key, "in_crm": False,
                     "proposed": None, "mapped": mapped[key], "held": held.get(key, 0)})
        seen.add(key)
    for key in sorted(k for k in held if k and k not in seen):
        rows.append({"crm_status": key, "name": key, "in_crm": False, "proposed": None, "mapped": None,
                     "held": held[key]})
    return {"integration_id": integration_id, "stages": rows, "pushed_at": mapping.get("pushed_at"),
            "held_total": sum(held.values()), "complete": complete}


def _pipeline_names(entries: list[dict]) -> dict[str, str]:
    """Pipeline / funnel names by the part of `crm_status` before ":", read from the labels the
    defaults give ("Pipeline: stage")."""
    names: dict[str, str] = {}
    for entry in entries:
        group, sep, _ = entry["crm_status"].partition(":")
        label = entry.get("humanized") or ""
        if sep and ": " in label:
            names.setdefault(group, label.split(": ", 1)[0])
    return names


def _display_name(entry: dict, pipelines: dict[str, str]) -> str:
    label = entry.get("humanized") or entry["crm_status"]
    group, sep, _ = entry["crm_status"].partition(":")
    pipeline = pipelines.get(group) if sep else None
    return f"{pipeline}: {label}" if pipeline and not label.startswith(pipeline + ": ") else label


# --- the attributes page ------------------------------------------------------------------------------

def crm_fields(store: Any, sources: dict, integration_id: str) -> dict:
    """The CRM's fields a custom attribute can be read from: [{"id", "name", "entity", "type"}]."""
    from .integrations import get_integration
    integration = get_integration(store, integration_id)
    source = sources.get(integration["crm"])
    if not hasattr(source, "fields"):
        return {"integration_id": integration_id, "fields": []}
    try:
        fields = source.fields(integration)
    except BridgeError as exc:
        raise http_error("could not read the CRM's fields", exc) from exc
    return {"integration_id": integration_id, "fields": fields}


# --- the delivery page --------------------------------------------------------------------------------

def delivery_series(store: Any, integration_id: str, *, now: float | None = None, days: int = SERIES_DAYS) -> dict:
    """Orders by the UTC day they were last sent (the last `days` days): how many, and how many carried
    a ClientID, a phone, an e-mail, or were created more than 21 days before they were sent (Metrika
    matches visits within 21 days). Read from the entities' facts: no extra write on the delivery path."""
    now = time.time() if now is None else now
    since = now - days * 86400
    by_day: dict[str, Counter] = {}
    entities, complete = store.console_entities(integration_id, limit=CONSOLE_ENTITIES)
    for entity in entities:
        facts = entity.get("facts") or {}
        sent = entity.get("sent_at")
        if entity["kind"] != "order" or not facts.get("order") or not isinstance(sent, (int, float)) or sent < since:
            continue
        day = datetime.fromtimestamp(min(sent, now), timezone.utc).strftime("%Y-%m-%d")
        counts = by_day.setdefault(day, Counter())
        counts["orders"] += 1
        for flag in ("with_client_id", "with_phone", "with_email", "late"):
            counts[flag] += bool(facts.get(flag))
    return {"integration_id": integration_id, "complete": complete, "days": [
        {"day": day, **{k: by_day[day][k] for k in ("orders", "with_client_id", "with_phone", "with_email", "late")}}
        for day in sorted(by_day)]}
