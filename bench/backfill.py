"""History import throughput against the CRM-rate-limit floor.

The floor is the time the CRM's own limit needs for the requests the import made (amoCRM 7/s per token,
Bitrix24 2/s per portal); the ratio says how much the rest (DynamoDB state, Metrika uploads) adds.

    python -m bench.backfill     (the issue's size, 5,000 deals and 3,000 contacts per CRM: about 3 minutes)
"""
from __future__ import annotations

import argparse
import json
import time
import uuid

from bench.harness import environment, table

LIMITS = {"amocrm": 7.0, "bitrix24": 2.0}


def run(crm: str, stack: dict, deals: int, contacts: int) -> list:
    import os

    import app
    from chalice.test import Client

    from chalicelib.settings import get_settings
    from tests.conftest import ADMIN_TOKEN as TEST_ADMIN_TOKEN
    os.environ["ADMIN_TOKEN"] = TEST_ADMIN_TOKEN  # configure() from the tests sends the tests' token
    get_settings.cache_clear()

    from sandbox.worker import WorkerLoop
    from tests.test_backfill import configure, seed_amocrm, seed_bitrix
    sandbox = stack["amocrm" if crm == "amocrm" else "bitrix24"]
    if crm == "bitrix24":
        sandbox.bucket_size = 50  # the real bucket, so the floor is honest
    integration_id = f"bench-bf-{crm}-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}", "Content-Type": "application/json"}
    app._SOURCES.clear()
    with Client(app.app, stage_name="dev") as client:
        seed = seed_amocrm if crm == "amocrm" else seed_bitrix
        seed(sandbox, deals=0, contacts=0)
        configure(client, integration_id, crm, sandbox, 9393 if crm == "amocrm" else 9494)
        seed(sandbox, deals=deals, contacts=contacts)
        worker = WorkerLoop(app.on_events_message, app.get_settings().events_queue, wait_seconds=0)
        started = time.monotonic()
        client.http.post(f"/integrations/{integration_id}/backfill", headers=headers, body=json.dumps({"since": 0}))
        while True:
            job = client.http.get(f"/integrations/{integration_id}/backfill", headers=headers).json_body["backfill"]
            if job["state"] != "running":
                break
            worker.run_once()
        elapsed = time.monotonic() - started
    floor = job["crm_requests"] / LIMITS[crm]
    entities = job["counts"]["read"]
    return [crm, f"{deals}/{contacts}", job["state"], job["crm_requests"], job["metrika_requests"],
            f"{elapsed:.1f} s", f"{floor:.1f} s", f"{elapsed / floor:.1f}x", f"{entities / elapsed:.0f}/s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deals", type=int, default=5000)
    parser.add_argument("--contacts", type=int, default=3000)
    args = parser.parse_args()
    with environment() as stack:
        rows = [run(crm, stack, args.deals, args.contacts) for crm in ("amocrm", "bitrix24")]
    table("History import vs the CRM rate-limit floor",
          ["CRM", "deals/contacts", "state", "CRM requests", "Metrika requests", "elapsed", "CRM floor",
           "ratio", "entities"], rows)


if __name__ == "__main__":
    main()
