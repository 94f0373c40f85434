"""What an operator needs: an integration's delivery status, replaying parked deals, and confirming
uploads against Metrika's `last_uploadings` (a 200 to an upload is not proof of loading: its
`api_validation_status` says so later — https://yandex.ru/dev/metrika/ru/management/openapi/schema/getLastUploadings
"Информация о последних загрузках")."""
from __future__ import annotations

from typing import Any, Callable

from .crm import EntityRef
from .crm.notes import dropped_summary
from .errors import BridgeError, http_error, invalid, not_found

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
    """Queue again the parked entities, or one named entity (then even an unchanged one is re-sent)."""
    if body is not None and not isinstance(body, dict):
        raise invalid("body must be a JSON object: {} for every failed entity, or {\"kind\", \"crm_id\"}")
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
    except BridgeError as exc:
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
    listed = {**store.products(integration_id), **catalog}
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
