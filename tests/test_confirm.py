"""Confirming uploads against Metrika's `last_uploadings` (issue 13, item 1): a FAILED upload's entities
are sent again, crash-safe; the listing is paged back to the oldest upload waiting; uploads Metrika
never lists are reported after 6 h. The in-memory core with a fake clock; Metrika is the sandbox
over loopback HTTP (which can report an upload FAILED)."""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from chalicelib.crm import ORDER, EntityRef
from chalicelib.errors import ApiError, Transient, Unavailable
from chalicelib.operations import (GIVE_UP_AFTER, UNCONFIRMED_AFTER, confirm_or_answer, confirm_uploads,
                                   integration_status, listing_time, next_offset)
from chalicelib.store import CLAIM_GRACE_SECONDS
from tests.core import Core, deal_rows

MOSCOW = ZoneInfo("Europe/Moscow")


@pytest.fixture
def core(metrika_sandbox):
    return Core(metrika_sandbox.url)


def confirm(core, shop, **options):
    integration = core.store.get_integration(shop)
    return confirm_uploads(core.store, core.metrika_for(integration), shop, integration,
                           requeue=core.ingest.requeue, now=options.pop("now", core.clock()), **options)


def two_deals_delivered(core):
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5"), (ORDER, "6"): deal_rows("6", contact="12")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add"), EntityRef(ORDER, "6", 1789990000, "add")],
                       origin="amocrm")
    core.drain()
    uploads = {u["kind"]: u["uploading_id"] for u in core.store.uploads(shop)}
    return shop, uploads


