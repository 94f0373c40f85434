"""Fault burst: 20 new deals webhooked at once while Metrika answers 30 % of data requests with
503 or 429 (15 % each), against the same burst with no faults, in one run. The worker takes batches
of 2 messages (`--batch`), so the burst makes about 20 upload requests and the faults land on many of
them (in one batch of 20 the whole burst is two requests, and most runs would see no fault at all).
Settled = every order of the 20 deals in the Metrika sandbox. Real parts: the app's webhook route
and SQS handler (`app.py`), moto_server, the amoCRM and Metrika sandboxes; retry delays are real SQS
delays, so the time includes the backoff the worker chose. "contact rows uploaded" counts every
contact row Metrika received (20 means none was sent twice).

Drives only the app's public handlers, so the same script measures older revisions too.

    python -m bench.fault_burst [--runs 10] [--deals 20] [--batch 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench.harness import ADMIN_TOKEN, AMO_SECRET, amocrm_config, environment, table

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SETTLE_LIMIT = 600.0


def burst(client, world, loop, integration_id: str, counter_id: int, deals: int, faults: dict) -> dict:
    amocrm, metrika = world["amocrm"], world["metrika"]
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    config = {**amocrm_config(amocrm), "counter_id": counter_id}
    assert client.http.put(f"/integrations/{integration_id}", headers=headers, body=json.dumps(config)).status_code == 200
    assert client.http.post(f"/integrations/{integration_id}/status-mapping/defaults", headers=headers).status_code == 200
    leads = []
    for i in range(deals):
        contact = amocrm.create_contact(f"Клиент {counter_id}-{i}", phones=[f"+7 916 {counter_id % 1000:03d}{i:04d}"],
                                        notify=False)
        leads.append(amocrm.create_lead(f"Сделка {i}", 7001, 142, price=1000 + i, contacts=[contact["id"]],
                                        client_id=f"17900{counter_id}{i:09d}", notify=False))
    metrika.set_faults(**faults)
    before = len(metrika.requests)
    started = time.monotonic()
    pairs = []
    for index, lead in enumerate(leads):
        pairs.append(amocrm.webhook_body("leads", "add", amocrm._lead_form(lead)))
    for body in pairs:
        assert client.http.post(f"/webhooks/amocrm/{integration_id}?secret={AMO_SECRET}", headers=FORM,
                                body=body).status_code == 200
    counter = metrika.counter(counter_id)
    wanted = {str(lead["id"]) for lead in leads}
    while time.monotonic() - started < SETTLE_LIMIT:
        loop.run_once()
        if wanted <= set(counter.orders):
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    metrika.set_faults()
    requests = metrika.requests[before:]
    data = [r for r in requests if "/data/" in r["path"]]
    contacts = sum(n for k, n in counter.times_uploaded.items() if k.startswith("contacts:"))
    return {"seconds": elapsed, "settled": wanted <= set(counter.orders), "requests": len(data),
            "failed": sum(1 for r in data if r["status"] >= 400), "contact_rows": contacts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--deals", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    with environment() as world:
        import app
        from chalice.test import Client
        from chalicelib.settings import get_settings
        from sandbox.worker import WorkerLoop
        with Client(app.app, stage_name="dev") as client:
            os.environ.update(world["env"])
            loop = WorkerLoop(app.on_events_message, get_settings().events_queue, batch_size=args.batch,
                              batching_window=0.2, wait_seconds=0)
            results: dict[str, list[dict]] = {"no faults": [], "30 % 503/429": []}
            for run in range(args.runs):
                for name, faults in (("no faults", {}), ("30 % 503/429", {"error_503": 0.15, "error_429": 0.15,
                                                                           "seed": 11 + run})):
                    counter_id = 20000 + 10 * run + len(results[name]) + (5 if faults else 0)
                    results[name].append(burst(client, world, loop, f"burst-{counter_id}", counter_id, args.deals,
                                               faults))
        floor = statistics.median(r["seconds"] for r in results["no faults"])
        rows = []
        for name, runs in results.items():
            median = statistics.median(r["seconds"] for r in runs)
            rows.append([name, f"{median:.1f} s", f"{max(r['seconds'] for r in runs):.1f} s",
                         all(r["settled"] for r in runs), f"{statistics.median(r['requests'] for r in runs):.0f}",
                         f"{statistics.median(r['failed'] for r in runs):.0f}",
                         f"{statistics.median(r['contact_rows'] for r in runs):.0f}", f"{median / floor:.1f}×"])
        table(f"Fault burst: {args.deals} new deals, worker batches of {args.batch}, median of {args.runs} runs "
              "(target: settled in < 30 s)",
              ["Metrika", "settled p50", "worst", "all settled", "data requests", "of them refused",
               "contact rows uploaded", "ratio to no faults"], rows)


if __name__ == "__main__":
    main()
