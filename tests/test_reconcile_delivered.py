"""Reconciliation leaves alone what webhooks already delivered (issue 15, item 4), and never a real change.

Before: every deal the CRM listed went through `mark_dirty`, and equal event times pass, so 100 deals
the webhooks had delivered cost 100 messages, 100 + 100 + 1 writes and a worker run, to upload nothing,
every run. In process: the in-memory store and queue, a fake clock, the Metrika sandbox over loopback."""
from __future__ import annotations

import json

import pytest

from chalicelib import deadline
from chalicelib.crm import ORDER, EntityRef, EntityRows, unmapped_stage
from chalicelib.delivered import COMPARE_CHUNK, split_listed
from chalicelib.errors import Transient, Unavailable
from tests.core import Core, deal_rows, watch_calls

T = 1_789_990_000  # the deals' last change, as webhooks and the listing give it (the clock is at 1_790_000_000)
SKEW = 300
# The store's methods that only read; any other call is a write.
READS = {"get_integration", "list_integration_ids", "integrations_on_counter", "get_status_mapping",
         "get_attribute_mapping", "get_cursor", "get_entity", "list_entities", "stuck_entities",
         "existing_entities", "content_hashes", "delivered_versions", "uploads", "upload_entities", "products",
         "requests_on", "customers", "get_backfill", "get_crm_account", "get_inbox", "stale_inbox"}


@pytest.fixture
def core(metrika_sandbox):
    return Core(metrika_sandbox.url)


def record_calls(store) -> list[str]:
    """Wrap every public method of this store object; the names called, in order."""
    called: list[str] = []
    watch_calls(store, [n for n in dir(store) if not n.startswith("_") and callable(getattr(store, n))], called.append)
    return called

def delivered(core: Core, deals: int, *, at: int = T) -> str:
    """`deals` deals delivered by their webhooks (event time `at`); the listing will name them at `at`."""
    shop = core.integration()
    core.source.rows = {(ORDER, str(i)): deal_rows(str(i), contact=str(1000 + i)) for i in range(deals)}
    core.ingest.record(shop, [EntityRef(ORDER, str(i), at, "update") for i in range(deals)], origin="replay")
    core.drain()
    assert all(not core.store.get_entity(shop, ORDER, str(i))["dirty"] for i in range(deals))
    core.source.changed = [EntityRef(ORDER, str(i), at, "reconcile") for i in range(deals)]
    core.source.calls.clear()
    return shop


def data_requests(sandbox) -> int:
    return len([r for r in sandbox.requests if "/data/" in r["path"]])


def test_reconciling_100_delivered_deals_queues_none_and_writes_none(core, metrika_sandbox):
    shop = delivered(core, 100)
    uploads = data_requests(metrika_sandbox)
    called = record_calls(core.store)
    result = core.ingest.reconcile(shop, core.source)
    assert (result["found"], result["delivered"], result["queued"], result["swept"]) == (100, 100, 0, 0)
    assert len(core.queue) == 0
    # the run's cursors (when it ran; where its window starts, new here): no entity write
    assert [name for name in called if name not in READS] == ["put_cursor", "put_cursor"]
    assert called.count("delivered_versions") == 1  # the listed deals' state: one bulk read
    assert core.source.calls == [[(ORDER, str(i)) for i in sorted(range(100), key=str)]]  # one CRM read
    core.drain()
    assert data_requests(metrika_sandbox) == uploads
    called.clear()
    assert core.ingest.reconcile(shop, core.source)["queued"] == 0
    assert [name for name in called if name not in READS] == ["put_cursor"]  # the position did not move


def test_a_change_in_the_same_second_as_the_delivery_still_goes(core, metrika_sandbox):
    """The listing's times are whole seconds: a change after the delivery's CRM read, within the same
    second, lists the very time recorded. Its content differs from what was delivered: it is queued."""
    shop = delivered(core, 3)
    core.source.rows[(ORDER, "1")] = deal_rows("1", contact="1001", status="CANCELLED")  # webhook lost
    result = core.ingest.reconcile(shop, core.source)
    assert (result["delivered"], result["queued"]) == (2, 1)
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders["1"]["order_status"] == "CANCELLED"
    assert core.store.get_entity(shop, ORDER, "1")["dirty"] is False