def at(text: str) -> float:
    """Unix seconds of a counter-local (Moscow) time."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=MOSCOW).timestamp()


# --- a FAILED upload is sent again ---------------------------------------------------------------------

def test_each_upload_records_the_entities_it_carried(core):
    shop, uploads = two_deals_delivered(core)
    assert core.store.upload_entities(shop, uploads["orders"]) == [(ORDER, "5"), (ORDER, "6")]
    # the deals' customers travelled in the contacts upload on the deals' behalf
    assert core.store.upload_entities(shop, uploads["contacts"]) == [(ORDER, "5"), (ORDER, "6")]


def test_a_failed_upload_is_sent_again_and_counted(core, metrika_sandbox):
    shop, uploads = two_deals_delivered(core)
    metrika_sandbox.fail_uploading(uploads["orders"])
    result = confirm(core, shop)
    assert {k: result[k] for k in ("checked", "passed", "failed", "resent")} == \
        {"checked": 2, "passed": 1, "failed": 1, "resent": 2}
    state = core.store.get_entity(shop, ORDER, "5")
    assert state["dirty"] is True and "content_hash" not in state and state["row_hashes"] == {}
    assert state["last_order"]  # a deletion before the re-send can still be reported
    assert len(core.queue) == 2  # a message per deal
    status = integration_status(core.store, shop, requests_today=None, now=core.clock())
    assert status["uploads"] == {"SENT": 0, "PASSED": 1, "FAILED": 1, "UNCONFIRMED": 0}
    assert status["resent_after_failed_uploads"] == 2 and status["backlog"] == 2
    assert core.store.upload_entities(shop, uploads["orders"]) == []  # confirmed: the list is dropped
    core.drain()
    counter = metrika_sandbox.counter(core.counter_id)
    assert counter.times_uploaded["orders:5"] == 2 and counter.times_uploaded["orders:6"] == 2
    again = confirm(core, shop)
    assert {k: again[k] for k in ("checked", "passed", "failed")} == {"checked": 2, "passed": 2, "failed": 0}
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is False


def test_a_large_failed_upload_is_requeued_whole_and_every_deal_goes_again(core, metrika_sandbox):
    """An upload carries up to 1,000 entities: they are marked in parallel and requeued through the inbox
    (one write, one message), so a confirmation run is not entity-by-entity writes past its time limit."""
    shop = core.integration()
    deals = [str(500 + n) for n in range(40)]
    core.source.rows = {(ORDER, d): deal_rows(d, contact=str(9000 + n)) for n, d in enumerate(deals)}
    core.ingest.record(shop, [EntityRef(ORDER, d, 1789990000, "add") for d in deals], origin="reconcile")
    core.drain()
    orders_upload = next(u["uploading_id"] for u in core.store.uploads(shop) if u["kind"] == "orders")
    metrika_sandbox.fail_uploading(orders_upload)
    assert confirm(core, shop)["resent"] == 40
    assert len(core.queue) == 1  # one inbox message, not 40 entity messages
    assert all(core.store.get_entity(shop, ORDER, d)["dirty"] for d in deals)
    core.drain()
    counter = metrika_sandbox.counter(core.counter_id)
    assert all(counter.times_uploaded[f"orders:{d}"] == 2 for d in deals)
    assert not any(core.store.get_entity(shop, ORDER, d)["dirty"] for d in deals)


def test_a_count_other_than_sent_is_a_failure_too(core, metrika_sandbox):
    shop, uploads = two_deals_delivered(core)
    for uploading in metrika_sandbox.counter(core.counter_id).uploadings:
        if uploading["uploading_id"] == uploads["orders"]:
            uploading["elements_count"] = 1  # two were sent
    assert confirm(core, shop)["failed"] == 1
    assert core.store.get_entity(shop, ORDER, "6")["dirty"] is True


def test_an_entity_in_two_failed_uploads_is_queued_once(core, metrika_sandbox):
    shop, uploads = two_deals_delivered(core)
    for uploading_id in uploads.values():
        metrika_sandbox.fail_uploading(uploading_id)
    result = confirm(core, shop)
    assert result["failed"] == 2 and result["resent"] == 2
    assert sorted(u["resent"] for u in core.store.uploads(shop)) == [2, 2]
    assert len(core.queue) == 2  # one message per deal, though each was in both uploads
    core.drain()
    counter = metrika_sandbox.counter(core.counter_id)
    assert counter.times_uploaded["orders:5"] == 2 and counter.times_uploaded["contacts:11"] == 2


def test_an_entity_without_state_any_more_is_skipped(core, metrika_sandbox):
    shop, uploads = two_deals_delivered(core)
    core.store._entities[shop].pop((ORDER, "6"))  # gone meanwhile (its state deleted)
    metrika_sandbox.fail_uploading(uploads["orders"])
    assert confirm(core, shop)["resent"] == 1
    assert core.store.get_entity(shop, ORDER, "6") is None  # not created by the re-send


def test_an_entity_changed_after_the_failed_upload_is_sent_as_it_is_now(core, metrika_sandbox):
    """The re-send re-reads the CRM: a deal changed after the failed upload (delivered again already,
    or changed and still on its way) ends in Metrika as the CRM has it now, never as the failed upload
    carried it."""
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5", revenue=100), (ORDER, "6"): deal_rows("6", revenue=100)}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add"), EntityRef(ORDER, "6", 1789990000, "add")],
                       origin="amocrm")
    core.drain()
    failed = next(u["uploading_id"] for u in core.store.uploads(shop) if u["kind"] == "orders")
    # deal 5 changed and went up again (its upload passes); deal 6 changed, its webhook not yet worked on
    core.source.rows[(ORDER, "5")] = deal_rows("5", revenue=500)
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990100, "update")], origin="amocrm")
    core.drain()
    core.source.rows[(ORDER, "6")] = deal_rows("6", revenue=600)
    core.ingest.record(shop, [EntityRef(ORDER, "6", 1789990100, "update")], origin="amocrm")
    metrika_sandbox.fail_uploading(failed)
    result = confirm(core, shop)
    assert result["failed"] == 1 and result["resent"] == 2
    core.drain()
    counter = metrika_sandbox.counter(core.counter_id)
    assert counter.orders["5"]["revenue"] == 500 and counter.orders["6"]["revenue"] == 600
    assert not any(core.store.get_entity(shop, ORDER, d)["dirty"] for d in ("5", "6"))
    assert core.store.get_entity(shop, ORDER, "6")["event_time"] == 1789990100  # the newer event kept


def test_an_upload_listed_twice_or_confirmed_by_two_runs_is_failed_once(core, metrika_sandbox):
    """The listing names one upload twice (a page boundary repeated), and the scheduled job and
    POST …/confirm run side by side: the upload ends FAILED once, each deal goes up again."""
    shop, uploads = two_deals_delivered(core)
    metrika_sandbox.fail_uploading(uploads["orders"])
    counter = metrika_sandbox.counter(core.counter_id)
    counter.uploadings.append(dict(next(u for u in counter.uploadings if u["uploading_id"] == uploads["orders"])))
    first, second = confirm(core, shop), confirm(core, shop)
    assert (first["failed"], second["checked"]) == (1, 0)
    integration = core.store.get_integration(shop)
    core.store.record_upload(shop, "u-both", kind="orders", rows=1, entities=[(ORDER, "5")])
    metrika_sandbox.add_uploading(core.counter_id, "2099-01-01 00:00:00", uploading_id="u-both", status="FAILED")
    from tests.core import at_once
    results, errors = at_once(lambda: confirm_uploads(core.store, core.metrika_for(integration), shop, integration,
                                                      requeue=core.ingest.requeue, now=core.clock()), 2, timeout=30)
    assert errors == [] and sum(r["failed"] for r in results) >= 1
    final = [u for u in core.store.uploads(shop) if u["uploading_id"] in (uploads["orders"], "u-both")]
    assert sorted((u["uploading_id"], u["status"]) for u in final) == sorted(
        [(uploads["orders"], "FAILED"), ("u-both", "FAILED")])
    core.drain()
    assert counter.times_uploaded["orders:5"] >= 2 and counter.times_uploaded["orders:6"] == 2
    assert not any(core.store.get_entity(shop, ORDER, d)["dirty"] for d in ("5", "6"))


# --- crashes and races -------------------------------------------------------------------------------

def test_a_crash_before_the_requeue_loses_no_resend(core, metrika_sandbox):
    shop, uploads = two_deals_delivered(core)
    metrika_sandbox.fail_uploading(uploads["orders"])
    integration = core.store.get_integration(shop)

    def queue_down(integration_id, refs):
        raise Unavailable("queue", "down")
    with pytest.raises(Unavailable):
        confirm_uploads(core.store, core.metrika_for(integration), shop, integration, requeue=queue_down,
                        now=core.clock())
    assert {u["uploading_id"]: u["status"] for u in core.store.uploads(shop)}[uploads["orders"]] == "SENT"
    # marked and owed, with no live lease: the stuck sweep finds them (once the worker's claim is old) …
    core.clock.advance(CLAIM_GRACE_SECONDS + 1)
    assert {e["crm_id"] for e in core.store.stuck_entities(shop, now=core.clock())} == {"5", "6"}
    # … and so does the next confirmation, which finishes the job
    assert confirm(core, shop)["resent"] == 2
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).times_uploaded["orders:5"] == 2


def test_a_crash_before_the_upload_is_marked_repeats_and_sends_once(core, metrika_sandbox, monkeypatch):
    shop, uploads = two_deals_delivered(core)
    metrika_sandbox.fail_uploading(uploads["orders"])
    real = core.store.confirm_upload

    def dies_on_failed(integration_id, uploading_id, status, *args, **kwargs):
        if status == "FAILED":
            raise RuntimeError("the process died here")
        return real(integration_id, uploading_id, status, *args, **kwargs)
    monkeypatch.setattr(core.store, "confirm_upload", dies_on_failed)
    with pytest.raises(RuntimeError):
        confirm(core, shop)
    monkeypatch.setattr(core.store, "confirm_upload", real)
    assert confirm(core, shop)["failed"] == 1  # still SENT, so found FAILED again
    assert len(core.queue) == 2  # the first run's messages cover the second run's requeue
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).times_uploaded["orders:5"] == 2


def test_a_delivery_that_read_the_old_state_cannot_close_the_entity(core, metrika_sandbox):
    """A worker claimed deal 5 (a webhook) and read its row hashes before the confirmation forgot
    them: its closing write must fail, or the failed row would stay marked as held."""
    shop, uploads = two_deals_delivered(core)
    metrika_sandbox.fail_uploading(uploads["orders"])
    stale = core.store.claim(shop, ORDER, "5")
    confirm(core, shop)
    assert core.store.mark_clean(shop, ORDER, "5", event_time=stale["event_time"], content_hash=stale["content_hash"],
                                 row_hashes=stale["row_hashes"], uploading_id=None) is False
    assert core.store.mark_failed(shop, ORDER, "5", event_time=stale["event_time"], error={"m": "x"}) is False
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).times_uploaded["orders:5"] == 2


# --- paging last_uploadings, and uploads never listed ---------------------------------------------------

def recorded(core, shop, uploading_id, when):
    core.clock.now = at(when)
    core.store.record_upload(shop, uploading_id, kind="orders", rows=1)


def test_the_listing_is_paged_back_to_the_oldest_waiting_upload(core, metrika_sandbox):
    """Page size 4: the page ends inside a second shared by four uploads. Paging with that second as
    the offset ("strictly before") would skip `u-same`; the next offset is one second later instead,
    and a page that makes no progress steps past the second."""
    shop = core.integration()
    counter = core.counter_id
    metrika_sandbox.add_uploading(counter, "2026-09-21 10:00:00", uploading_id="u-old")
    for n in range(3):
        metrika_sandbox.add_uploading(counter, "2026-09-21 10:00:10")
    metrika_sandbox.add_uploading(counter, "2026-09-21 10:00:50", uploading_id="u-same")
    for n in range(3):
        metrika_sandbox.add_uploading(counter, "2026-09-21 10:00:50")
    metrika_sandbox.add_uploading(counter, "2026-09-21 10:01:40", uploading_id="u-new", status="FAILED")
    for uploading_id, when in (("u-old", "2026-09-21 10:00:00"), ("u-same", "2026-09-21 10:00:50"),
                               ("u-new", "2026-09-21 10:01:40")):
        recorded(core, shop, uploading_id, when)
    metrika_sandbox.requests.clear()
    result = confirm(core, shop, page_size=4)
    assert {k: result[k] for k in ("checked", "passed", "failed")} == {"checked": 3, "passed": 2, "failed": 1}
    offsets = [r["query"].get("datetime_offset") for r in metrika_sandbox.requests if "last_uploadings" in r["path"]]
    assert offsets == [None, "2026-09-21 10:00:51", "2026-09-21 10:00:50"]
    assert result["pages"] == 3


def test_paging_stops_once_everything_waiting_is_found(core, metrika_sandbox):
    shop = core.integration()
    for n in range(10):
        metrika_sandbox.add_uploading(core.counter_id, f"2026-09-21 09:{n:02d}:00")
    metrika_sandbox.add_uploading(core.counter_id, "2026-09-21 10:00:00", uploading_id="u1")
    recorded(core, shop, "u1", "2026-09-21 10:00:00")
    assert confirm(core, shop, page_size=3)["pages"] == 1
    assert confirm(core, shop, page_size=3)["pages"] == 0  # nothing waits: Metrika is not asked


def test_an_upload_never_listed_is_reported_after_6_hours(core, metrika_sandbox):
    shop = core.integration()
    for day in (20, 21):  # the listing reaches a day past the upload's time
        for n in range(3):
            metrika_sandbox.add_uploading(core.counter_id, f"2026-09-{day} 0{n}:00:00")
    recorded(core, shop, "u-lost", "2026-09-21 10:00:00")
    sent = at("2026-09-21 10:00:00")
    early = confirm(core, shop, now=sent + 3600)
    assert early["unconfirmed"] == 0 and early["unconfirmed_over_6h"] == 0
    late = confirm(core, shop, now=sent + UNCONFIRMED_AFTER + 1)
    assert late["unconfirmed"] == 1 and late["unconfirmed_over_6h"] == 1 and late["oldest_unconfirmed"] == int(sent)
    status = integration_status(core.store, shop, requests_today=None, now=sent + UNCONFIRMED_AFTER + 1)
    assert status["uploads"]["UNCONFIRMED"] == 1 and status["unconfirmed_over_6h"] == 1
    assert confirm(core, shop, now=sent + UNCONFIRMED_AFTER + 2)["checked"] == 0  # no longer looked for


def test_an_upload_beyond_the_pages_read_waits_then_is_given_up(core, metrika_sandbox):
    """The listing cannot be read back to the upload's time (one page allowed): past 6 h it is reported
    but still looked for; after two days it is given up on."""
    shop = core.integration()
    for n in range(5):
        metrika_sandbox.add_uploading(core.counter_id, f"2026-09-23 0{n}:00:00")
    recorded(core, shop, "u-lost", "2026-09-21 10:00:00")
    sent = at("2026-09-21 10:00:00")
    late = confirm(core, shop, now=sent + UNCONFIRMED_AFTER + 1, page_size=3, max_pages=1)
    assert late["unconfirmed"] == 0 and late["unconfirmed_over_6h"] == 1
    assert core.store.uploads(shop)[0]["status"] == "SENT"
    gone = confirm(core, shop, now=sent + GIVE_UP_AFTER + 1, page_size=3, max_pages=1)
    assert gone["unconfirmed"] == 1 and core.store.uploads(shop)[0]["status"] == "UNCONFIRMED"


def test_a_metrika_failure_writes_nothing_and_the_route_says_so(core):
    shop, uploads = two_deals_delivered(core)

    class Down:
        def last_uploadings(self, *args, **kwargs):
            raise Transient("HTTP 503", source="metrika", status=503)
    with pytest.raises(Transient):
        confirm_uploads(core.store, Down(), shop, core.store.get_integration(shop), requeue=core.ingest.requeue)
    with pytest.raises(ApiError) as answered:
        confirm_or_answer(core.store, Down(), shop, core.store.get_integration(shop), requeue=core.ingest.requeue)
    assert answered.value.status == 502 and answered.value.error == "metrika_unavailable"
    assert {u["status"] for u in core.store.uploads(shop)} == {"SENT"}


@pytest.mark.parametrize("value, zone, expected", [
    ("2026-09-21 10:00:00", "Europe/Moscow", "2026-09-21T07:00:00+00:00"),
    ("2026-09-21T07:00:00.000Z", "Europe/Moscow", "2026-09-21T07:00:00+00:00"),
    ("2026-09-21T07:00:00Z", "Asia/Tokyo", "2026-09-21T07:00:00+00:00"),
    ("21.09.2026 10:00", "UTC", None), ("", "UTC", None), (None, "UTC", None), (1790000000, "UTC", None),
    ("2026-09-21 10:00:00", "Mars/Base", None), ("9999-99-99 99:99:99", "UTC", None),
])
def test_listing_times(value, zone, expected):
    parsed = listing_time(value, zone)
    assert (datetime.fromtimestamp(parsed, ZoneInfo("UTC")).isoformat() if parsed is not None else None) == expected


def test_next_offset_is_one_second_later_in_the_same_form():
    assert next_offset("2026-12-31 23:59:59") == "2027-01-01 00:00:00"
    assert next_offset("2026-09-21T07:00:00.000Z") == "2026-09-21T07:00:01.000Z"
    assert next_offset("9999-12-31 23:59:59") is None and next_offset("nonsense") is None


def test_a_listing_of_the_wrong_shape_confirms_nothing_wrongly(core):
    """Whatever Metrika's answer holds, nothing crashes: an entry that is no upload is skipped, and a
    count that is not a whole number is no proof of loading (the upload is sent again)."""
    shop = core.integration()
    for uploading_id in ("u-bool", "u-text", "u-ok"):
        core.store.record_upload(shop, uploading_id, kind="orders", rows=1)

    class Odd:
        def last_uploadings(self, *args, **kwargs):
            return [None, "u-ok", 7, {"uploading_id": ["u-ok"]}, {"uploading_id": {"a": 1}},
                    {"uploading_id": "u-bool", "api_validation_status": "PASSED", "elements_count": True},
                    {"uploading_id": "u-text", "api_validation_status": "PASSED", "elements_count": "1"},
                    {"uploading_id": "u-ok", "api_validation_status": "PASSED", "elements_count": 1, "datetime": 5}]
    result = confirm_uploads(core.store, Odd(), shop, core.store.get_integration(shop), requeue=core.ingest.requeue)
    assert {k: result[k] for k in ("passed", "failed")} == {"passed": 1, "failed": 2}
    assert {u["uploading_id"]: (u["status"], u["elements_count"]) for u in core.store.uploads(shop)} == {
        "u-bool": ("FAILED", 0), "u-text": ("FAILED", 0), "u-ok": ("PASSED", 1)}

    class NotAList:
        def last_uploadings(self, *args, **kwargs):
            return {"uploadings": "nope"}
    core.store.record_upload(shop, "u-later", kind="orders", rows=1)
    assert confirm_uploads(core.store, NotAList(), shop, core.store.get_integration(shop),
                           requeue=core.ingest.requeue)["passed"] == 0
