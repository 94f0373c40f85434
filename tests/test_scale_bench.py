"""Issue 15, item 7: the scale benchmark's core (bench/scale.py) at a tiny scale — what it reports must
be true before its figures mean anything: every deal reaches Metrika exactly once, through real HTTP to
the sandboxes (one amoCRM and one Bitrix24 sandbox serving an account per integration), and the counts
it divides by are the ones the code made. No timing is asserted."""
from __future__ import annotations

import pytest

from bench import scale


@pytest.fixture(scope="module")
def boxes():
    with scale.sandboxes() as served:
        yield served


@pytest.mark.parametrize("batch_size", [100, 10])
def test_every_deal_reaches_metrika_exactly_once_and_the_counts_add_up(boxes, batch_size):
    integrations, deals = 20, 2
    total = integrations * deals
    result = scale.run(boxes, integrations, deals, batch_size=batch_size, prefix=f"smoke{batch_size}")
    phases = result.phases
    webhooks, worker = phases["webhooks"], phases["worker"]

    assert (result.delivered_once, result.orders_seen, result.uploaded_more_than_once) == (total, total, 0)
    assert result.pending == 0
    # One webhook per deal, recorded once, one message each; the worker reads the entities without a
    # claim (a first receive) and closes each once.
    assert webhooks.messages == total and webhooks.store["mark_dirty"] == total
    assert webhooks.crm_total() == 0 and webhooks.metrika_total() == 0
    assert worker.store.get("claim", 0) == 0 and worker.store["mark_clean"] == total
    assert worker.batches == -(-total // batch_size)
    # The shared CRM limiter is asked before every CRM request (pacing lifted, the call kept).
    assert worker.crm_total() == worker.store["reserve_slot"] > 0
    assert set(worker.crm) == {"amocrm", "bitrix24"}
    # Deals arrive interleaved: in batches of 100 an integration's two deals share one contacts and one
    # orders upload; in batches of 10 each deal is alone in its batch: two uploads each.
    uploads_per_integration = 2 if batch_size == 100 else 2 * deals
    assert worker.metrika == {"contacts/json": integrations * uploads_per_integration // 2,
                              "orders/json": integrations * uploads_per_integration // 2}
    assert worker.log_bytes > 0 and worker.log_lines > 0

    # The schedules: one message per integration, nothing read per integration in the schedule itself.
    for schedule in ("reconcile_all (schedule)", "confirm_uploads (schedule)"):
        assert phases[schedule].messages == integrations
        assert phases[schedule].store == {"list_integration_ids": 1}
    # Reconciliation lists each account (only its own deals: the sandboxes keep accounts apart) and,
    # every deal delivered, queues nothing; confirmation asks Metrika once per integration.
    assert result.queued_by_reconcile == 0 and phases["reconcile's deliveries (worker)"].batches == 0
    assert phases["reconcile jobs (worker)"].crm_total() >= integrations
    assert phases["reconcile jobs (worker)"].metrika_total() == 0
    assert phases["confirm jobs (worker)"].metrika_total() == integrations
    # Idle, the schedules cost no Metrika request and queue nothing but their jobs.
    for idle in ("reconcile again, nothing changed (fan-out + jobs)", "confirm again, nothing pending (fan-out + jobs)"):
        assert phases[idle].metrika_total() == 0 and phases[idle].messages == integrations
    assert phases["confirm again, nothing pending (fan-out + jobs)"].crm_total() == 0


def test_the_sandboxes_keep_accounts_apart(boxes):
    """A list answers only the calling account's entities; a token or code of no account is refused."""
    import requests
    result = scale.run(boxes, 2, 1, prefix="apart")
    assert result.delivered_once == 2
    amocrm, bitrix = boxes.amocrm, boxes.bitrix
    (token, account), = [(t, a) for t, a in amocrm.accounts.items() if a == "apart-00000"]
    listed = requests.get(amocrm.url + "/api/v4/leads", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert {lead["id"] for lead in listed.json()["_embedded"]["leads"]} == {
        lead_id for lead_id, owner in amocrm.leads.owner.items() if owner == account}
    assert requests.get(amocrm.url + "/api/v4/leads", headers={"Authorization": "Bearer nobody"},
                        timeout=5).status_code == 401
    (code, portal), = [(c, p) for c, p in bitrix.portals.items() if p == "apart-00001"]
    deals = requests.post(bitrix.portal_url(code) + "crm.deal.list.json", json={}, timeout=5).json()["result"]
    assert {d["ID"] for d in deals} == {d for d, owner in bitrix.deals.owner.items() if owner == portal}
    assert requests.post(bitrix.portal_url("nobody") + "crm.deal.list.json", json={}, timeout=5).status_code == 401
