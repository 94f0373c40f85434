"""Upload economy: CDP requests and bytes per 1,000 CRM events for three bursts (one deal × 1,000
updates; 1,000 deals × one update; a mix), against the naive design's two requests per event.

    python -m bench.upload_economy
"""
from __future__ import annotations

import json
import os
import random

from bench.harness import ADMIN_TOKEN, AMO_SECRET, amocrm_config, environment, table

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def main() -> None:
    with environment() as world:
        import app
        from chalice.test import Client
        from chalicelib.crm.amocrm.source import AmoCrmSource
        from chalicelib.worker import Worker
        from chalicelib.settings import get_settings
        from sandbox.worker import WorkerLoop
        amocrm, metrika = world["amocrm"], world["metrika"]
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        leads = [amocrm.create_lead(f"Сделка {i}", 7001, 1001, price=i, client_id=f"17900000001{i:08d}", notify=False)
                 for i in range(1000)]
        rows = []
        with Client(app.app, stage_name="dev") as client:
            os.environ.update(world["env"])
            client.http.put("/integrations/eco", headers=headers, body=json.dumps(amocrm_config(amocrm)))
            client.http.post("/integrations/eco/status-mapping/defaults", headers=headers)
            store = app.get_store()
            worker = Worker(store, app.get_queue(), app.get_metrika, {"amocrm": AmoCrmSource(store.reserve_slot)},
                            row_limit=get_settings().upload_row_limit)
            loop = WorkerLoop(lambda event, _: worker.handle(r["body"] for r in event["Records"]),
                              get_settings().events_queue, batch_size=1000, batching_window=0.5, wait_seconds=0)
            rng = random.Random(3)
            bursts = {
                "one deal × 1,000 updates": [leads[0]] * 1000,
                "1,000 deals × one update": leads,
                "mix: 100 deals, 1,000 updates": [rng.choice(leads[:100]) for _ in range(1000)],
            }
            for name, targets in bursts.items():
                metrika.requests.clear()
                before_bytes = metrika.bytes_received
                for lead in targets:
                    amocrm.update_lead(lead["id"], price=lead["price"] + 1, notify=False)
                    body = amocrm.webhook_body("leads", "update", amocrm._lead_form(lead))
                    assert client.http.post(f"/webhooks/amocrm/eco?secret={AMO_SECRET}", headers=FORM,
                                            body=body).status_code == 200
                loop.drain()
                cdp = [r for r in metrika.requests if "/data/" in r["path"]]
                sent = metrika.bytes_received - before_bytes
                rows.append([name, len(cdp), f"{sent:,} B", 2000, f"{2000 / max(1, len(cdp)):.0f}× fewer"])
        table("Upload economy per 1,000 CRM events (row limit 1,000)",
              ["burst", "CDP requests", "bytes sent", "naive requests", "ratio"], rows)


if __name__ == "__main__":
    main()
