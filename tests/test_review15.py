"""Review of issue 15 (fan-out, threads, the governor's gate): defects found, each shown by a test."""
from __future__ import annotations

from chalicelib.crm import ORDER, EntityRef
from chalicelib.metrika.governor import quota_key
from tests.core import METRIKA_TOKEN, Core, deal_rows


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
