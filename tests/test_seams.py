"""Where the issue-13 pieces meet (review): shared-counter ids × per-customer records, failed-upload
re-sends × customers, large bodies × status. The in-memory store and queue (tests/core.py); Metrika is
the sandbox over loopback HTTP."""
from __future__ import annotations

from dataclasses import replace

from chalicelib.crm import ORDER, EntityRef
from tests.core import Core, deal_rows

VISITOR = "1714651234567890123"


def deal_of_contact(deal_id: str, contact: str, name: str, **fields) -> object:
    """A deal's rows as the amoCRM translator gives them for a CRM contact: the contact as read and the
    deal's own ClientIDs kept apart (`EntityRows.contact_parts`)."""
    rows = deal_rows(deal_id, contact=contact, client_ids=[VISITOR], **fields)
    rows.contacts[0]["name"] = name
    contact_row = {k: v for k, v in rows.contacts[0].items() if k != "client_ids"}
    return replace(rows, contact_parts={contact: (contact_row, [VISITOR])})


def test_moving_onto_a_shared_counter_never_sends_the_old_raw_customer_there(metrika_sandbox):
    """An integration moved onto a counter another uses gets `id_prefix`; the customers its entities had
    before the move carry raw ids, which on the new counter are the other integration's. Dropping a
    deal's source from such a customer must not send its row (SAVE: it would replace the other
    integration's customer of the same CRM id)."""
    core = Core(metrika_sandbox.url)
    amo = core.integration("amo")
    solo = core.integration("solo", counter_id=8080)
    core.source.rows = {(ORDER, "500"): deal_of_contact("500", "11", "Клиент amo")}
    core.ingest.record(amo, [EntityRef(ORDER, "500", 1789990000, "add")], origin="amocrm")
    core.drain()
    core.source.rows = {(ORDER, "77"): deal_of_contact("77", "11", "Клиент solo")}
    core.ingest.record(solo, [EntityRef(ORDER, "77", 1789990000, "add")], origin="amocrm")
    core.drain()
    # solo moves onto amo's counter: save_integration gives it a prefix (test_shared_counter.py)
    core.store.put_integration(solo, {**core.store.get_integration(solo), "counter_id": core.counter_id,
                                      "id_prefix": "solo:"})
    core.source.rows = {(ORDER, "77"): deal_of_contact("77", "11", "Клиент solo", revenue=999)}
    core.ingest.record(solo, [EntityRef(ORDER, "77", 1789990100, "update")], origin="amocrm")
    core.drain()
    shared = metrika_sandbox.counter(core.counter_id)
    assert shared.orders["solo:77"]["revenue"] == 999 and shared.orders["solo:77"]["client_uniq_id"] == "solo:11"
    assert shared.contacts["solo:11"]["name"] == "Клиент solo"
    assert shared.contacts["11"]["name"] == "Клиент amo"  # amo's customer untouched


def test_a_resend_after_a_failed_upload_survives_a_retry(metrika_sandbox):
    """`mark_resend` leaves `row_hashes` empty, which is how the worker knows to send the customers'
    rows again although their records say Metrika holds them. A transient failure of that resend saves
    the retry's progress in `row_hashes`: the next attempt must still send the customer."""
    from chalicelib.operations import confirm_uploads
    core = Core(metrika_sandbox.url)
    shop = core.integration()
    core.source.rows = {(ORDER, "5"): deal_rows("5")}
    core.ingest.record(shop, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    core.drain()
    counter = metrika_sandbox.counter(core.counter_id)
    uploads = {u["kind"]: u["uploading_id"] for u in core.store.uploads(shop)}
    metrika_sandbox.fail_uploading(uploads["contacts"])
    integration = core.store.get_integration(shop)
    assert confirm_uploads(core.store, core.metrika_for(integration), shop, integration,
                           requeue=core.ingest.requeue, now=core.clock())["resent"] == 1
    try:
        metrika_sandbox.set_faults(error_503=1.0, paths="/data/contacts/")
        core.worker.handle(core.queue.receive(100))  # the resend meets a Metrika outage: retried later
    finally:
        metrika_sandbox.set_faults()
    assert core.store.get_entity(shop, ORDER, "5")["dirty"] is True
    core.drain()
    assert counter.times_uploaded["contacts:11"] == 2, counter.times_uploaded
