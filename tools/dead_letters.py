"""The dead-letter queue from the command line, with your own AWS credentials: count what it holds, or
move it all back to the events queue (the deployment's `POST /dead-letters/redrive`, looped until the
queue is empty, without API Gateway's 29 s limit).

    python -m tools.dead_letters count [--stage prod]
    python -m tools.dead_letters redrive [--stage prod] [--limit N]

Prints one JSON object on stdout (redrive: progress on stderr); exit 1 when SQS cannot be reached, no
region or credentials are configured, or SQS refused the call or some messages (they reappear in the
dead-letter queue within a minute: run it again); exit 2 for a stage not in `.chalice/config.json`.
AWS's own asynchronous redrive does the same: `aws sqs start-message-move-task --source-arn <DLQ ARN>`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from chalicelib.errors import Unavailable
from chalicelib.queue import REDRIVE_LIMIT, DeadLetterQueue, redrive_client
from chalicelib.settings import load_settings

CHALICE_CONFIG = Path(__file__).resolve().parent.parent / ".chalice" / "config.json"


def redrive_all(dead: DeadLetterQueue, limit: int | None = None) -> dict:
    """Call `redrive` until the queue is empty, a call moves nothing, or `limit` messages moved."""
    total = {"moved": 0, "remaining": 0, "failed": 0}
    while limit is None or total["moved"] < limit:
        step = dead.redrive(limit=REDRIVE_LIMIT if limit is None else min(REDRIVE_LIMIT, limit - total["moved"]))
        total = {"moved": total["moved"] + step["moved"], "remaining": step["remaining"],
                 "failed": total["failed"] + step["failed"]}
        print(f"moved {total['moved']}, {total['remaining']} left", file=sys.stderr, flush=True)
        if not step["moved"] or not step["remaining"] or step["failed"]:
            break
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["count", "redrive"])
    parser.add_argument("--stage", default=os.environ.get("STAGE", "dev"))
    parser.add_argument("--limit", type=int, help="move at most this many messages (default: all)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    stages = json.loads(CHALICE_CONFIG.read_text()).get("stages", {})
    if args.stage not in stages:  # a typo would otherwise ask AWS for a queue no deployment has
        print(f"dead letters: stage {args.stage!r} is not in .chalice/config.json (stages: {', '.join(stages)})",
              file=sys.stderr)
        return 2
    from botocore.exceptions import BotoCoreError, ClientError
    settings = load_settings({**os.environ, "STAGE": args.stage})
    try:  # no region fails here already, before any call; a hung SQS fails a call within seconds
        dead = DeadLetterQueue(redrive_client(), settings.dead_letter_queue, settings.events_queue)
        result = dead.count() if args.command == "count" else redrive_all(dead, args.limit)
    except (Unavailable, ClientError, BotoCoreError) as exc:  # ClientError: refused (access denied, bad keys)
        print(f"dead letters: {exc} ({settings.dead_letter_queue}); check the AWS credentials, region and stage",
              file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
