"""The admin operations behind `GET/PUT /integrations/{id}/status-mapping`: read the stored mapping,
and validate → push to Metrika → store a new one. The rules themselves are `status_mapping` (pure);
this module is where they meet the store and the Metrika client.

Metrika side: "Order status mapping", https://yandex.com/dev/metrika/en/management/openapi/schema/mapOrderStatuses
(the POST takes the whole list; whether it replaces or merges is not stated, so we assume it replaces
and always send the full list of the counter: the statuses of every integration on it).

Deleting an integration pushes nothing: orders it uploaded keep their status ids, and the next push on
the counter (by another integration) sends the others' union without its statuses. Moving an integration
to another counter (a PUT with a new `counter_id`) pushes its stored mapping there, as the union with the
integrations already on that counter, before the config is stored (`push_to_new_counter`), holding that
counter's status lease until the config is stored: its orders name its status ids, which the new counter
would not know otherwise. Its old counter keeps its statuses until the next push there, as after a
deletion.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from marshmallow import ValidationError

from .errors import ApiError, BridgeError, http_error, invalid, not_found
from .logs import log_event
from .shared_counter import counter_lease
from .status_mapping import StatusConflict, StatusMapping, counter_order_statuses


def _integration(store: Any, integration_id: str) -> dict:
    config = store.get_integration(integration_id)
    if config is None:
        raise not_found(f"integration {integration_id!r}")
    return config


def read_mapping(store: Any, integration_id: str) -> dict:
    """The stored mapping as the API shows it; 404 when the integration does not exist."""
    _integration(store, integration_id)
    mapping = store.get_status_mapping(integration_id) or {"entries": [], "pushed_at": None}
    return {"integration_id": integration_id, **mapping}


def replace_mapping(store: Any, integration_id: str, body: Any, metrika_for,
                    requeue_held: Callable[[str, list[dict]], int] | None = None) -> dict:
    """Validate, push the full list to Metrika, then store. If Metrika refuses, nothing is stored and
    the caller sees Metrika's reason. Deals held for a stage that is now mapped are queued again."""
    integration = _integration(store, integration_id)
    try:
        entries = StatusMapping().load(body if isinstance(body, dict) else {"entries": body})["entries"]
    except ValidationError as exc:
        raise invalid("status mapping is invalid", exc.messages) from exc
    others, statuses, pushed_at = _push(store, integration_id, integration, entries, metrika_for)
    requeued = requeue_held(integration_id, entries) if requeue_held else 0
    shared_with = sorted(other for other, listed in others.items() if listed)
    log_event("status_mapping_pushed", integration_id=integration_id, entries=len(entries), requeued=requeued,
              statuses=len(statuses), shared_with=len(shared_with))
    return {"integration_id": integration_id, "entries": entries, "pushed_at": pushed_at, "requeued": requeued,
            "counter_statuses": len(statuses), "shared_with": shared_with}


@contextmanager
def push_to_new_counter(store: Any, integration_id: str, config: dict, metrika_for) -> Iterator[None]:
    """Around the store of a validated config (the `with` body): when it moves a stored integration that
    has a status mapping to another counter, push that mapping there (the union with the integrations
    already on it, with `config`'s token) and hold the new counter's status lease until the body has
    stored the config: a push there by another integration in between would read the counter without
    this one and send a list without its statuses. A 409 (`status_conflict`) or Metrika's refusal is
    raised as `replace_mapping` raises it, so the PUT stores nothing and the integration stays where it
    was."""
    stored = store.get_integration(integration_id)
    entries = [] if stored is None or stored.get("counter_id") in (None, config["counter_id"]) else (
        (store.get_status_mapping(integration_id) or {}).get("entries") or [])
    if not entries:
        yield
        return
    with counter_lease(store, "statuses", config["counter_id"]):
        _push_now(store, integration_id, config, entries, metrika_for)
        yield


def _push(store: Any, integration_id: str, integration: dict, entries: list[dict],
          metrika_for) -> tuple[dict[str, list[dict]], list[dict], int]:
    """Push `entries` with every other mapping on `integration`'s counter, then store them, one push at
    a time per counter (`shared_counter.counter_lease`: two side by side each read the other's old
    list, and the one landing last dropped the other's new statuses). Returns the others' entries by
    integration, the list pushed and when."""
    if "counter_id" not in integration:  # installed from the CRM, no counter connected yet (as app.get_metrika)
        raise ApiError(409, "metrika_not_connected", "this integration has no Metrika counter yet: PUT it with "
                                                     "counter_id and metrika_token first")
    with counter_lease(store, "statuses", integration["counter_id"]):
        return _push_now(store, integration_id, integration, entries, metrika_for)


def _push_now(store: Any, integration_id: str, integration: dict, entries: list[dict],
              metrika_for) -> tuple[dict[str, list[dict]], list[dict], int]:
    others = {other: (store.get_status_mapping(other) or {}).get("entries") or []
              for other in store.integrations_on_counter(integration["counter_id"]) if other != integration_id}
    try:
        statuses = counter_order_statuses(integration_id, entries, others)
    except StatusConflict as exc:
        raise ApiError(409, "status_conflict", str(exc), exc.details) from exc
    try:
        metrika_for(integration).save_order_statuses(integration["counter_id"], statuses)
    except BridgeError as exc:
        log_event("status_mapping_refused", integration_id=integration_id, status=exc.status, kind=exc.kind)
        raise http_error("Metrika did not accept the status mapping", exc) from exc
    pushed_at = int(time.time())
    store.put_status_mapping(integration_id, entries, pushed_at)
    return others, statuses, pushed_at
