"""End-to-end latency on the local stack at low load: webhook sent → order stored in the Metrika
sandbox, p50 / p95, one deal at a time. Real processes: `make run`'s stack (worker batching window 1 s).

    python -m bench.e2e_latency [--events 20]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import requests

from bench.harness import ms, percentiles, table
from sandbox.local_stack import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-e2e-secret-0123456789"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "METRIKA_API_URL", "ADMIN_TOKEN"))}
    stack = subprocess.Popen([sys.executable, "-m", "sandbox.local_stack", "--port", str(port)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in stack.stdout], daemon=True).start()
    try:
        while not any("Ctrl-C" in line for line in lines):
            if stack.poll() is not None:
                raise SystemExit("".join(lines))
            time.sleep(0.1)
        words = {line.split()[0]: line.split() for line in lines if line.startswith("  ")}
        api, token = f"http://127.0.0.1:{port}", words["admin"][-1]
        metrika = next(w for w in words["Metrika"] if w.startswith("http"))
        amocrm = next(w for w in words["amoCRM"] if w.startswith("http"))
        headers = {"Authorization": f"Bearer {token}"}
        requests.put(f"{api}/integrations/e2e", headers=headers, timeout=10, json={
            "crm": "amocrm", "counter_id": 5555, "metrika_token": "y0_e2e", "timezone": "Europe/Moscow",
            "connection": {"base_url": amocrm, "access_token": "demo-token", "webhook_secret": SECRET}})
        requests.post(f"{api}/integrations/e2e/status-mapping/defaults", headers=headers, timeout=10)
        samples = []
        for i in range(args.events):
            lead = requests.post(amocrm + "/_sandbox/leads", timeout=10, json={
                "name": f"Заказ {i}", "pipeline_id": 7001, "status_id": 142, "price": 100 + i, "notify": False}).json()
            body = urlencode({"account[id]": "32427762", "leads[status][0][id]": lead["id"],
                              "leads[status][0][updated_at]": lead["updated_at"]})
            start = time.perf_counter()
            requests.post(f"{api}/webhooks/amocrm/e2e", params={"secret": SECRET}, data=body, timeout=10,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
            while str(lead["id"]) not in requests.get(metrika + "/_sandbox/state", timeout=10).json()["counters"].get(
                    "5555", {}).get("orders", {}):
                time.sleep(0.02)
            samples.append(time.perf_counter() - start)
        p = percentiles(samples)
        table(f"End-to-end latency on the local stack ({args.events} deals, one at a time)",
              ["webhook → order in Metrika sandbox", "p50", "p95", "of which: worker batching window"],
              [["amoCRM status_lead", ms(p["p50"]), ms(p["p95"]), "1000 ms (local; 5 s in AWS)"]])
    finally:
        os.killpg(stack.pid, signal.SIGINT)
        stack.wait(timeout=30)


if __name__ == "__main__":
    main()
