"""History import from the command line, with a progress bar: starts (or resumes) the same job as
`POST /integrations/{id}/backfill` and follows it until done. Ctrl-C stops the job; run again to resume.

    python -m tools.backfill --api http://127.0.0.1:8000 --token <admin token> <integration id> --since 2026-09-01
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import requests


def bar(job: dict, width: int = 30) -> str:
    phase = job.get("phase", "")
    counts = job.get("counts", {})
    total = (job.get("totals") or {}).get(phase)
    done = counts.get("contacts_sent" if phase == "contacts" else "orders_sent", 0)
    # amoCRM's lists give no totals: then the bar fills only when the job is done, the counts still move.
    filled = width if job.get("state") == "done" else int(width * min(1.0, done / total)) if total else 0
    share = f"{done}/{total}" if total else f"{done}"
    return (f"\r[{'#' * filled}{'.' * (width - filled)}] {phase:<8} {share:>11}  read {counts.get('read', 0)} "
            f"skipped {counts.get('skipped', 0)} failed {counts.get('failed', 0)} "
            f">21d {counts.get('older_than_21_days', 0)}  {job.get('error') or ''}")[:160]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("integration_id")
    parser.add_argument("--since", help="YYYY-MM-DD (required for a new import)")
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming")
    parser.add_argument("--api", default=os.environ.get("BRIDGE_API", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("ADMIN_TOKEN"), help="admin token (or ADMIN_TOKEN)")
    args = parser.parse_args()
    # Ctrl-C stops the import even when started from a parent that ignores SIGINT (a shell's background
    # job, a test runner's worker): Python would leave the inherited "ignore" in place.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not args.token:
        parser.error("--token or ADMIN_TOKEN is required")
    url = f"{args.api.rstrip('/')}/integrations/{args.integration_id}/backfill"
    headers = {"Authorization": f"Bearer {args.token}"}
    body = {k: v for k, v in (("since", args.since), ("restart", args.restart or None)) if v is not None}
    try:
        answer = requests.post(url, json=body, headers=headers, timeout=30)
    except requests.ConnectionError:
        print(f"cannot reach the API at {args.api} (is `make run` up, or is --api right?)", file=sys.stderr)
        return 1
    if answer.status_code != 200:
        print(f"refused ({answer.status_code}): {answer.json().get('message')}", file=sys.stderr)
        return 1
    try:
        while True:
            job = requests.get(url, headers=headers, timeout=30).json()["backfill"]
            sys.stderr.write(bar(job))
            sys.stderr.flush()
            if job["state"] != "running":
                print(f"\n{job['state']}: {job['counts']}")
                return 0 if job["state"] == "done" else 1
            time.sleep(1)
    except KeyboardInterrupt:
        requests.post(f"{url}/stop", headers=headers, timeout=30)
        print("\nstopped; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
