"""Create the tables and queues the service needs, idempotently, against AWS or the local emulator.

boto3 picks the endpoint from its own variables (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_DYNAMODB`,
`AWS_ENDPOINT_URL_SQS`), so this module has no emulator-specific code.

    python -m chalicelib.infra --stage prod
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import boto3
from botocore.exceptions import ClientError

from .queue import MAX_RECEIVE_COUNT
from .settings import Settings, load_settings

KEY_SCHEMA = [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}]
ATTRIBUTES = [{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}]
# Lambda's guidance: visibility timeout ≥ 6 × the worker's timeout (300 s in .chalice/config.json).
WORKER_TIMEOUT_SECONDS = 300
VISIBILITY_TIMEOUT_SECONDS = 6 * WORKER_TIMEOUT_SECONDS


def ensure_tables(settings: Settings, dynamodb: Any = None) -> list[str]:
    dynamodb = dynamodb or boto3.client("dynamodb")
    created = []
    for name in (settings.config_table, settings.state_table, settings.quota_table):
        try:
            dynamodb.create_table(TableName=name, KeySchema=KEY_SCHEMA, AttributeDefinitions=ATTRIBUTES,
                                  BillingMode="PAY_PER_REQUEST")
            created.append(name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceInUseException":
                raise
    for name in created:
        dynamodb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    return created


def ensure_queues(settings: Settings, sqs: Any = None) -> dict[str, str]:
    """The events queue, with a dead-letter queue after MAX_RECEIVE_COUNT receives."""
    sqs = sqs or boto3.client("sqs")
    dlq_url = sqs.create_queue(QueueName=settings.dead_letter_queue,
                               Attributes={"MessageRetentionPeriod": str(14 * 24 * 3600)})["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=settings.events_queue, Attributes={
        "VisibilityTimeout": str(VISIBILITY_TIMEOUT_SECONDS),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)}),
    })["QueueUrl"]
    return {"events": queue_url, "dead_letter": dlq_url}


def ensure_resources(settings: Settings | None = None) -> dict:
    settings = settings or load_settings()
    return {"tables_created": ensure_tables(settings), "queues": ensure_queues(settings)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Create metrika-crm-bridge tables and queues (idempotent).")
    parser.add_argument("--stage", default="dev")
    args = parser.parse_args()
    settings = load_settings({**os.environ, "STAGE": args.stage})
    print(json.dumps(ensure_resources(settings), indent=2))


if __name__ == "__main__":
    main()
