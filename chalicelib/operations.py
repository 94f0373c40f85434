"""What an operator needs: an integration's delivery status, replaying parked deals, and confirming
uploads against Metrika's `last_uploadings` (CDP reference §9: a 200 is not proof of loading)."""
from __future__ import annotations

from typing import Any, Callable

from .crm import EntityRef, PermanentSourceError, RetryableSourceError
from .errors import ApiError, invalid, not_found
from .metrika.cdp import MetrikaError

FAILED_SHOWN = 100
CONFIRM_PAGE = 1000


def integration_status(store: Any, integration_id: str, *, requests_today: int | None,
                       webhook_health: dict | None = None, backfill: dict | None = None) -> dict:
    entities = store.list_entities(integration_id)
    failed = [e for e in entities if e.get("last_error") and not e.get("dirty")]
    orders = [e.get("facts") or {} for e in entities if e["kind"] == "order" and (e.get("facts") or {}).get("order")]
    uploads = store.uploads(integration_id)

    def share(flag: str) -> float | None:
        return round(sum(1 for f in orders if f.get(flag)) / len(orders), 3) if orders else None

    return {
        "integration_id": integration_id,
        "backlog": sum(1 for e in entities if e.get("dirty")),
        "retrying": sum(1 for e in entities if e.get("dirty") and e.get("attempts")),
        "failed_count": len(failed),
        "failed": [{"kind": e["kind"], "crm_id": e["crm_id"], "error": e["last_error"],
                    "failed_at": e.get("failed_at")} for e in failed[:FAILED_SHOWN]],
        "last_successful_upload": max((e.get("sent_at") or 0 for e in entities), default=0) or None,
        "metrika_requests_today": requests_today,
        "orders_sent": len(orders),
        "share_with_client_id": share("with_client_id"),
        "share_with_phone": share("with_phone"),
        "share_with_email": share("with_email"),
        "orders_older_than_21_days": sum(1 for f in orders if f.get("late")),
        "uploads": {status: sum(1 for u in uploads if u.get("status") == status) for status in ("SENT", "PASSED", "FAILED")},
        "webhook": webhook_health,
        "backfill": backfill,
        "products_listed": len(store.products(integration_id)),
    }


def replay(store: Any, requeue: Callable[[str, list[EntityRef]], dict], integration_id: str, body: Any) -> dict:
    """Queue again the parked entities, or one named entity (then even an unchanged one is re-sent)."""
    if body is not None and not isinstance(body, dict):
        raise invalid("body must be a JSON object: {} for every failed entity, or {\"kind\", \"crm_id\"}")
    body = body or {}
    if "crm_id" in body:
        kind = body.get("kind", "order")
        if kind not in ("order", "contact"):
            raise invalid("kind must be order or contact")
        state = store.get_entity(integration_id, kind, str(body["crm_id"]))
        if state is None:
            raise invalid(f"no {kind} {body['crm_id']} has been seen for this integration; it can be fetched by "
                          "reconciliation")
        store.forget_content(integration_id, kind, str(body["crm_id"]))
        targets = [state]
    else:
        targets = [e for e in store.list_entities(integration_id) if e.get("last_error") and not e.get("dirty")]
    refs = [EntityRef(e["kind"], e["crm_id"], e["event_time"], "replay") for e in targets]
    result = requeue(integration_id, refs) if refs else {"queued": 0}
    return {"replayed": len(refs), "queued": result["queued"]}


def confirm_uploads(store: Any, metrika: Any, integration_id: str, counter_id: int) -> dict:
    """Mark each SENT upload PASSED or FAILED from `last_uploadings`; a FAILED upload, or one whose
    `elements_count` differs from what we sent, is reported as FAILED."""
    pending = {u["uploading_id"]: u for u in store.uploads(integration_id) if u.get("status") == "SENT"}
    if not pending:
        return {"checked": 0, "passed": 0, "failed": 0}
    try:
        listed = metrika.last_uploadings(counter_id, limit=CONFIRM_PAGE)
    except MetrikaError as exc:
        return {"checked": 0, "error": exc.message}
    passed = failed = 0
    for uploading in listed:
        mine = pending.get(uploading.get("uploading_id"))
        if mine is None:
            continue
        ok = uploading.get("api_validation_status") == "PASSED" and uploading.get("elements_count") == mine["rows"]
        store.confirm_upload(integration_id, mine["uploading_id"], "PASSED" if ok else "FAILED",
                             uploading.get("elements_count"))
        passed, failed = passed + ok, failed + (not ok)
    return {"checked": len(pending), "passed": passed, "failed": failed}


def sync_catalog(store: Any, metrika_for: Callable[[dict], Any], sources: dict, integration_id: str) -> dict:
    """Send the CRM's whole product catalogue to Metrika's product list (CDP reference §8.3): ids
    normalised as orders use them, names as display names. The list is sent whole, with the products
    orders named earlier kept."""
    from .integrations import metrika_refused
    integration = store.get_integration(integration_id)
    if integration is None:
        raise not_found(f"integration {integration_id!r}")
    source = sources.get(integration["crm"])
    try:
        catalog = {p: (n or p)[:4096] for p, n in source.catalog(integration).items()}
    except PermanentSourceError as exc:
        raise ApiError(422, "crm_refused", f"could not read the CRM's catalogue: {exc}") from exc
    except RetryableSourceError as exc:
        raise ApiError(502, "crm_unavailable", f"could not read the CRM's catalogue: {exc}; try again later") from exc
    listed = {**store.products(integration_id), **catalog}
    if not listed:
        return {"products": 0, "added": 0}
    try:
        metrika_for(integration).save_products(integration["counter_id"],
                                               [{"name": p, "humanized": n} for p, n in sorted(listed.items())])
    except MetrikaError as exc:
        raise metrika_refused("Metrika did not accept the product list", exc) from exc
    known = store.products(integration_id)
    store.put_products(integration_id, {p: n for p, n in catalog.items() if known.get(p) != n})
    return {"products": len(listed), "added": sum(1 for p in catalog if p not in known)}
