"""Convergence and economy on the in-memory core (store, queue, clock) with the real amoCRM source and
the amoCRM and Metrika sandboxes over loopback HTTP: whatever order and however often webhooks come,
Metrika ends up holding what the CRM holds, in a few requests, never more than three in flight."""
from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.crm.amocrm.source import AmoCrmSource
from chalicelib.ingest import Ingest
from chalicelib.metrika.client import MetrikaClient
from chalicelib.metrika.governor import QuotaGovernor
from chalicelib.queue import MemoryQueue
from chalicelib.store.memory import MemoryStore
from chalicelib.worker import Worker

SECRET = "convergence-secret-0123456789"
COUNTER = 8383
STAGES = [1001, 1002, 142, 143]
MAPPING = [{"crm_status": f"7001:{s}", "metrika_status_id": {142: "won", 143: "lost"}.get(s, f"amo_7001_{s}"),
            "type": {142: "PAID", 143: "CANCELLED"}.get(s, "IN_PROGRESS")} for s in STAGES]


class Live:
    """The live path in memory, on real time (the governor really waits for slots)."""

    def __init__(self, amocrm, metrika_sandbox, reserve_slot=None):
        self.store, self.queue = MemoryStore(), MemoryQueue()
        source = AmoCrmSource(reserve_slot or self.store.reserve_slot, backoff=0.01)
        self.ingest = Ingest(self.store, self.queue, max_body_bytes=1 << 20)
        self.worker = Worker(self.store, self.queue, self.metrika_for, {"amocrm": source}, retry_base=0)
        self.metrika_url = metrika_sandbox.url
        self.store.put_integration("shop", {
            "crm": "amocrm", "counter_id": COUNTER, "metrika_token": "y0_convergence", "timezone": "Europe/Moscow",
            "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": SECRET}})
        self.store.put_status_mapping("shop", MAPPING, 0)
        metrika_sandbox.counter(COUNTER).order_statuses.update(
            {e["metrika_status_id"]: {"id": e["metrika_status_id"], "type": e["type"]} for e in MAPPING})

    def metrika_for(self, integration):
        governor = QuotaGovernor(self.store, integration["metrika_token"])
        return MetrikaClient(integration["metrika_token"], self.metrika_url, governor=governor)

    def post(self, body):
        return self.ingest.amocrm("shop", body, {"secret": SECRET})

    def drain(self):
        while True:
            bodies = self.queue.receive(1000)
            if not bodies:
                if not len(self.queue):
                    return
                time.sleep(0.05)  # a retry waits out its (zero-based) backoff
                continue
            self.worker.handle(bodies)


def expected_order(amocrm, lead_id):
    """What Metrika must hold for the lead as amoCRM holds it now."""
    lead = amocrm.leads[lead_id]
    status = {142: "won", 143: "lost"}.get(lead["status_id"], f"amo_7001_{lead['status_id']}")
    return status, lead["price"]


@pytest.fixture(scope="module")
def unthrottled(amocrm):
    """The interleavings are about ordering, not rate limits (test_amocrm_e2e covers those): lift the
    sandbox's 7/s so 200 examples take seconds."""
    saved, amocrm.rate_limit = amocrm.rate_limit, 10**6
    yield
    amocrm.rate_limit = saved


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.lists(st.tuples(st.sampled_from(STAGES), st.integers(0, 50_000)), min_size=1, max_size=5),
       order=st.randoms(use_true_random=False), repeats=st.integers(1, 3), drains=st.integers(0, 3))
def test_random_interleavings_converge_on_the_crm_state(amocrm, metrika_sandbox, unthrottled, changes, order,
                                                        repeats, drains):
    live = _example_live(amocrm, metrika_sandbox)
    lead = amocrm.create_lead("Сделка", 7001, 1001, price=100, client_id="1790000000123456789", notify=False)
    amocrm.outbox.clear()
    for stage, price in changes:
        amocrm.update_lead(lead["id"], status_id=stage, price=price)
    bodies = [body for _, body in amocrm.outbox] * repeats  # duplicates…
    amocrm.outbox.clear()
    order.shuffle(bodies)  # …out of order
    cut_points = sorted(order.sample(range(len(bodies) + 1), min(drains, len(bodies) + 1)))
    for index, body in enumerate(bodies):
        if index in cut_points:
            live.drain()  # the worker runs while stale deliveries are still arriving
        live.post(body)
    live.drain()
    stored = metrika_sandbox.counter(COUNTER).orders[str(lead["id"])]
    assert (stored["order_status"], stored.get("revenue", 0)) == expected_order(amocrm, lead["id"])


_LIVE = {}


def _example_live(amocrm, metrika_sandbox):
    """One live path for all examples (the sandboxes are module- and session-wide too)."""
    if "live" not in _LIVE:
        amocrm.reset()
        amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
        _LIVE["live"] = Live(amocrm, metrika_sandbox, reserve_slot=lambda scope, interval, now: now)
    return _LIVE["live"]


def test_burst_of_2000_webhooks_over_500_deals_is_cheap(amocrm, metrika_sandbox):
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
    live = Live(amocrm, metrika_sandbox)
    leads = [amocrm.create_lead(f"Лид {i}", 7001, 1001, price=i, client_id=f"17800000001234{i:05d}", notify=False)
             for i in range(500)]
    bodies = []
    for round_ in range(4):
        for lead in leads:
            amocrm.update_lead(lead["id"], price=lead["price"] + 1, notify=False)
            bodies.append(amocrm.webhook_body("leads", "update", amocrm._lead_form(lead)))
    assert len(bodies) == 2000
    assert sum(live.post(body)["queued"] for body in bodies) == 500  # one message per deal
    metrika_sandbox.set_faults(slow=1.0, slow_seconds=0.2)  # keep requests in flight long enough to overlap

    def invocation():  # three concurrent Lambda invocations (a batch of up to 1,000 messages each)
        while bodies := live.queue.receive(1000):
            live.worker.handle(bodies)

    threads = [threading.Thread(target=invocation) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    live.drain()  # whatever a throttled invocation re-queued
    metrika_sandbox.set_faults()
    cdp_requests = [r for r in metrika_sandbox.requests if "/data/" in r["path"]]
    row_limit = 1000
    assert len(cdp_requests) <= 2 * -(-500 // row_limit) + 5, len(cdp_requests)
    assert metrika_sandbox.max_in_flight <= 3
    stored = metrika_sandbox.counter(COUNTER).orders
    assert all(stored[str(lead["id"])]["revenue"] == amocrm.leads[lead["id"]]["price"] for lead in leads)