def test_a_change_to_the_deals_contact_in_the_same_second_still_goes(core, metrika_sandbox):
    shop = delivered(core, 2)
    core.source.rows[(ORDER, "0")] = deal_rows("0", contact="1000", client_ids=["1714651234567890123"])
    assert core.ingest.reconcile(shop, core.source)["queued"] == 1
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).contacts["1000"]["client_ids"] == ["1714651234567890123"]


def test_a_deal_whose_webhook_was_lost_still_goes_without_a_comparison(core, metrika_sandbox):
    shop = delivered(core, 3)
    core.source.rows[(ORDER, "2")] = deal_rows("2", contact="1002", revenue=77777)
    core.source.rows[(ORDER, "9")] = deal_rows("9", contact="1009")  # never heard of
    core.source.changed = [EntityRef(ORDER, "0", T, "reconcile"), EntityRef(ORDER, "1", T - 60, "reconcile"),
                           EntityRef(ORDER, "2", T + 30, "reconcile"), EntityRef(ORDER, "9", T, "reconcile")]
    result = core.ingest.reconcile(shop, core.source)
    assert (result["found"], result["delivered"], result["queued"]) == (4, 2, 2)
    assert core.source.calls == [[(ORDER, "0")]]  # only the equal time is read; an older one is not
    core.drain()
    orders = metrika_sandbox.counter(core.counter_id).orders
    assert orders["2"]["revenue"] == 77777 and "9" in orders


@pytest.mark.parametrize("doubt", ["crm_fails", "crm_unreachable", "gone", "invalid", "unmapped", "crash"])
def test_when_the_comparison_cannot_tell_the_deals_go_as_before(core, metrika_sandbox, doubt):
    shop = delivered(core, 3)
    if doubt == "crm_fails":
        core.source.fail = lambda integration: (_ for _ in ()).throw(Transient("amoCRM answered 503", source="amocrm"))
    elif doubt == "crm_unreachable":
        core.source.fail = lambda integration: (_ for _ in ()).throw(ConnectionError("reset by peer"))
    elif doubt == "gone":
        core.source.rows[(ORDER, "1")] = EntityRows(gone=True)
    elif doubt == "invalid":
        core.source.rows[(ORDER, "1")] = deal_rows("1", contact="1001", revenue=-5)
    elif doubt == "unmapped":
        core.source.rows[(ORDER, "1")] = unmapped_stage("7001:1001")
    else:
        core.source.rows[(ORDER, "1")] = "not rows at all"
    result = core.ingest.reconcile(shop, core.source)
    expected = 3 if doubt in ("crm_fails", "crm_unreachable", "crash") else 1
    assert (result["queued"], result["delivered"]) == (expected, 3 - expected)
    assert len(core.queue) == expected


def test_our_store_failing_fails_the_run(core):
    shop = delivered(core, 2)

    def unavailable(*args, **kwargs):
        raise Unavailable("store", "drill")

    core.store.get_crm_account = unavailable
    core.source.fail = lambda integration: core.store.get_crm_account("amocrm:x")
    with pytest.raises(Unavailable):
        core.ingest.reconcile(shop, core.source)


def test_entities_that_are_not_delivered_as_they_stand_go_as_before(core, metrika_sandbox):
    """Dirty (a message pending), parked, replayed (content forgotten), held by a history import,
    dead-lettered: the state does not say Metrika holds them as listed."""
    shop = delivered(core, 5)
    store = core.store
    assert store.mark_dirty(shop, EntityRef(ORDER, "0", T, "update"), now=core.clock.now, lease_seconds=900,
                            future_skew=SKEW) is True  # pending: a message is on its way
    store.claim(shop, ORDER, "1")
    assert store.mark_failed(shop, ORDER, "1", event_time=T, error={"kind": "permanent", "message": "refused"})
    store.forget_content(shop, ORDER, "2")
    assert store.take_for_backfill(shop, ORDER, "3", T + 1, "other", now=core.clock.now, lease_seconds=900)
    result = core.ingest.reconcile(shop, core.source)
    assert result["delivered"] == 1 and core.source.calls == [[(ORDER, "4")]]
    # 0 and 3 hold live leases (their messages are believed on their way): recorded, not queued again.
    assert result["queued"] == 2 and sorted(json.loads(m)["crm_id"] for m in core.queue.receive()) == ["1", "2"]


