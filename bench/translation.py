"""Translation throughput: parse + translate + schema dump per event, events per second on one core,
against `urllib.parse.parse_qsl` alone on the same bodies.

    python -m bench.translation [--events 2000]
"""
from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from urllib.parse import parse_qsl

from bench.harness import table
from chalicelib.crm.amocrm.translate import lead_rows
from chalicelib.crm.amocrm.webhook import parse_amocrm_webhook
from chalicelib.crm.bitrix24.translate import deal_rows
from chalicelib.crm.bitrix24.webhook import parse_bitrix24_event
from chalicelib.metrika.schemas import ContactRow, OrderRow
from sandbox.amocrm import AmoCrmSandbox, seed_demo
from sandbox.bitrix24 import Bitrix24Sandbox
from sandbox.bitrix24 import seed_demo as seed_bitrix

NOW = datetime.now(timezone.utc)


def rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    amo = AmoCrmSandbox()  # used as a data factory only: no server started
    seeded = seed_demo(amo)
    lead = amo.leads[seeded["lead_id"]]
    contacts = {c: amo.contacts[c] for c in amo.contacts}
    mapping = [{"crm_status": "7001:1001", "metrika_status_id": "amo_7001_1001", "type": "IN_PROGRESS"}]
    amo_bodies = [amo.webhook_body("leads", "status", amo._lead_form({**lead, "updated_at": 1790000000 + i}))
                  for i in range(args.events)]
    b24 = Bitrix24Sandbox()
    b24_seeded = seed_bitrix(b24)
    deal, contact, b24_lead = b24.deals[b24_seeded["deal_id"]], b24.contacts[b24_seeded["contact_id"]], b24.leads[b24_seeded["lead_id"]]
    rows = b24.product_rows[b24_seeded["deal_id"]]
    b24_mapping = [{"crm_status": "C2:NEW", "metrika_status_id": "C2:NEW", "type": "IN_PROGRESS"}]
    b24_bodies = [b24.event_body("ONCRMDEALUPDATE", deal["ID"], "token") for _ in range(args.events)]
    contact_schema, order_schema = ContactRow(time_zone="Europe/Moscow"), OrderRow(time_zone="Europe/Moscow")

    def amo_full(body: bytes) -> None:
        parse_amocrm_webhook(body)
        entity = lead_rows(lead, contacts, mapping=mapping, client_id_field="_YM_UID", now=NOW)
        contact_schema.dump(contact_schema.load(entity.contacts, many=True), many=True)
        order_schema.dump(order_schema.load(entity.orders, many=True), many=True)

    def b24_full(body: bytes) -> None:
        parse_bitrix24_event(body)
        entity = deal_rows(deal, contact=contact, lead=b24_lead, product_rows=rows, mapping=b24_mapping,
                           client_id_field="UF_CRM_YM_CLIENT_ID", now=NOW)
        contact_schema.dump(contact_schema.load(entity.contacts, many=True), many=True)
        order_schema.dump(order_schema.load(entity.orders, many=True), many=True)

    out = []
    for name, fn, bodies in (("amoCRM status_lead", amo_full, amo_bodies), ("Bitrix24 ONCRMDEALUPDATE", b24_full, b24_bodies)):
        ours = rate(fn, bodies)
        floor = rate(lambda b: parse_qsl(b.decode("utf-8"), keep_blank_values=True), bodies)
        out.append([name, f"{ours:,.0f}/s", f"{floor:,.0f}/s", f"{floor / ours:.1f}× slower"])
    table(f"Translation throughput, one core ({args.events} events each)",
          ["event", "parse + translate + schema dump", "parse_qsl alone", "ratio"], out)


if __name__ == "__main__":
    main()
