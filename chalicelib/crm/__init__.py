"""What the CRM-specific webhook parsers hand to the pipeline."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

ORDER = "order"
CONTACT = "contact"


def crm_contact_id(uniq_id: str) -> str | None:
    """The CRM contact a contact row's `uniq_id` stands for (amoCRM and Bitrix24 ids are numbers),
    with or without its integration's id prefix (`shop:123` → `123`, see `chalicelib.shared_counter`);
    None for the customer synthesised for a deal without one (`lead-…`, `deal-…`)."""
    local = uniq_id.rpartition(":")[2]
    return local if local.isascii() and local.isdigit() else None


def is_crm_contact(uniq_id: str) -> bool:
    return crm_contact_id(uniq_id) is not None


@dataclass(frozen=True)
class EntityRef:
    """A CRM entity a webhook says has changed. The worker re-reads it from the CRM, so the reference
    carries only what ordering and routing need: which entity, when it changed, and how."""

    kind: str  # ORDER (a deal/lead) or CONTACT
    crm_id: str
    event_time: int  # Unix seconds of the change as the CRM reports it
    action: str  # add / update / status / delete / restore … as named by the CRM


class WebhookError(ValueError):
    """The body is not a webhook this CRM sends; the message says what is wrong."""


@dataclass
class EntityRows:
    """What one CRM entity becomes in Metrika, or why it cannot."""

    contacts: list[dict] = field(default_factory=list)
    orders: list[dict] = field(default_factory=list)
    error: dict | None = None  # permanent problem (unmapped stage…): park the entity, visibly
    gone: bool = False  # deleted in the CRM (or no longer readable)
    # Products the orders name: product id → what the CRM told us on the way ({"name", "catalog_id"}),
    # so the product list can be filled without asking again.
    products: dict[str, dict] = field(default_factory=dict)
    # What the translation left out (a phone that is not a number, a cost that is not an amount), for
    # the status page: kept in the entity's facts by the delivery (crm/notes.py). None: nothing to say.
    notes: dict | None = None
    # A deal's row for a CRM contact joins two sources: the contact as read now and the ClientIDs the
    # deal itself carries (its field, or its lead's). Per customer `uniq_id`: (the contact's own row,
    # the deal's ClientIDs), so the delivery can keep them apart and a value removed from either leaves
    # Metrika (`chalicelib.customers`). A customer not named here is wholly this entity's.
    contact_parts: dict[str, tuple[dict, list[str]]] = field(default_factory=dict)


@dataclass
class BackfillPage:
    """One step of a history import: the entities read, each with the CRM's change time, and where to
    continue. `rows` and `event_times` are keyed by (kind, crm id)."""

    rows: dict[tuple[str, str], EntityRows]
    event_times: dict[tuple[str, str], int]
    cursor: dict | None  # None: this phase is done
    requests: int = 0  # CRM requests this page cost
    total: int | None = None  # entities left in this phase from the page's start, when the CRM says


class CrmSource(Protocol):
    """Re-reads entities from one CRM and translates them into raw Metrika rows (amoCRM, Bitrix24)."""

    def snapshot(self, integration: dict, mapping: list[dict], refs: list[EntityRef],
                 attributes: list[dict] = ()) -> dict[tuple[str, str], EntityRows]:
        """Current rows for each ref, keyed by (kind, crm id), with mapped custom attributes' raw values."""

    def default_mapping(self, integration: dict) -> list[dict]:
        """Proposed status mapping entries for every stage the CRM has."""

    def changed_since(self, integration: dict, since: int) -> list[EntityRef]:
        """Deals changed since `since` (Unix seconds), for reconciliation."""

    def product_names(self, integration: dict, products: dict[str, dict]) -> dict[str, str]:
        """Display names of these products (ids as in orders, with the snapshot's hints)."""

    def catalog(self, integration: dict) -> dict[str, str]:
        """Every product of the CRM's catalogue: product id → display name."""

    def backfill_page(self, integration: dict, mapping: list[dict], attributes: list[dict], phase: str,
                      since: int, cursor: dict | None) -> BackfillPage:
        """One page of the history import: `phase` is "contacts" or "orders", entities changed since
        `since` (Unix seconds), continuing from `cursor` (None: from the start)."""


def unmapped_stage(stage: str, name: str | None = None) -> EntityRows:
    """A deal whose stage has no Metrika status: held, with the reason a person needs, never guessed.
    The pipeline re-queues it when a mapping for `crm_status` arrives."""
    label = f"stage {stage} ({name})" if name else f"stage {stage}"
    return EntityRows(error={"code": "unmapped_stage", "crm_status": stage,
                             "message": f"{label} is not in the status mapping; "
                                        "the deal is held and sent as soon as the stage is mapped"})


def slot_waiter(reserve_slot: Callable[[str, float, float], float], scope: str, interval: float) -> Callable[[], None]:
    """Block until the shared limiter (`Store.reserve_slot`) lets this process send to `scope`
    (`<crm>:<hash>`); `OutOfTime` instead when the invocation's deadline leaves no time to wait for the
    slot and make the call (`chalicelib.deadline`)."""
    def wait_for_slot() -> None:
        from .. import deadline  # stdlib only; imported here, as the webhook path never waits for a slot
        delay = reserve_slot(scope, interval, time.time()) - time.time()
        if delay > 0:
            if not deadline.allows(delay):
                crm = scope.partition(":")[0]
                raise deadline.OutOfTime(f"no time left in this invocation to wait {delay:.1f} s for {crm}'s rate "
                                         "limit", source=crm, retry_after=1)
            time.sleep(delay)
    return wait_for_slot