def test_a_recorded_time_from_the_year_2100_is_not_trusted(core, metrika_sandbox):
    """A clean entity whose recorded time is far ahead of our clock (data from before times were capped)
    would otherwise make every real change look older than its delivery, for ever."""
    shop = delivered(core, 1)
    store = core.store
    year_2100 = 4_102_444_800
    assert store.mark_dirty(shop, EntityRef(ORDER, "0", year_2100, "update"), now=core.clock.now,
                            lease_seconds=900, future_skew=10**12)
    state = store.claim(shop, ORDER, "0")
    assert store.mark_clean(shop, ORDER, "0", event_time=year_2100, content_hash=state["content_hash"],
                            row_hashes=state["row_hashes"], uploading_id=None)
    core.source.rows[(ORDER, "0")] = deal_rows("0", contact="1000", status="CANCELLED")
    core.source.changed = [EntityRef(ORDER, "0", T + 100, "reconcile")]
    assert core.ingest.reconcile(shop, core.source)["queued"] == 1
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders["0"]["order_status"] == "CANCELLED"


def test_comparisons_start_only_with_time_left_and_the_rest_go_as_before(core, metrika_sandbox):
    shop = delivered(core, 3)
    clock = [0.0]
    with deadline.invocation(15.0, clock=lambda: clock[0]):  # less than a comparison's COMPARE_SECONDS
        result = core.ingest.reconcile(shop, core.source)
    assert (result["delivered"], result["queued"]) == (0, 3) and core.source.calls == []


def test_a_long_listing_is_compared_in_chunks_of_one_crm_read(core, metrika_sandbox, monkeypatch):
    import chalicelib.delivered
    assert COMPARE_CHUNK == 250  # one amoCRM page
    monkeypatch.setattr(chalicelib.delivered, "COMPARE_CHUNK", 4)
    shop = delivered(core, 10)
    core.source.rows[(ORDER, "7")] = deal_rows("7", contact="1007", revenue=1)  # changed: in the second chunk
    result = core.ingest.reconcile(shop, core.source)
    assert (result["delivered"], result["queued"]) == (9, 1)
    assert [len(call) for call in core.source.calls] == [4, 4, 2]


# --- the window, in the CRM's clock ------------------------------------------------------------------

LAG = 4 * 3600  # the CRM's clock runs this far behind ours


def windowed(core: Core) -> list[int]:
    """The CRM lists what changed at or after the window's start, as both CRMs do; the starts asked for."""
    starts: list[int] = []
    def changed_since(integration, since):
        starts.append(since)
        return [r for r in core.source.changed if r.event_time >= since]
    core.source.changed_since = changed_since
    return starts


def position(core: Core, shop: str) -> int | None:
    return core.store.get_cursor(shop, "reconcile_position")


def test_the_window_follows_the_newest_time_the_crm_listed_not_our_clock(core):
    shop, now = core.integration(), int(core.clock.now)
    starts = windowed(core)
    assert core.ingest.reconcile(shop, core.source)["found"] == 0  # nothing listed: the first day kept
    assert starts == [now - 24 * 3600 - 120] and position(core, shop) == now - 24 * 3600
    core.source.rows = {(ORDER, c): deal_rows(c, contact="c" + c) for c in ("1", "2")}
    core.source.changed = [ref("1", now - LAG)]
    assert core.ingest.reconcile(shop, core.source)["queued"] == 1
    assert position(core, shop) == now - LAG and core.store.get_cursor(shop, "reconcile") == now
    core.drain()
    core.clock.advance(600)
    core.source.changed.append(ref("2", now + 600 - LAG))  # changed 10 minutes later, CRM time; no webhook
    result = core.ingest.reconcile(shop, core.source)
    assert (result["since"], result["found"], result["queued"]) == (now - LAG - 120, 2, 1)
    assert position(core, shop) == now + 600 - LAG


