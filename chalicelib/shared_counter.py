"""Several integrations on one Metrika counter (two CRMs, or two amoCRM accounts, feeding one site's
counter): order and customer ids that do not collide, assigned once.

Metrika keys customers by `uniq_id` and orders by `id`, per counter ("Customer data format",
https://yandex.com/dev/metrika/en/data-import/contacts-data; "Order data format",
https://yandex.com/dev/metrika/en/data-import/orders-data): both are any non-empty string. Raw CRM ids
collide across CRMs (amoCRM lead 500 and Bitrix24 deal 500 are one order to Metrika), so an integration
that is not alone on its counter sends every id as `<integration id>:<CRM id>` (`shop-b24:500`,
`shop-b24:lead-500` for a synthesised customer, its orders' `client_uniq_id` alike). The prefix
(`id_prefix` in the config) is decided when the integration is saved, never changed afterwards:

* created on a counter no other integration uses: no prefix, the raw CRM ids (as before; an existing
  integration keeps the ids Metrika already holds);
* created on, or moved to, a counter another integration uses: `<integration id>:`;
* once set, kept by every later PUT (a PUT may send it back unchanged, as GET shows it).

Lists that are one per counter — order statuses (`mapping_admin`) and products (`counter_products`) — are
sent as the union of what every integration on the counter lists, since a save may replace the whole
list.

Integration ids are `[A-Za-z0-9_-]` and CRM ids digits (or `lead-`/`deal-` + digits), so a prefixed id is
unambiguous and a raw one never contains `:`: applying the prefix twice changes nothing (a deletion
re-sends the order as last sent, already prefixed). Product ids are not prefixed: a product list is one
per counter and both CRMs naming product `123` share its entry.

The decision and the config's write are one step per counter: `saved_with_id_prefix` holds a lease on
the counter (`counter_lease`, one slot, shared by every process) from the read of who else is on it to
the write, so two integrations created on one empty counter at the same instant cannot both get raw
ids: the second reads the first. A status-list push holds another (`mapping_admin`), from reading the
other integrations' mappings to storing its own, so two pushes side by side cannot drop each other's
new statuses. A request that cannot get the lease within LEASE_WAIT seconds is a 409 `counter_busy`
(nothing stored; send it again).
"""
from __future__ import annotations

import time
import uuid
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from .errors import ApiError, invalid

SEPARATOR = ":"
# A crashed holder's lease frees itself after this (a PUT takes well under a second; a status push is one
# Metrika call, bounded by the client's timeouts and retries well within it).
LEASE_TTL = 60.0
LEASE_WAIT = 5.0  # how long a request waits for another on the same counter before a 409
LEASE_POLL = 0.05


def id_prefix(integration: dict) -> str:
    return integration.get("id_prefix") or ""


def scoped_id(prefix: str, crm_id: str) -> str:
    """The id Metrika knows for a CRM id; an id already carrying the prefix is left as it is."""
    return crm_id if not prefix or crm_id.startswith(prefix) else prefix + crm_id


def scoped_rows(prefix: str, contacts: list[dict], orders: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows with the integration's ids: `uniq_id`, order `id` and `client_uniq_id` (new dicts)."""
    if not prefix:
        return contacts, orders
    return ([{**c, "uniq_id": scoped_id(prefix, c["uniq_id"])} for c in contacts],
            [{**o, "id": scoped_id(prefix, o["id"]), "client_uniq_id": scoped_id(prefix, o["client_uniq_id"])}
             for o in orders])


def assigned_id_prefix(store: Any, integration_id: str, counter_id: int, sent: Any = None) -> dict:
    """{"id_prefix": …} for the config about to be saved, or {} for raw ids (see the module doc).
    `sent`: the `id_prefix` the PUT body carried, if any: only the stored value may be sent back."""
    stored = store.get_integration(integration_id) or {}
    kept = check_sent_prefix(stored, sent)
    if kept:
        return {"id_prefix": kept}
    if stored and stored.get("counter_id") == counter_id:
        return {}  # its ids in Metrika stay as they are
    others = [i for i in store.integrations_on_counter(counter_id) if i != integration_id]
    return {"id_prefix": integration_id + SEPARATOR} if others else {}


def check_sent_prefix(stored: dict | None, sent: Any) -> str:
    """The stored `id_prefix` ("" for raw ids), or a 400 when the PUT body sent another (`sent`: the
    body's `id_prefix`, None when left out). Checked before anything a PUT does outside its own config."""
    kept = (stored or {}).get("id_prefix") or ""
    if sent is not None and sent != kept:
        raise invalid("id_prefix is assigned by the service and never changes",
                      {"id_prefix": [f"must be left out or sent back as stored ({kept!r})"]})
    return kept


@contextmanager
def counter_lease(store: Any, scope: str, counter_id: int, *, clock=time.time, sleep=time.sleep) -> Iterator[None]:
    """One holder at a time per counter and `scope` ("ids": deciding an id prefix; "statuses": pushing
    the counter's status list), across processes (`acquire_lease`, one slot). Waits up to LEASE_WAIT
    seconds, then a 409 `counter_busy` (nothing done: send the request again). A crashed holder's lease
    runs out after LEASE_TTL."""
    key, owner = f"counter-{scope}:{counter_id}", uuid.uuid4().hex
    deadline = clock() + LEASE_WAIT
    while (slot := store.acquire_lease(key, 1, owner, clock(), LEASE_TTL)) is None:
        if clock() >= deadline:
            raise ApiError(409, "counter_busy", f"another change on counter {counter_id} is being made at this "
                                                "moment; send the request again")
        sleep(LEASE_POLL)
    try:
        yield
    finally:
        store.release_lease(key, slot, owner)


def saved_with_id_prefix(store: Any, integration_id: str, config: dict, sent: Any = None) -> dict:
    """Decide the config's `id_prefix` (`assigned_id_prefix`) and store the config, under the counter's
    "ids" lease when the decision reads the other integrations there (see the module doc). Returns the
    config as stored."""
    stored = store.get_integration(integration_id) or {}
    # Decided already (kept, or raw on the counter it is on): nothing else is read, no lease needed.
    decided = bool(stored.get("id_prefix") or (stored and stored.get("counter_id") == config["counter_id"]))
    with nullcontext() if decided else counter_lease(store, "ids", config["counter_id"]):
        config = {**config, **assigned_id_prefix(store, integration_id, config["counter_id"], sent)}
        store.put_integration(integration_id, config)
    return config


def counter_products(store: Any, integration_id: str, counter_id: int, *,
                     own: dict[str, str] | None = None) -> dict[str, str]:
    """The product list as the counter should hold it: every integration's products on this counter
    (product id → display name), this integration's names winning where two name one id. Sent whole
    by every product sync ("Creating a product list",
    https://yandex.com/dev/metrika/en/management/openapi/schema/createProducts, does not say whether a
    save replaces or adds), so one integration's sync must not drop the other's products. `own`: this
    integration's list as the caller just read it (`store.products`), so it is not read twice."""
    listed: dict[str, str] = {}
    for other in store.integrations_on_counter(counter_id):
        if other != integration_id:
            listed.update(store.products(other))
    return {**listed, **(own if own is not None else store.products(integration_id))}
