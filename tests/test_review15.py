"""Review of issue 15 (fan-out, threads, the governor's gate): defects found, each shown by a test."""
from __future__ import annotations

import pytest

from chalicelib.crm import ORDER, EntityRef
from chalicelib.metrika.governor import quota_key
from chalicelib.schedules import fan_out, run_id
from tests.core import METRIKA_TOKEN, Core, deal_rows
from tests.test_fanout import job_core


def _one_deal(core: Core) -> None:
    core.integration("shop")
    core.source.rows[(ORDER, "1")] = deal_rows("1")
    core.ingest.record("shop", [EntityRef(ORDER, "1", int(core.clock.now), "add")], origin="amocrm")


def _other_workers_hold_every_slot(core: Core) -> None:
    key = quota_key(METRIKA_TOKEN)
    for n in range(3):
        assert core.store.acquire_lease(key, 3, f"other-worker-{n}", core.clock.now, 3600) is not None


def test_waiting_out_other_workers_metrika_slots_is_not_a_failed_attempt(metrika_sandbox):
    """80 threads across 10 workers now contend for a token's 3 slots: a group that found them all
    busy for the governor's 30 s did nothing wrong and Metrika refused nothing, so it must not
    spend one of the deal's WORKER_RETRY_LIMIT attempts (as the daily quota and OutOfTime do not)."""
    core = Core(metrika_sandbox.url, threads=1)
    _one_deal(core)
    _other_workers_hold_every_slot(core)
    report = core.worker.handle(core.queue.receive())
    state = core.store.get_entity("shop", ORDER, "1")
    assert report.retried == 1 and state["dirty"]
    assert state.get("attempts", 0) == 0, state.get("last_error")


def test_a_deal_is_never_parked_only_because_the_token_was_busy(metrika_sandbox):
    core = Core(metrika_sandbox.url, threads=1, retry_limit=2)
    _one_deal(core)
    _other_workers_hold_every_slot(core)
    for _ in range(4):  # four busy spells in a row (a backlog on a shared agency token)
        due = core.queue.next_due()
        core.clock.now = max(core.clock.now, due or core.clock.now)
        core.worker.handle(core.queue.receive())
    state = core.store.get_entity("shop", ORDER, "1")
    assert state["dirty"] and not state.get("failed"), state.get("last_error")
    assert len(core.queue) == 1  # still on its way, not parked


@pytest.mark.parametrize("sample_time", [
    "1970-01-01T00:00:00Z",  # the Lambda console's sample "Scheduled Event" (a run by hand)
    "2015-11-11T21:29:54Z",  # chalice.test's generate_cw_event default
])
def test_a_schedule_run_by_hand_with_a_sample_events_old_time_still_runs_the_jobs(metrika_sandbox, sample_time):
    """A run id older than any retry of a real schedule can be (Lambda keeps an async event 6 h at
    most) names no run that could have been covered: it must not be compared with the cursors, or every
    integration reconciled once is skipped and the run silently does nothing."""
    core, source = job_core(metrika_sandbox.url, ["alpha"])
    core.store.put_cursor("alpha", "reconcile", int(core.clock.now) - 600)  # reconciled 10 minutes ago
    fan_out(core.store, core.queue, "reconcile_all", run=run_id(sample_time, now=core.clock.now))
    report = core.worker.handle(core.queue.receive())
    assert (report.jobs, report.jobs_skipped) == (1, 0) and source.listed == {"alpha": 1}


def test_a_run_id_is_the_event_time_back_to_the_oldest_retry_and_now_before_that():
    from chalicelib.schedules import MAX_EVENT_AGE
    now = 1_790_000_000.0
    assert run_id("2026-09-21T10:00:00Z", now=now) == "1789984800"  # 4 h ago: a retry of a real run
    assert run_id("2026-09-21T10:00:00Z", now=1789984800 + MAX_EVENT_AGE) == "1789984800"
    assert run_id("2026-09-21T10:00:00Z", now=1789984800 + MAX_EVENT_AGE + 1) == str(1789984800 + MAX_EVENT_AGE + 1)
    assert run_id("1970-01-01T00:00:00Z", now=now) == "1790000000"


def test_a_job_too_big_for_a_whole_invocation_is_not_run_again_and_again(metrika_sandbox, captured_logs):
    """A reconciliation whose listing outlasts a fresh invocation (a window of days after an outage, at
    Bitrix24's 2 requests a second) is cut short every time. Queued again at once, it would loop from
    batch to batch with no end (its cursor never moves), holding a thread and the CRM account's rate
    that the account's deliveries share, and every schedule would add one more copy. Having had a whole
    invocation, it waits for the next schedule instead (as the walk put it behind the others)."""
    from chalicelib import deadline
    from chalicelib.errors import OutOfTime
    from chalicelib.worker import RESERVE_SECONDS
    core, source = job_core(metrika_sandbox.url, ["alpha"])
    source.fail["alpha"] = OutOfTime("Bitrix24 did not answer within the 1.0 s left", source="bitrix24")
    fan_out(core.store, core.queue, "reconcile_all", run=str(int(core.clock.now)))
    for _ in range(3):
        with deadline.invocation(300, reserve=RESERVE_SECONDS, clock=core.clock):
            report = core.worker.handle(core.queue.receive())
        if not len(core.queue):
            break
    assert source.listed == {"alpha": 1}, "the job went round again"
    assert report.postponed == 0 and len(core.queue) == 0
    assert any('"job_timed_out"' in r.getMessage() for r in captured_logs.records)


def test_two_integrations_on_one_counter_side_by_side_keep_each_others_new_products(metrika_sandbox):
    """Each product sync sends the counter's whole list (read from the store, then its own new ones),
    and records its products only after Metrika took the list. Two integrations of one counter in one
    batch now run at once: each reads the union before the other has recorded its product, so the list
    sent last lacks the other's, and the store says both are known: never sent again."""
    import threading
    core = Core(metrika_sandbox.url, threads=2)
    for number, name in enumerate(("alpha", "bravo"), 1):
        core.integration(name, label=name)
        core.source.rows[(ORDER, str(number))] = deal_rows(str(number), contact=f"c{number}",
                                                           products={f"sku-{name}": 1})
        core.ingest.record(name, [EntityRef(ORDER, str(number), int(core.clock.now), "add")], origin="amocrm")
    both, put = threading.Barrier(2, timeout=3), core.store.put_products

    def recorded_once_both_have_sent(integration_id, products):
        try:
            both.wait()  # both lists are with Metrika before either records its products
        except threading.BrokenBarrierError:
            pass  # serialised: the other sync had not started (what a fix does)
        return put(integration_id, products)
    core.store.put_products = recorded_once_both_have_sent
    core.worker.handle(core.queue.receive())
    assert set(metrika_sandbox.counter(core.counter_id).products) >= {"sku-alpha", "sku-bravo"}


def test_a_busy_token_is_not_polled_again_within_seconds_by_the_same_deal(metrika_sandbox):
    """No attempt counted means no growing backoff: the retry waits at least as long as the wait for a
    slot did, or a saturated token's waiting deals come back every 5 s to poll its lease items."""
    core = Core(metrika_sandbox.url, threads=1)
    _one_deal(core)
    _other_workers_hold_every_slot(core)
    core.worker.handle(core.queue.receive())
    (retry, delay), = core.queue.sent[-1:]
    assert retry == {"integration_id": "shop", "kind": ORDER, "crm_id": "1"} and delay >= 30