def test_a_deal_dated_in_2100_does_not_carry_the_window_past_every_real_change(core):
    shop, now = core.integration(), int(core.clock.now)
    windowed(core)
    core.source.rows = {(ORDER, c): deal_rows(c, contact="c" + c) for c in ("1", "2", "3")}
    core.source.changed = [ref("1", 4_102_444_800), ref("2", now - LAG)]
    core.ingest.reconcile(shop, core.source)
    assert position(core, shop) == now - LAG
    core.source.changed = [ref("3", now + 3600)]  # only times past ours: a CRM clock an hour ahead
    core.ingest.reconcile(shop, core.source)
    assert position(core, shop) == now + 300  # our clock plus the skew we accept, never past what it listed


def test_a_since_after_the_position_leaves_it_and_one_before_it_may_move_it_back(core):
    shop, now = core.integration(), int(core.clock.now)
    starts = windowed(core)
    core.source.rows = {(ORDER, c): deal_rows(c, contact="c" + c) for c in ("1", "2")}
    core.store.put_cursor(shop, "reconcile_position", now - 3600)
    core.source.changed = [ref("1", now - 60)]
    assert core.ingest.reconcile(shop, core.source, since=now - 600)["found"] == 1
    assert starts[-1] == now - 720 and position(core, shop) == now - 3600  # [now - 3600, now - 720] not seen yet
    core.store.put_cursor(shop, "reconcile_position", now + 7200)  # ahead of every change: a CRM clock jumped back
    core.source.changed = [ref("2", now - LAG)]
    core.ingest.reconcile(shop, core.source)
    assert position(core, shop) == now + 7200  # a scheduled run never moves it back
    assert core.ingest.reconcile(shop, core.source, since=now - 2 * LAG)["found"] == 1
    assert position(core, shop) == now - LAG  # an operator's `since` before it does


def test_a_cursor_of_an_earlier_version_starts_a_day_back_at_most(core):
    """Earlier versions kept only when the last run ran, by our clock: a CRM clock behind it would make
    that window miss its changes, so the first run after the upgrade looks back a day, as a first run."""
    shop, now = core.integration(), int(core.clock.now)
    starts = windowed(core)
    core.store.put_cursor(shop, "reconcile", now - 600)
    core.ingest.reconcile(shop, core.source)
    idle = core.integration("idle")
    core.store.put_cursor(idle, "reconcile", now - 3 * 24 * 3600)
    core.ingest.reconcile(idle, core.source)
    assert starts == [now - 24 * 3600 - 120, now - 3 * 24 * 3600 - 120]


# --- the pure split ------------------------------------------------------------------------------------

def ref(crm_id: str, at: int) -> EntityRef:
    return EntityRef(ORDER, crm_id, at, "reconcile")


def test_split_by_time_against_the_state():
    state = {(ORDER, c): {"event_time": T, "content_hash": "h"} for c in ("equal", "older", "newer", "twice")}
    state[(ORDER, "future")] = {"event_time": 4_102_444_800, "content_hash": "h"}
    state[(ORDER, "no-hash")] = {"event_time": T, "content_hash": ""}
    listed = split_listed([ref("equal", T), ref("older", T - 1), ref("newer", T + 1), ref("unknown", T),
                           ref("future", T), ref("no-hash", T), ref("twice", T - 5), ref("twice", T + 2),
                           ref("twice", T)], state, now=1_790_000_000, future_skew=SKEW)
    assert [r.crm_id for r in listed.compare] == ["equal"]
    assert [r.crm_id for r in listed.skipped] == ["older"]
    assert sorted((r.crm_id, r.event_time) for r in listed.record) == [
        ("future", T), ("newer", T + 1), ("no-hash", T), ("twice", T + 2), ("unknown", T)]
    assert split_listed([], state, now=1_790_000_000, future_skew=SKEW).record == []


