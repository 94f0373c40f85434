"""What an operator needs: an integration's delivery status, replaying parked deals, and confirming
uploads against Metrika's `last_uploadings` (a 200 to an upload is not proof of loading: its
`api_validation_status` says so later — https://yandex.ru/dev/metrika/ru/management/openapi/schema/getLastUploadings
"Информация о последних загрузках")."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

from .crm import EntityRef
from .crm.notes import dropped_summary
from .errors import BridgeError, http_error, invalid, not_found
from .logs import log_event
from .parallel import each
from .shared_counter import counter_products

FAILED_SHOWN = 100
DEAD_LETTERED_SHOWN = 20  # the status page's sample; the count covers them all
INBOX_HORIZON = 366 * 86400  # every batch recorded before now + this: all of them, even with a skewed clock
UPLOAD_STATUSES = ("SENT", "PASSED", "FAILED", "UNCONFIRMED")
# The status page's window on upload history: the pending uploads (all of them) and the last this many
# final ones. Reading them costs the same however long the integration has run (records expire: final
# ones 30 days after confirmation, store.UPLOAD_RECORD_TTL; pending ones after store.PENDING_UPLOAD_TTL).
UPLOADS_SHOWN = 50
CONFIRM_PAGE = 1000  # last_uploadings' largest page
# Pages read per confirmation at most: a run normally needs one; a missing upload costs more until it
# is given up on (UNCONFIRMED), so a run never spends more than this of the daily budget.
CONFIRM_MAX_PAGES = 5
UNCONFIRMED_AFTER = 6 * 3600  # an upload not listed 6 h after it was sent is reported
GIVE_UP_AFTER = 48 * 3600  # and after 2 days it is no longer looked for
# How far past an upload's time the listing must reach before its absence counts: a day covers any
# time zone the listing's times might be in, and clock skew.
LISTING_MARGIN = 24 * 3600
LISTING_FORMAT = "%Y-%m-%d %H:%M:%S"


def integration_status(store: Any, integration_id: str, *, requests_today: int | None,
                       webhook_health: dict | None = None, backfill: dict | None = None,
                       now: float | None = None) -> dict:
    entities = store.list_entities(integration_id)
    failed = [e for e in entities if e.get("last_error") and not e.get("dirty")]
    dead = sorted((e for e in entities if e.get("dead_lettered_at")), key=lambda e: e["dead_lettered_at"])
    orders = [e.get("facts") or {} for e in entities if e["kind"] == "order" and (e.get("facts") or {}).get("order")]
    pending = store.pending_uploads(integration_id)
    recent = store.recent_uploads(integration_id, limit=UPLOADS_SHOWN)

    def share(flag: str) -> float | None:
        return round(sum(1 for f in orders if f.get(flag)) / len(orders), 3) if orders else None

    return {
        "integration_id": integration_id,
        "backlog": sum(1 for e in entities if e.get("dirty")),
        # Large webhook bodies recorded whole, not yet expanded into entities (each up to 500 of them).
        "inbox_batches": len(store.stale_inbox(integration_id, before=(now or time.time()) + INBOX_HORIZON)),
        "retrying": sum(1 for e in entities if e.get("dirty") and e.get("attempts")),
        "failed_count": len(failed),
        "failed": [{"kind": e["kind"], "crm_id": e["crm_id"], "error": e["last_error"],
                    "failed_at": e.get("failed_at")} for e in failed[:FAILED_SHOWN]],
        # Entities whose message failed on every receive and went to the dead-letter queue (oldest
        # first): a redrive (`POST /dead-letters/redrive`) or `replay {}` brings them back.
        "dead_lettered": {"count": len(dead), "entities": [
            {"kind": e["kind"], "crm_id": e["crm_id"], "dead_lettered_at": e["dead_lettered_at"],
             "attempts": e.get("attempts") or 0, "last_error": e.get("last_error")} for e in dead[:DEAD_LETTERED_SHOWN]]},
        "last_successful_upload": max((e.get("sent_at") or 0 for e in entities), default=0) or None,
        "metrika_requests_today": requests_today,
        "orders_sent": len(orders),
        "share_with_client_id": share("with_client_id"),
        "share_with_phone": share("with_phone"),
        "share_with_email": share("with_email"),
        "orders_older_than_21_days": sum(1 for f in orders if f.get("late")),
        **upload_summary(pending, recent, time.time() if now is None else now),
        "webhook": webhook_health,
        "backfill": backfill,
        "products_listed": len(store.products(integration_id)),
        # Values left out of rows: phones that are not numbers (masked example), costs that are not amounts.
        **dropped_summary(entities),
    }


def _crm_id(value: Any) -> str:
    """The id as webhooks carry it (the parsers' rule), or a 400 naming `crm_id`."""
    from .crm import WebhookError
    from .crm.form import crm_id
    try:
        return crm_id(str(value) if isinstance(value, int) and not isinstance(value, bool) else value, "crm_id")
    except WebhookError as exc:
        raise invalid(str(exc), {"crm_id": str(value)[:40]}) from None


def replay(store: Any, requeue: Callable[[str, list[EntityRef]], dict], integration_id: str, body: Any) -> dict:
    """Queue again the parked and the dead-lettered entities, or one named entity (then even an
    unchanged one is re-sent). A dead-lettered entity's queue lease is dropped first: its message is
    in the dead-letter queue, not on its way, so the requeue must take a new lease and send one (the
    old message, should it be redriven too, finds the entity delivered and costs one read)."""
    if body is not None and not isinstance(body, dict):
        raise invalid("body must be a JSON object: {} for every failed or dead-lettered entity, or "
                      "{\"kind\", \"crm_id\"}")
    body = body or {}
    if "crm_id" in body:
        kind = body.get("kind", "order")
        if kind not in ("order", "contact"):
            raise invalid("kind must be order or contact", {"kind": str(kind)[:40]})
        crm_id = _crm_id(body["crm_id"])
        state = store.get_entity(integration_id, kind, crm_id)
        if state is None:
            raise invalid(f"no {kind} {crm_id} has been seen for this integration; it can be fetched by "
                          "reconciliation")
        store.forget_content(integration_id, kind, crm_id)
        targets = [state]
    else:
        targets = [e for e in store.list_entities(integration_id)
                   if (e.get("last_error") and not e.get("dirty")) or e.get("dead_lettered_at")]
    dead = [e for e in targets if e.get("dead_lettered_at")]
    for e in dead:
        store.release_queue_lease(integration_id, e["kind"], e["crm_id"])
    refs = [EntityRef(e["kind"], e["crm_id"], e["event_time"], "replay") for e in targets]
    result = requeue(integration_id, refs) if refs else {"queued": 0}
    deferred = {"deferred": result["deferred"]} if result.get("deferred") else {}  # queued by the worker
    dead_lettered = {"dead_lettered": len(dead)} if dead else {}  # of `replayed`, those brought back from it
    return {"replayed": len(refs), **dead_lettered, "queued": result["queued"], **deferred}


def redrive_limit(body: Any) -> int:
    """The body of `POST /dead-letters/redrive`: none, {} or {"limit": 1..REDRIVE_LIMIT} (messages to
    move in this call); a 400 naming `limit` otherwise."""
    from .queue import REDRIVE_LIMIT
    if body is None:
        return REDRIVE_LIMIT
    if not isinstance(body, dict) or set(body) - {"limit"}:
        raise invalid('body must be a JSON object: {} or {"limit": <messages to move>}')
    limit = body.get("limit", REDRIVE_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= REDRIVE_LIMIT:
        raise invalid(f"limit must be a whole number from 1 to {REDRIVE_LIMIT}", {"limit": str(limit)[:40]})
    return limit


def confirm_uploads(store: Any, metrika: Any, integration_id: str, integration: dict, *,
                    requeue: Callable[[str, list[EntityRef]], dict], now: float | None = None,
                    page_size: int = CONFIRM_PAGE, max_pages: int = CONFIRM_MAX_PAGES) -> dict:
    """Confirm each SENT upload from `last_uploadings`, read back (page by page, newest first) to the
    oldest upload still waiting:

    * listed PASSED with the `elements_count` we sent → PASSED;
    * listed FAILED, or with another count → its entities are sent again, then the upload is FAILED;
    * not listed: waits; past UNCONFIRMED_AFTER (6 h) it is reported (`unconfirmed_over_6h`), and once
      the listing was read back past its time, or after GIVE_UP_AFTER, it is UNCONFIRMED (final,
      reported, no longer looked for).

    Sending again, in an order a crash cannot break: each entity the failed upload carried is marked
    (`mark_resend`: what was sent forgotten, dirty, a lease that has run out), then queued through
    the ingest path (`requeue`, which takes that lease), and only then is the upload marked FAILED. A
    crash before the mark leaves the upload SENT, so the next run finds it FAILED again and repeats
    (one extra delivery at most); a crash before the requeue leaves dirty entities without a live
    lease, which the next event or the stuck sweep queues. A Metrika failure while reading the list
    raises (`BridgeError`) before anything is written."""
    now = time.time() if now is None else now
    # Only the pending uploads: their number, not the integration's history, sets what this reads.
    pending = {u["uploading_id"]: u for u in store.pending_uploads(integration_id) if u.get("status") == "SENT"}
    result = {"checked": len(pending), "passed": 0, "failed": 0, "resent": 0, "unconfirmed": 0, "pages": 0}
    found: dict[str, dict] = {}
    read_back_to: float | None = None
    if pending:
        found, read_back_to, result["pages"] = _listed(metrika, integration["counter_id"], pending,
                                                       integration.get("timezone") or "UTC", page_size, max_pages)
    failed: dict[str, dict] = {}
    settled: set[str] = set()
    for uploading_id, mine in pending.items():
        listed = found.get(uploading_id)
        if listed is not None:
            if listed.get("api_validation_status") == "PASSED" and _count(listed) == mine["rows"]:
                store.confirm_upload(integration_id, uploading_id, "PASSED", _count(listed))
                result["passed"] += 1
                settled.add(uploading_id)
            else:
                failed[uploading_id] = listed
            continue
        age = now - mine["sent_at"]
        looked_past = read_back_to is not None and read_back_to < mine["sent_at"] - LISTING_MARGIN
        if age > UNCONFIRMED_AFTER and (looked_past or age > GIVE_UP_AFTER):
            store.confirm_upload(integration_id, uploading_id, "UNCONFIRMED", None)
            result["unconfirmed"] += 1
            settled.add(uploading_id)
    if failed:
        result["resent"] = _send_again(store, requeue, integration_id, failed)
        result["failed"] = len(failed)
        settled |= set(failed)
    log_event("uploads_confirmed", integration_id=integration_id, **result)
    # Still pending as read above (no second read of them), and the last final ones.
    waiting = [u for uploading_id, u in pending.items() if uploading_id not in settled]
    return {**result, **_unconfirmed_over_6h(waiting + store.recent_uploads(integration_id, limit=UPLOADS_SHOWN), now)}


def _send_again(store: Any, requeue: Callable[[str, list[EntityRef]], dict], integration_id: str,
                failed: dict[str, dict]) -> int:
    """Mark and queue again every entity the failed uploads carried (each once), then mark the
    uploads FAILED (see `confirm_uploads` for why in this order). Returns the entities queued."""
    carried = {uploading_id: store.upload_entities(integration_id, uploading_id) for uploading_id in failed}
    keys = sorted({key for keys in carried.values() for key in keys})
    # An upload carries up to UPLOAD_ROW_LIMIT entities: one write each, in parallel, and a requeue that
    # records them whole above a handful (`Ingest.requeue`), so a run ends within its Lambda's time
    # instead of timing out, leaving the upload SENT and marking the same entities again next run.
    times = each(lambda key: store.mark_resend(integration_id, *key), keys)
    refs: dict[tuple[str, str], EntityRef] = {
        key: EntityRef(key[0], key[1], event_time, "resend") for key, event_time in zip(keys, times)
        if event_time is not None}  # None: no state, its integration's data was deleted meanwhile
    if refs:
        requeue(integration_id, list(refs.values()))
    for uploading_id, listed in failed.items():
        store.confirm_upload(integration_id, uploading_id, "FAILED", _count(listed),
                             resent=sum(1 for key in carried[uploading_id] if key in refs))
        log_event("upload_failed", integration_id=integration_id, uploading_id=uploading_id,
                  status=str(listed.get("api_validation_status"))[:40], elements_count=_count(listed),
                  resent=sum(1 for key in carried[uploading_id] if key in refs))
    return len(refs)


def _count(listed: dict) -> int | None:
    """`elements_count` when it is a whole number (not a bool, string or anything else)."""
    count = listed.get("elements_count")
    return count if type(count) is int else None


def _listed(metrika: Any, counter_id: int, pending: dict[str, dict], time_zone: str, page_size: int,
            max_pages: int) -> tuple[dict[str, dict], float | None, int]:
    """Read `last_uploadings` newest first until every pending upload is found, the listing ends, it
    reaches back past the oldest pending one (by LISTING_MARGIN), or `max_pages`. Returns (pending
    uploads found, by id; how far back the listing was read, as Unix seconds: -inf when to its end,
    None when not known; pages read).

    Paging: `datetime_offset` returns uploads strictly before it ("Информация о последних загрузках",
    https://yandex.ru/dev/metrika/ru/management/openapi/schema/getLastUploadings), so the next offset
    is the page's oldest time plus one second: uploads sharing that second with the page's end are
    listed again (ids already seen are skipped) rather than lost."""
    oldest_pending = min(u["sent_at"] for u in pending.values())
    found: dict[str, dict] = {}
    offset: str | None = None
    read_back_to: float | None = None
    pages = 0
    while pages < max_pages:
        page = metrika.last_uploadings(counter_id, limit=page_size, datetime_offset=offset)
        pages += 1
        page = page if isinstance(page, list) else []  # an answer of another shape lists nothing
        found.update({u["uploading_id"]: u for u in page if isinstance(u, dict) and isinstance(u.get("uploading_id"), str)
                      and u["uploading_id"] in pending and u["uploading_id"] not in found})
        if len(page) < page_size:
            return found, float("-inf"), pages
        oldest = page[-1].get("datetime") if isinstance(page[-1], dict) else None
        read_back_to = listing_time(oldest, time_zone)
        if read_back_to is None or len(found) == len(pending) or read_back_to < oldest_pending - LISTING_MARGIN:
            break
        after = next_offset(oldest)
        # A whole page within one second (no progress): step past that second, the one gap left.
        offset = after if after != offset else oldest
    return found, read_back_to, pages


def listing_time(value: Any, time_zone: str) -> float | None:
    """A `last_uploadings` time as Unix seconds: `yyyy-MM-dd HH:mm:ss` in the counter's time zone (the
    Russian page's form, and Metrika's rule for uploaded times: "Формат даты и времени",
    https://yandex.ru/dev/metrika/ru/data-import/date), or ISO 8601 in UTC with `Z` (the English page's
    example). None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        if value.endswith("Z"):
            return datetime.fromisoformat(value[:-1]).replace(tzinfo=timezone.utc).timestamp()
        return datetime.strptime(value, LISTING_FORMAT).replace(tzinfo=ZoneInfo(time_zone)).timestamp()
    except (ValueError, KeyError):
        return None


def next_offset(value: str) -> str | None:
    """One second after a listed time, written as Metrika wrote it."""
    try:
        if value.endswith("Z"):
            later = datetime.fromisoformat(value[:-1]) + timedelta(seconds=1)
            return later.strftime("%Y-%m-%dT%H:%M:%S.") + f"{later.microsecond // 1000:03d}Z"
        return (datetime.strptime(value, LISTING_FORMAT) + timedelta(seconds=1)).strftime(LISTING_FORMAT)
    except (ValueError, OverflowError):
        return None


def upload_summary(pending: list[dict], recent: list[dict], now: float) -> dict:
    """The status page's part on uploads, from every pending upload and the last UPLOADS_SHOWN final ones
    (`recent`, newest first): `uploads` counts SENT over all pending and the final statuses over those
    last ones; `recent_uploads` lists the last UPLOADS_SHOWN sent, pending or final, newest first;
    `resent_after_failed_uploads` (entities sent again because an upload of them failed) and
    `unconfirmed_over_6h` / `oldest_unconfirmed` (uploads Metrika has not confirmed 6 h after they were
    sent: every pending one, or given up on among the last) count over the same."""
    counts = {status: sum(1 for u in recent if u.get("status") == status) for status in UPLOAD_STATUSES}
    counts["SENT"] = len(pending)
    shown = sorted([*pending, *recent], key=lambda u: (u.get("sent_at") or 0, u["uploading_id"]), reverse=True)
    return {
        "uploads": counts,
        "uploads_window": UPLOADS_SHOWN,
        "recent_uploads": [{k: u[k] for k in ("uploading_id", "kind", "rows", "status", "sent_at", "confirmed_at",
                                              "elements_count", "resent") if k in u} for u in shown[:UPLOADS_SHOWN]],
        "resent_after_failed_uploads": sum(u.get("resent") or 0 for u in recent),
        **_unconfirmed_over_6h([*pending, *recent], now),
    }


def _unconfirmed_over_6h(uploads: list[dict], now: float) -> dict:
    """Uploads Metrika has not confirmed 6 h after they were sent: still waiting, or given up on."""
    late = [u["sent_at"] for u in uploads if u.get("status") == "UNCONFIRMED"
            or (u.get("status") == "SENT" and now - u["sent_at"] > UNCONFIRMED_AFTER)]
    return {"unconfirmed_over_6h": len(late), "oldest_unconfirmed": min(late, default=None)}


def confirm_or_answer(store: Any, metrika: Any, integration_id: str, integration: dict, *,
                      requeue: Callable[[str, list[EntityRef]], dict]) -> dict:
    """`confirm_uploads` for the admin route: Metrika's failure answers as `errors.http_error` says."""
    try:
        return confirm_uploads(store, metrika, integration_id, integration, requeue=requeue)
    except BridgeError as exc:
        raise http_error("could not read Metrika's last uploadings", exc) from exc


def sync_catalog(store: Any, metrika_for: Callable[[dict], Any], sources: dict, integration_id: str) -> dict:
    """Send the CRM's whole product catalogue to Metrika's product list
    (https://yandex.ru/dev/metrika/ru/management/openapi/schema/createProducts "Создание списка товаров"):
    ids normalised as orders use them, names as display names. The list is sent whole, with the
    products orders named earlier kept. A failed CRM or Metrika call answers as `errors.http_error` says
    (502/503 crm_unavailable / metrika_unavailable, 422 crm_refused / metrika_refused)."""
    integration = store.get_integration(integration_id)
    if integration is None:
        raise not_found(f"integration {integration_id!r}")
    source = sources.get(integration["crm"])
    try:
        catalog = {p: (n or p)[:4096] for p, n in source.catalog(integration).items()}
    except BridgeError as exc:
        raise http_error("could not read the CRM's catalogue", exc) from exc
    listed = {**counter_products(store, integration_id, integration["counter_id"]), **catalog}
    if not listed:
        return {"products": 0, "added": 0}
    try:
        metrika_for(integration).save_products(integration["counter_id"],
                                               [{"name": p, "humanized": n} for p, n in sorted(listed.items())])
    except BridgeError as exc:
        raise http_error("Metrika did not accept the product list", exc) from exc
    known = store.products(integration_id)
    store.put_products(integration_id, {p: n for p, n in catalog.items() if known.get(p) != n})
    return {"products": len(listed), "added": sum(1 for p in catalog if p not in known)}


def default_mapping(store: Any, sources: dict, integration_id: str) -> list[dict]:
    """The status mapping the CRM's stages suggest (`CrmSource.default_mapping`); a failed CRM call
    answers as `errors.http_error` says (502/503 crm_unavailable, 422 crm_refused)."""
    integration = store.get_integration(integration_id)
    if integration is None:
        raise not_found(f"integration {integration_id!r}")
    source = sources.get(integration["crm"])
    if source is None:
        raise invalid(f"default status mappings for {integration['crm']} are not available in this build")
    try:
        return source.default_mapping(integration)
    except BridgeError as exc:
        raise http_error("could not read the CRM's stages", exc) from exc


def webhook_health(sources: dict, integration_id: str, integration: dict) -> dict | None:
    """amoCRM switches a webhook off after too many failed deliveries: say so (None for CRMs that do
    not). A failed CRM call does not fail the status page: it shows as `{"error": …}`."""
    source = sources.get(integration["crm"])
    if not hasattr(source, "webhook_health"):
        return None
    try:
        return source.webhook_health(integration, integration_id)
    except BridgeError as exc:
        return {"error": exc.message, "kind": exc.kind}
