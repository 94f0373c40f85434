"""Cold start: a fresh Python process importing app.py and answering its first webhook, against a bare
process doing `import chalice, boto3` and creating the same clients. Target ≤ 1.1×.

    python -m bench.cold_start [--runs 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import ADMIN_TOKEN, AMO_SECRET, amocrm_config, environment, table

ROOT = Path(__file__).resolve().parent.parent

APP = """
import time, sys
start = time.perf_counter()
from app import app, get_store, get_queue
from chalice.test import Client
with Client(app) as client:
    response = client.http.post("/webhooks/amocrm/cold?secret=" + sys.argv[1], body=sys.argv[2].encode(),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
assert response.status_code == 200, response.body
print(time.perf_counter() - start)
"""

BARE = """
import time
start = time.perf_counter()
import chalice, boto3
from chalice.test import Client
db, sqs = boto3.client("dynamodb"), boto3.client("sqs")
db.get_item(TableName="metrika-crm-bridge-dev-config", Key={"pk": {"S": "x"}, "sk": {"S": "y"}})
sqs.get_queue_url(QueueName="metrika-crm-bridge-dev-events")
print(time.perf_counter() - start)
"""


def run(code: str, *args: str) -> float:
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=os.environ.copy(), check=True,
                            capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with environment() as world:
        import app
        from chalice.test import Client
        from urllib.parse import urlencode
        with Client(app.app, stage_name="dev") as client:
            os.environ.update(world["env"])
            client.http.put("/integrations/cold", headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                           "Content-Type": "application/json"},
                            body=json.dumps(amocrm_config(world["amocrm"])))
        body = urlencode({"account[id]": "1", "leads[status][0][id]": "5", "leads[status][0][updated_at]": "1790000000"})
        ours = [run(APP, AMO_SECRET, body) for _ in range(args.runs)]
        bare = [run(BARE) for _ in range(args.runs)]
        in_ours, in_bare = statistics.median(t for t, _ in ours), statistics.median(t for t, _ in bare)
        whole_ours, whole_bare = statistics.median(w for _, w in ours), statistics.median(w for _, w in bare)
        table(f"Cold start (median of {args.runs} fresh processes; target ≤ 1.1×)",
              ["measure", "app.py + first webhook", "bare chalice + boto3 clients", "ratio"],
              [["import + first answer, in process", f"{in_ours * 1000:.0f} ms", f"{in_bare * 1000:.0f} ms",
                f"{in_ours / in_bare:.2f}×"],
               ["whole process incl. interpreter start", f"{whole_ours * 1000:.0f} ms", f"{whole_bare * 1000:.0f} ms",
                f"{whole_ours / whole_bare:.2f}×"]])


if __name__ == "__main__":
    main()