# --- with the real amoCRM source: the webhook's time is the listing's time -----------------------------

def test_amocrm_deals_delivered_by_their_webhooks_are_left_alone_and_a_same_second_edit_goes(
        metrika_sandbox, amocrm):
    """amoCRM's webhooks carry the lead's `updated_at`, the very time its listing gives: every delivered
    lead is an equal time, so this is the comparison's everyday case, on the source's own CRM read."""
    import time

    from chalicelib.crm.amocrm.source import AmoCrmSource
    from tests.core import Clock
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    element = amocrm.add_catalog_element(4521, "Чайник", 2490)["id"]
    people = [amocrm.create_contact(f"Клиент {n}", phones=[f"+7 916 {n:07d}"], notify=False)["id"] for n in range(5)]
    leads = [amocrm.create_lead(f"Сделка {n}", 7001, 1001, price=1000 + n, contacts=[people[n % 5]],
                                products=[(element, 1)], client_id=str(1714000000000000000 + n))["id"] for n in range(10)]
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["amocrm"] = source = AmoCrmSource(core.store.reserve_slot, backoff=0.01)
    shop = core.integration(connection={"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": "s" * 20})
    core.store.put_status_mapping(shop, [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"}], 0)
    metrika_sandbox.counter(core.counter_id).order_statuses["new"] = {"id": "new", "type": "IN_PROGRESS"}
    for _, body in amocrm.outbox:
        core.ingest.amocrm(shop, body, {"secret": "s" * 20})
    amocrm.outbox.clear()
    core.drain()
    assert len(metrika_sandbox.counter(core.counter_id).orders) == 10
    uploads = data_requests(metrika_sandbox)

    result = core.ingest.reconcile(shop, source, since=0)
    assert (result["found"], result["delivered"], result["queued"]) == (10, 10, 0)
    # An edit within the second of the last change (no webhook): the listing shows the same time.
    with amocrm._lock:
        amocrm.leads[leads[3]]["price"] = 99999
    result = core.ingest.reconcile(shop, source, since=0)
    assert (result["delivered"], result["queued"]) == (9, 1)
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders[str(leads[3])]["revenue"] == 99999
    assert data_requests(metrika_sandbox) == uploads + 1  # that one order, nothing else


def test_bitrix24_deals_delivered_by_their_events_are_left_alone(metrika_sandbox, bitrix):
    """Bitrix24's events carry `ts` (when sent), its listing `DATE_MODIFY` (when changed): the recorded
    time is the same second or later, so a delivered deal is compared or simply older."""
    import time

    from chalicelib.crm.bitrix24.source import Bitrix24Source
    from sandbox.bitrix24 import seed_demo
    from tests.core import Clock
    bitrix.reset()
    portal = seed_demo(bitrix)
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["bitrix24"] = source = Bitrix24Source(lambda scope, interval, now: now, attempts=2, backoff=0.01)
    token = "b24-reconcile-" + "t" * 20
    shop = core.integration(crm="bitrix24", connection={"webhook_url": bitrix.webhook_url, "application_token": token})
    mapping = source.default_mapping(core.store.get_integration(shop))
    core.store.put_status_mapping(shop, mapping, 0)
    metrika_sandbox.counter(core.counter_id).order_statuses.update(
        {e["metrika_status_id"]: {"id": e["metrika_status_id"], "type": e["type"]} for e in mapping})
    bitrix.update_deal(portal["deal_id"], OPPORTUNITY="16990.00")
    for event, entity_id in bitrix.outbox:
        core.ingest.bitrix24(shop, bitrix.event_body(event, entity_id, token))
    bitrix.outbox.clear()
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders[portal["deal_id"]]["revenue"] == 16990
    result = core.ingest.reconcile(shop, source, since=0)
    assert (result["found"], result["delivered"], result["queued"]) == (1, 1, 0)
    bitrix.update_deal(portal["deal_id"], OPPORTUNITY="17990.00", notify=False)  # its event lost
    assert core.ingest.reconcile(shop, source, since=0)["queued"] == 1
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).orders[portal["deal_id"]]["revenue"] == 17990
