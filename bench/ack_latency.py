"""Acknowledge latency: webhook in → 200 out, for realistic amoCRM and Bitrix24 bodies, in-process
(chalice.test.Client) and over HTTP (chalice local), against the floor — the bare boto3 DynamoDB
UpdateItem and SQS SendMessageBatch the path needs, on the same emulator, in the same run, sampled
in turn with the measured paths.
Target: p50 ≤ 1.2 × the floor.

    python -m bench.ack_latency [--events 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import boto3
import requests

from bench.harness import (ADMIN_TOKEN, AMO_SECRET, B24_TOKEN, amocrm_config, bitrix24_config, chalice_local, environment, ms,
                           percentiles, table)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def amocrm_body(amocrm, lead_id: int, i: int) -> bytes:
    lead = dict(amocrm.leads[lead_id], updated_at=1790000000 + i)
    return amocrm.webhook_body("leads", "status", amocrm._lead_form(lead, {"old_status_id": 1001}))


def floor_request(db, sqs, state_table: str, url: str, i: int) -> float:
    """What any receiver must spend: one conditional UpdateItem and one SendMessageBatch."""
    start = time.perf_counter()
    db.update_item(TableName=state_table, Key={"pk": {"S": "FLOOR"}, "sk": {"S": f"E#{i % 50}"}},
                   UpdateExpression="SET event_time = :t, dirty = :y, queued = :y",
                   ConditionExpression="attribute_not_exists(event_time) OR event_time <= :t",
                   ExpressionAttributeValues={":t": {"N": str(i)}, ":y": {"BOOL": True}}, ReturnValues="ALL_OLD")
    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "0", "MessageBody": json.dumps({"i": i})}])
    return time.perf_counter() - start


def drain(queue_name: str) -> None:
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
    while messages := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                        for i, m in enumerate(messages)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1000)
    args = parser.parse_args()
    with environment() as world:
        import app
        from chalice.test import Client
        from chalicelib.settings import get_settings
        amocrm, bitrix = world["amocrm"], world["bitrix24"]
        lead_id = world["seeded"]["amocrm"]["lead_id"]
        deal_id = world["seeded"]["bitrix24"]["deal_id"]
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        rows = []
        with Client(app.app, stage_name="dev") as client:
            os.environ.update(world["env"])
            client.http.put("/integrations/amo", headers=headers, body=json.dumps(amocrm_config(amocrm)))
            client.http.put("/integrations/b24", headers=headers, body=json.dumps(bitrix24_config(bitrix)))
            settings = get_settings()
            db, sqs = boto3.client("dynamodb"), boto3.client("sqs")
            url = sqs.get_queue_url(QueueName=settings.events_queue)["QueueUrl"]
            paths = {"amoCRM": (f"/webhooks/amocrm/amo?secret={AMO_SECRET}", "amo", lead_id,
                                lambda i: amocrm_body(amocrm, lead_id, i)),
                     "Bitrix24": ("/webhooks/bitrix24/b24", "b24", deal_id,
                                  lambda i: bitrix.event_body("ONCRMDEALUPDATE", deal_id, B24_TOKEN))}
            samples: dict[str, list[float]] = {"floor": [], "amoCRM": [], "Bitrix24": []}
            # Floor and paths interleaved sample by sample: the emulator's speed drifts over a run, and
            # measuring them in separate phases moved the ratio by ±20 % between runs.
            for i in range(args.events):
                if i % 100 == 0:
                    drain(settings.events_queue)  # same queue depth for every side
                samples["floor"].append(floor_request(db, sqs, settings.state_table, url, i))
                for crm, (path, integration_id, entity_id, make_body) in paths.items():
                    body = make_body(i)
                    # As if the worker had taken the entity: every webhook writes AND queues, like the floor.
                    app.get_store().claim(integration_id, "order", str(entity_id))
                    start = time.perf_counter()
                    response = client.http.post(path, headers=FORM, body=body)
                    samples[crm].append(time.perf_counter() - start)
                    assert response.status_code == 200, response.body
            floor = percentiles(samples["floor"])
            for crm in paths:
                p = percentiles(samples[crm])
                rows.append([f"{crm}, in-process", ms(p["p50"]), ms(p["p95"]), ms(p["p99"]), ms(floor["p50"]),
                             f"{p['p50'] / floor['p50']:.2f}×"])
        # Over HTTP: the same app under `chalice local`, against the same floor plus one loopback round trip.
        with chalice_local(world["env"]) as base:
            session = requests.Session()
            session.put(f"{base}/integrations/amo", headers=headers, json=amocrm_config(amocrm))
            health = []
            for _ in range(200):
                start = time.perf_counter()
                session.get(base + "/health")
                health.append(time.perf_counter() - start)
            samples = []
            for i in range(args.events):
                body = amocrm_body(amocrm, lead_id, i)
                app.get_store().claim("amo", "order", str(lead_id))
                start = time.perf_counter()
                response = session.post(f"{base}/webhooks/amocrm/amo", params={"secret": AMO_SECRET}, data=body, headers=FORM)
                samples.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
            p = percentiles(samples)
            http_floor = floor["p50"] + percentiles(health)["p50"]
            rows.append(["amoCRM, chalice local (HTTP)", ms(p["p50"]), ms(p["p95"]), ms(p["p99"]),
                         f"{ms(http_floor)} (floor + GET /health)", f"{p['p50'] / http_floor:.2f}×"])
        table(f"Acknowledge latency ({args.events} webhooks each; target p50 ≤ 1.2× floor)",
              ["path", "p50", "p95", "p99", "floor p50", "ratio p50"], rows)


if __name__ == "__main__":
    main()
