"""Acknowledge time of large webhook bodies: an amoCRM mass action (1, 50 and 250 leads with their
custom fields in one POST), a contact with 2,000 linked leads, and Bitrix24 events (one deal each, as a
portal sends them; one also padded to the form parser's 25,000 fields, which Bitrix24 bodies are parsed
against before authentication, the token being in the body), webhook in → 200 out, in-process
(chalice.test.Client) and over HTTP (chalice local) on the local stack (moto_server DynamoDB + SQS).
Each is given as a ratio to the one-entity webhook measured in the same run, sampled in turn with it.
Target: p99 ≤ 0.5 s for 250 leads, and a ratio that does not grow with the number of entities.

For scale, the same run also times what a large body cost before (every entity written before the
answer) and what it costs the worker now (expanding one batch into entity messages).

    python -m bench.ack_large [--rounds 100]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import requests

from bench.ack_latency import drain
from bench.harness import (AMO_SECRET, ADMIN_TOKEN, B24_TOKEN, amocrm_config, bitrix24_config, chalice_local,
                           environment, ms, percentiles, table)
from tests.test_ack_large import linked_leads_contact_body, mass_action_body, seed_leads

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
IID = "amo-large"
B24 = "b24-large"
BASELINE = "amoCRM, 1 lead (baseline)"


def bodies(amocrm, bitrix, deal_id: str) -> dict[str, tuple[str, bytes, int, tuple[str, str, str] | None]]:
    """name → (path, body, entities, the entity to claim before each sample so that its webhook writes
    AND queues, as if the worker had taken it: the one-entity bodies), the baseline first."""
    from chalicelib.crm.form import MAX_KEYS
    one = seed_leads(amocrm, 1)
    amo, b24 = f"/webhooks/amocrm/{IID}?secret={AMO_SECRET}", f"/webhooks/bitrix24/{B24}"
    out = {BASELINE: (amo, mass_action_body(amocrm, one), 1, (IID, "order", str(one[0]["id"])))}
    for count in (50, 250):
        out[f"amoCRM, {count} leads"] = (amo, mass_action_body(amocrm, seed_leads(amocrm, count)), count, None)
    out["amoCRM, contact with 2,000 linked leads"] = (amo, linked_leads_contact_body(amocrm, 2000), 2001, None)
    event = bitrix.event_body("ONCRMDEALUPDATE", deal_id, B24_TOKEN)
    out["Bitrix24, 1 deal"] = (b24, event, 1, (B24, "order", deal_id))
    padding = b"&p=v" * (MAX_KEYS - event.count(b"&") - 1)
    out["Bitrix24, 1 deal in 25,000 form fields"] = (b24, event + padding, 1, (B24, "order", deal_id))
    return out


def row(name: str, body: bytes, samples: list[float], base: dict) -> list:
    p = percentiles(samples)
    return [name, f"{len(body) / 1024:.0f} KB" if len(body) >= 10 * 1024 else f"{len(body) / 1024:.1f} KB", body.count(b"&") + 1, ms(p["p50"]), ms(p["p99"]),
            f"{p['p50'] / base['p50']:.2f}×", f"{p['p99'] / base['p99']:.2f}×"]


def before_and_worker(store, queue, lead_ids: list[str], runs: int) -> list[list]:
    """The old way (each entity written before the answer: what `record` still does for reconciliation)
    and the worker's expansion of one batch, for 250 leads; each run starts from entities without
    leases, so every write takes one and queues."""
    from chalicelib.crm import ORDER, EntityRef
    from chalicelib.ingest import Ingest, expand_inbox
    ingest = Ingest(store, queue, max_body_bytes=0)
    refs = [EntityRef(ORDER, lead_id, 1_790_000_000, "status") for lead_id in lead_ids]
    before, expansion = [], []
    for i in range(runs):
        for lead_id in lead_ids:
            store.claim(IID, ORDER, lead_id)
        start = time.perf_counter()
        result = ingest.record(IID, [EntityRef(r.kind, r.crm_id, r.event_time + i, r.action) for r in refs],
                               origin="reconcile")
        before.append(time.perf_counter() - start)
        assert result["queued"] == len(lead_ids), result
        for lead_id in lead_ids:
            store.claim(IID, ORDER, lead_id)
        batch = f"bench-{i}"
        store.put_inbox(IID, {batch: [EntityRef(r.kind, r.crm_id, r.event_time + i, r.action) for r in refs]}, now=time.time())
        start = time.perf_counter()
        expand_inbox(store, queue, [(IID, batch)])
        expansion.append(time.perf_counter() - start)
    b, e = percentiles(before), percentiles(expansion)
    return [["250 leads written before the answer (as before)", ms(b["p50"]), ms(max(before))],
            ["the worker expanding the 250-lead batch (now)", ms(e["p50"]), ms(max(expansion))]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--before-runs", type=int, default=3)
    args = parser.parse_args()
    with environment() as world:
        import app
        from chalice.test import Client
        from chalicelib.settings import get_settings
        from chalicelib.crm.amocrm.webhook import parse_amocrm_webhook
        amocrm, bitrix = world["amocrm"], world["bitrix24"]
        cases = bodies(amocrm, bitrix, str(world["seeded"]["bitrix24"]["deal_id"]))
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        rows = []
        with Client(app.app, stage_name="dev") as client:
            os.environ.update(world["env"])
            for iid, config in ((IID, amocrm_config(amocrm)), (B24, bitrix24_config(bitrix))):
                assert client.http.put(f"/integrations/{iid}", headers=headers, body=json.dumps(config)).status_code == 200
            settings = get_settings()
            samples: dict[str, list[float]] = {name: [] for name in cases}
            # All sizes sampled in turn: the emulator's speed drifts over a run (see bench/ack_latency.py).
            for i in range(args.rounds):
                if i % 20 == 0:
                    drain(settings.events_queue)
                for name, (path, body, entities, claim) in cases.items():
                    if claim:  # as if the worker had taken it: the webhook writes AND queues
                        app.get_store().claim(*claim)
                    start = time.perf_counter()
                    response = client.http.post(path, headers=FORM, body=body)
                    samples[name].append(time.perf_counter() - start)
                    assert response.status_code == 200, response.body
                    assert response.json_body["accepted"] == entities, response.json_body
            base = percentiles(samples[BASELINE])
            rows += [row(f"{name}, in-process", cases[name][1], samples[name], base) for name in cases]
            drain(settings.events_queue)
            lead_ids = [r.crm_id for r in parse_amocrm_webhook(cases["amoCRM, 250 leads"][1]).refs]
            scale = before_and_worker(app.get_store(), app.get_queue(), lead_ids, args.before_runs)
            drain(settings.events_queue)
        # Over HTTP: the same app under `chalice local`, bodies on the loopback wire.
        with chalice_local(world["env"]) as base_url:
            session = requests.Session()
            samples = {name: [] for name in cases}
            for i in range(max(10, args.rounds // 2)):
                if i % 20 == 0:
                    drain(settings.events_queue)
                for name, (path, body, entities, claim) in cases.items():
                    if claim:
                        app.get_store().claim(*claim)
                    start = time.perf_counter()
                    response = session.post(base_url + path, data=body, headers=FORM)
                    samples[name].append(time.perf_counter() - start)
                    assert response.status_code == 200, response.text
            base = percentiles(samples[BASELINE])
            rows += [row(f"{name}, chalice local (HTTP)", cases[name][1], samples[name], base) for name in cases]
        drain(settings.events_queue)
        table(f"Acknowledge time of large bodies ({args.rounds} rounds in-process, {max(10, args.rounds // 2)} over "
              f"HTTP; target p99 ≤ 500 ms for 250 leads)",
              ["body", "size", "form fields", "p50", "p99", "p50 / 1 lead", "p99 / 1 lead"], rows)
        table(f"For scale: 250 leads written entity by entity ({args.before_runs} runs)", ["path", "p50", "max"], scale)


if __name__ == "__main__":
    main()
