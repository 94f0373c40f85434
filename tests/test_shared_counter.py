"""Several integrations on one Metrika counter (issue 13, item 2): ids that do not collide, assigned
once; deliveries, deletions and the history import agree on them; every status push carries the
union of the counter's mappings. The in-memory store; Metrika is the sandbox over loopback HTTP (its
status list is replaced by each push, as we assume Metrika's is)."""
from __future__ import annotations

import time

import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef, EntityRows, crm_contact_id, is_crm_contact
from chalicelib.crm.amocrm.source import AmoCrmSource
from chalicelib.errors import ApiError
from chalicelib.integrations import save_integration
from chalicelib.mapping_admin import replace_mapping
from chalicelib.metrika.client import MetrikaClient
from chalicelib.shared_counter import scoped_id, scoped_rows
from chalicelib.store.memory import MemoryStore
from tests.conftest import amocrm_config, bitrix24_config
from tests.core import Clock, Core, deal_rows


def moscow(config):
    return "Europe/Moscow"


# --- the id scheme (pure) ------------------------------------------------------------------------------

def test_rows_get_the_prefix_once():
    contacts, orders = [{"uniq_id": "11", "name": "Иван"}, {"uniq_id": "lead-5"}], \
        [{"id": "5", "client_uniq_id": "lead-5", "order_status": "won"}]
    assert scoped_rows("", contacts, orders) == (contacts, orders)
    scoped = scoped_rows("b24:", contacts, orders)
    assert scoped == ([{"uniq_id": "b24:11", "name": "Иван"}, {"uniq_id": "b24:lead-5"}],
                      [{"id": "b24:5", "client_uniq_id": "b24:lead-5", "order_status": "won"}])
    assert scoped_rows("b24:", *scoped) == scoped  # a deletion re-sends the order as last sent
    assert contacts[0]["uniq_id"] == "11"  # the caller's rows are left alone
    assert scoped_id("b24:", "b24:7") == "b24:7" and scoped_id("", "7") == "7"


@pytest.mark.parametrize("uniq_id, crm_id", [
    ("11", "11"), ("b24:11", "11"), ("123:456", "456"), ("lead-5", None), ("b24:lead-5", None),
    ("deal-5", None), ("", None), ("b24:", None), ("١٢", None),  # Arabic-Indic digits are no CRM id
])
def test_crm_contacts_are_recognised_with_or_without_a_prefix(uniq_id, crm_id):
    assert crm_contact_id(uniq_id) == crm_id and is_crm_contact(uniq_id) is (crm_id is not None)


# --- the prefix is assigned once ------------------------------------------------------------------------

def test_the_first_integration_on_a_counter_keeps_raw_ids_and_later_ones_get_a_prefix():
    store = MemoryStore()
    assert "id_prefix" not in save_integration(store, "amo", amocrm_config(), moscow)
    assert save_integration(store, "b24", bitrix24_config(counter_id=4242), moscow)["id_prefix"] == "b24:"
    # later PUTs keep both as they are, whatever else changes
    assert "id_prefix" not in save_integration(store, "amo", amocrm_config(currency="USD"), moscow)
    shown = save_integration(store, "b24", bitrix24_config(counter_id=4242, currency="EUR"), moscow)
    assert shown["id_prefix"] == "b24:"
    # GET → PUT sends it back: accepted; anything else is a 400 naming it, and nothing is stored
    assert save_integration(store, "b24", {**bitrix24_config(counter_id=4242), "id_prefix": "b24:"}, moscow)
    for integration_id, body in (("b24", {**bitrix24_config(counter_id=4242), "id_prefix": "x:"}),
                                 ("amo", {**amocrm_config(), "id_prefix": "amo:"})):
        with pytest.raises(ApiError) as refused:
            save_integration(store, integration_id, body, moscow)
        assert refused.value.status == 400 and "id_prefix" in refused.value.details
    assert store.get_integration("b24")["id_prefix"] == "b24:" and "id_prefix" not in store.get_integration("amo")


def test_moving_to_a_shared_counter_assigns_a_prefix_that_then_stays():
    store = MemoryStore()
    save_integration(store, "amo", amocrm_config(), moscow)
    assert "id_prefix" not in save_integration(store, "solo", amocrm_config(counter_id=5000), moscow)
    assert save_integration(store, "solo", amocrm_config(counter_id=4242), moscow)["id_prefix"] == "solo:"
    assert save_integration(store, "solo", amocrm_config(counter_id=5000), moscow)["id_prefix"] == "solo:"
    store.delete_integration("amo")
    assert save_integration(store, "next", amocrm_config(counter_id=4242), moscow).get("id_prefix") is None


def test_two_integrations_created_on_one_empty_counter_at_once_do_not_both_get_raw_ids():
    """Both PUTs read the counter before either writes (the read is slowed to make the window wide):
    without one decision at a time per counter both got raw ids, and their orders 500 would be one."""
    import threading
    from tests.core import at_once

    class SlowRead(MemoryStore):
        def integrations_on_counter(self, counter_id):
            found = super().integrations_on_counter(counter_id)
            time.sleep(0.3)  # the other PUT reads meanwhile
            return found
    store = SlowRead()
    names = iter(["amo", "b24"])
    lock = threading.Lock()

    def create():
        with lock:
            integration_id = next(names)
        config = amocrm_config() if integration_id == "amo" else bitrix24_config(counter_id=4242)
        return integration_id, save_integration(store, integration_id, config, moscow).get("id_prefix")
    results, errors = at_once(create, 2, timeout=30)
    assert errors == [] and len(results) == 2
    assert sorted(prefix is None for _, prefix in results) == [False, True], results  # exactly one raw
    assert {store.get_integration(i).get("id_prefix") for i in ("amo", "b24")} == {None, *(p for _, p in results if p)}


def test_a_put_that_cannot_get_the_counters_lease_is_a_409_and_stores_nothing(monkeypatch):
    import chalicelib.shared_counter as shared_counter
    monkeypatch.setattr(shared_counter, "LEASE_WAIT", 0.2)
    store = MemoryStore()
    store.acquire_lease("counter-ids:4242", 1, "another PUT", time.time(), 60)  # held, not expiring soon
    with pytest.raises(ApiError) as busy:
        save_integration(store, "b24", bitrix24_config(counter_id=4242), moscow)
    assert busy.value.status == 409 and busy.value.error == "counter_busy" and store.get_integration("b24") is None
    # a PUT that decides nothing (the integration stays on its counter) does not wait for it
    store.put_integration("amo", {**amocrm_config(), "timezone": "UTC"})
    assert "id_prefix" not in save_integration(store, "amo", amocrm_config(currency="USD"), moscow)
    # a crashed PUT's lease runs out, and the next PUT goes ahead
    store.acquire_lease("counter-ids:5000", 1, "crashed PUT", time.time() - 120, 60)
    assert save_integration(store, "solo", amocrm_config(counter_id=5000), moscow).get("id_prefix") is None


def test_dynamodb_reads_who_is_on_a_counter_strongly_consistent():
    """The lease orders the PUTs; the read under it must also see the config the one before wrote."""
    from chalicelib.store.dynamodb import DynamoStore

    class Client:
        scans: list = []

        def scan(self, **kwargs):
            self.scans.append(kwargs)
            return {"Items": [{"pk": {"S": "INTEGRATION#amo"}}]}
    client = Client()
    store = DynamoStore(client, "config", "state", quota_table="quota")
    assert store.integrations_on_counter(4242) == ["amo"]
    assert client.scans[-1]["ConsistentRead"] is True


# --- deliveries, deletions and the import agree ------------------------------------------------------------

def test_two_integrations_on_one_counter_do_not_overwrite_each_other(metrika_sandbox):
    core = Core(metrika_sandbox.url)
    amo, b24 = core.integration("amo"), core.integration("b24", id_prefix="b24:")
    core.source.rows = {(ORDER, "500"): deal_rows("500", revenue=100),
                        (ORDER, "501"): deal_rows("501", contact="lead-501")}
    core.ingest.record(amo, [EntityRef(ORDER, "500", 1789990000, "add")], origin="amocrm")
    core.drain()
    core.source.rows[(ORDER, "500")] = deal_rows("500", revenue=900)
    core.ingest.record(b24, [EntityRef(ORDER, "500", 1789990000, "add"), EntityRef(ORDER, "501", 1789990000, "add")],
                       origin="amocrm")
    core.drain()
    counter = metrika_sandbox.counter(core.counter_id)
    assert set(counter.orders) == {"500", "b24:500", "b24:501"}
    assert counter.orders["500"]["revenue"] == 100 and counter.orders["b24:500"]["revenue"] == 900
    assert counter.orders["b24:500"]["client_uniq_id"] == "b24:11" and set(counter.contacts) >= {"11", "b24:11"}
    assert counter.orders["b24:501"]["client_uniq_id"] == "b24:lead-501"
    # the deal's CRM customer is noted under its CRM id, so its own unchanged webhook sends nothing
    assert core.store.get_entity(b24, CONTACT, "11")["content_hash"]
    assert core.store.get_entity(b24, CONTACT, "b24:11") is None
    core.source.rows[(ORDER, "500")] = EntityRows(gone=True)  # deleted in the second CRM
    core.ingest.record(b24, [EntityRef(ORDER, "500", 1789990100, "delete")], origin="amocrm")
    core.drain()
    assert counter.orders["b24:500"]["order_status"] == "CANCELLED" and counter.orders["500"]["order_status"] == "PAID"
    assert set(counter.orders) == {"500", "b24:500", "b24:501"}


def test_a_history_import_with_a_prefix_sends_each_customer_once(metrika_sandbox, amocrm):
    """The contacts phase sends the customers; the deals phase must recognise them inside the deals
    (the same prefixed row), not send them again."""
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    people = [amocrm.create_contact(f"Клиент {n}", phones=[f"+7 916 {n:07d}"], notify=False)["id"] for n in range(4)]
    for n in range(8):
        amocrm.create_lead(f"Сделка {n}", 7001, 1001, price=1000 + n, contacts=[people[n % 4]], notify=False)
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["amocrm"] = AmoCrmSource(core.store.reserve_slot, backoff=0.01)
    shop = core.integration("second", id_prefix="second:", connection={
        "base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": "s" * 20})
    core.store.put_status_mapping(shop, [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"}], 0)
    metrika_sandbox.counter(core.counter_id).order_statuses["new"] = {"id": "new", "type": "IN_PROGRESS"}
    core.backfill.start(shop, {"since": int(time.time()) - 86400})
    core.drain()
    counter = metrika_sandbox.counter(core.counter_id)
    assert core.backfill.status(shop)["backfill"]["state"] == "done"
    assert set(counter.orders) == {f"second:{i}" for i in amocrm.leads}
    assert set(counter.contacts) == {f"second:{i}" for i in people}
    assert all(n == 1 for n in counter.times_uploaded.values()), counter.times_uploaded


# --- one status list per counter ----------------------------------------------------------------------------

WON = {"crm_status": "7001:142", "metrika_status_id": "won", "humanized": "Успешно", "type": "PAID"}
LOST = {"crm_status": "7001:143", "metrika_status_id": "lost", "humanized": "Не реализовано", "type": "CANCELLED"}
B24_NEW = {"crm_status": "C0:NEW", "metrika_status_id": "b24_new", "humanized": "Новая", "type": "IN_PROGRESS"}
B24_WON = {"crm_status": "C0:WON", "metrika_status_id": "won", "humanized": "Успешно", "type": "PAID"}


def test_each_push_sends_the_union_of_the_counters_mappings(metrika_sandbox):
    store = MemoryStore()
    for integration_id, config in (("amo", amocrm_config(timezone="UTC")),
                                   ("b24", bitrix24_config(counter_id=4242, timezone="UTC")),
                                   ("elsewhere", amocrm_config(counter_id=4343, timezone="UTC"))):
        save_integration(store, integration_id, config, moscow)

    def metrika_for(integration):
        return MetrikaClient(integration["metrika_token"], metrika_sandbox.url)
    counter = metrika_sandbox.counter(4242)

    def listed():
        return {s["id"]: (s["type"], s["humanized"]) for s in counter.order_statuses.values()}
    replace_mapping(store, "amo", {"entries": [WON, LOST]}, metrika_for)
    replace_mapping(store, "elsewhere", {"entries": [{**WON, "type": "CANCELLED"}]}, metrika_for)  # its own counter
    pushed = replace_mapping(store, "b24", {"entries": [B24_NEW, B24_WON]}, metrika_for)
    assert pushed["shared_with"] == ["amo"] and pushed["counter_statuses"] == 3
    assert listed() == {"won": ("PAID", "Успешно"), "lost": ("CANCELLED", "Не реализовано"),
                        "b24_new": ("IN_PROGRESS", "Новая")}
    # the first integration's next push keeps the second one's statuses
    replace_mapping(store, "amo", {"entries": [LOST]}, metrika_for)
    assert set(listed()) == {"won", "lost", "b24_new"}
    # one id, two meanings: 409 naming it; nothing pushed, nothing stored
    before = (listed(), store.get_status_mapping("b24"))
    with pytest.raises(ApiError) as conflict:
        replace_mapping(store, "b24", {"entries": [{**B24_WON, "crm_status": "C0:LOSE", "metrika_status_id": "lost",
                                                    "type": "SPAM"}]}, metrika_for)
    assert conflict.value.status == 409 and conflict.value.error == "status_conflict"
    assert "'lost'" in conflict.value.message and set(conflict.value.details["metrika_status_id"]["lost"]) == {"amo", "b24"}
    assert (listed(), store.get_status_mapping("b24")) == before
    # a deleted integration's statuses leave with the next push on the counter
    store.delete_integration("b24")
    replace_mapping(store, "amo", {"entries": [LOST]}, metrika_for)
    assert set(listed()) == {"lost"}


def test_two_integrations_pushing_their_mappings_at_once_lose_neither(metrika_sandbox):
    """Each push reads the other's stored mapping, then pushes the union, then stores its own: side by
    side, each read the other's old list, and the push that landed last dropped the other's new status
    (whose orders Metrika would then refuse). One push at a time per counter."""
    import threading
    from tests.core import at_once
    store = MemoryStore()
    save_integration(store, "amo", amocrm_config(timezone="UTC"), moscow)
    save_integration(store, "b24", bitrix24_config(counter_id=4242, timezone="UTC"), moscow)

    class SlowPush(MetrikaClient):
        def save_order_statuses(self, counter_id, statuses):
            time.sleep(0.3)  # the other push reads the stored mappings meanwhile
            return super().save_order_statuses(counter_id, statuses)

    def metrika_for(integration):
        return SlowPush(integration["metrika_token"], metrika_sandbox.url)
    pushes = iter([("amo", [WON, LOST]), ("b24", [B24_NEW])])
    lock = threading.Lock()

    def push():
        with lock:
            integration_id, entries = next(pushes)
        return replace_mapping(store, integration_id, {"entries": entries}, metrika_for)
    results, errors = at_once(push, 2, timeout=30)
    assert errors == [] and len(results) == 2
    assert set(metrika_sandbox.counter(4242).order_statuses) == {"won", "lost", "b24_new"}


def test_a_mapping_push_before_a_counter_is_connected_is_a_409_not_a_crash():
    """An integration installed from its CRM has no counter until an admin PUTs one: its mapping has no
    counter to go to (it was a KeyError, a 500)."""
    store = MemoryStore()
    store.put_integration("installed", {"crm": "amocrm", "connection": {"auth": "oauth"}})
    with pytest.raises(ApiError) as refused:
        replace_mapping(store, "installed", {"entries": [WON]}, lambda integration: pytest.fail("no Metrika call"))
    assert refused.value.status == 409 and refused.value.error == "metrika_not_connected"
    assert store.get_status_mapping("installed") is None


def test_the_sandbox_replaces_the_status_list_as_we_assume_metrika_does(metrika_sandbox):
    client = MetrikaClient("y0_t", metrika_sandbox.url)
    client.save_order_statuses(77, [{"id": "a", "type": "PAID", "humanized": "A"}])
    client.save_order_statuses(77, [{"id": "b", "type": "SPAM", "humanized": "B"}])
    assert [s["id"] for s in client.get_order_statuses(77)] == ["b"]


def test_a_product_sync_keeps_the_other_integrations_products(metrika_sandbox):
    """The product list is one per counter and a save may replace it: each sync sends the union."""
    core = Core(metrika_sandbox.url)
    amo, b24 = core.integration("amo"), core.integration("b24", id_prefix="b24:")
    core.source.rows = {(ORDER, "5"): deal_rows("5", products={"77": 1}), (ORDER, "6"): deal_rows("6", products={"88": 2})}
    core.source.product_names = lambda integration, products: {p: f"product {p}" for p in products}
    core.ingest.record(amo, [EntityRef(ORDER, "5", 1789990000, "add")], origin="amocrm")
    core.drain()
    core.ingest.record(b24, [EntityRef(ORDER, "6", 1789990000, "add")], origin="amocrm")
    core.drain()
    assert metrika_sandbox.counter(core.counter_id).products == {"77": "product 77", "88": "product 88"}
    from chalicelib.operations import sync_catalog
    core.source.catalog = lambda integration: {"99": "catalogue item"}
    assert sync_catalog(core.store, core.metrika_for, core.sources, amo)["products"] == 3
    assert set(metrika_sandbox.counter(core.counter_id).products) == {"77", "88", "99"}


# --- an integration moving to another counter ---------------------------------------------------------------

def test_moving_to_a_counter_pushes_its_statuses_there_with_the_others(app_client, integration_id, metrika_sandbox):
    """Its orders carry its Metrika status ids: the counter it moves to must list them (with those of
    the integrations already there), or every order it sends there names an unknown status. Pushed
    before the config is stored: a conflict or Metrika's refusal leaves it on its old counter."""
    import json as _json
    from tests.conftest import admin_headers
    base = 200_000 + int(integration_id[-5:], 16)
    old_counter, new_counter = base, base + 1
    there = integration_id + "-there"

    def put(iid, body):
        return app_client.http.put(f"/integrations/{iid}", headers=admin_headers(), body=_json.dumps(body))

    def put_mapping(iid, entries):
        return app_client.http.put(f"/integrations/{iid}/status-mapping", headers=admin_headers(),
                                   body=_json.dumps({"entries": entries}))
    try:
        assert put(integration_id, amocrm_config(counter_id=old_counter, timezone="UTC")).status_code == 200
        assert put(there, bitrix24_config(counter_id=new_counter, timezone="UTC")).status_code == 200
        assert put_mapping(integration_id, [WON, LOST]).status_code == 200
        assert put_mapping(there, [B24_NEW]).status_code == 200
        target = metrika_sandbox.counter(new_counter)
        assert set(target.order_statuses) == {"b24_new"}
        # a status id the two define differently: 409, nothing pushed, the config stays as it was
        assert put_mapping(there, [B24_NEW, {**LOST, "crm_status": "C0:LOSE", "type": "SPAM"}]).status_code == 200
        refused = put(integration_id, amocrm_config(counter_id=new_counter, timezone="UTC"))
        assert refused.status_code == 409 and refused.json_body["error"] == "status_conflict"
        assert app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).json_body["counter_id"] == old_counter
        assert set(target.order_statuses) == {"b24_new", "lost"}
        assert put_mapping(there, [B24_NEW]).status_code == 200
        # Metrika refusing the push (the token cannot see the new counter): its reason, and the config
        # stays as it was
        from tests.conftest import METRIKA_TOKEN
        metrika_sandbox.tokens = {METRIKA_TOKEN: [old_counter]}
        try:
            refused = put(integration_id, amocrm_config(counter_id=new_counter, timezone="UTC"))
        finally:
            metrika_sandbox.tokens = None
        assert refused.status_code == 422 and refused.json_body["error"] == "metrika_refused"
        assert "status mapping" in refused.json_body["message"] and "Access denied" in refused.json_body["message"]
        assert app_client.http.get(f"/integrations/{integration_id}", headers=admin_headers()).json_body["counter_id"] == old_counter
        # the move: the new counter lists both integrations' statuses
        moved = put(integration_id, amocrm_config(counter_id=new_counter, timezone="UTC"))
        assert moved.status_code == 200 and moved.json_body["id_prefix"] == integration_id + ":"
        assert {s["id"]: s["type"] for s in target.order_statuses.values()} == \
            {"b24_new": "IN_PROGRESS", "won": "PAID", "lost": "CANCELLED"}
        # a later PUT on the same counter pushes nothing
        before = len(metrika_sandbox.requests)
        assert put(integration_id, amocrm_config(counter_id=new_counter, timezone="UTC", currency="USD")).status_code == 200
        assert not [r for r in metrika_sandbox.requests[before:] if "order_statuses" in r["path"]]
    finally:
        app_client.http.delete(f"/integrations/{there}", headers=admin_headers())


def test_a_push_on_the_new_counter_while_an_integration_moves_there_keeps_its_statuses(metrika_sandbox):
    """The move pushes its statuses to the new counter, then stores the config. A push by an integration
    already there, in between, read the counter without the mover (its config not yet there) and sent a
    list without the mover's statuses: its orders then named statuses the counter no longer lists. The
    new counter's status lease is held until the config is stored."""
    import threading
    from chalicelib.mapping_admin import push_to_new_counter

    def metrika_for(integration):
        return MetrikaClient(integration["metrika_token"], metrika_sandbox.url)
    b24_lose = {"crm_status": "C0:LOSE", "metrika_status_id": "b24_lose", "humanized": "Провал", "type": "CANCELLED"}
    done: dict = {}

    class PushMeanwhile(MemoryStore):
        def put_integration(self, integration_id, config):
            if integration_id == "amo" and config.get("counter_id") == 4242:  # the move's config write
                def push():
                    try:
                        done["pushed"] = replace_mapping(self, "b24", {"entries": [B24_NEW, b24_lose]}, metrika_for)
                    except Exception as exc:  # noqa: BLE001 - reported below
                        done["error"] = exc
                done["thread"] = threading.Thread(target=push)
                done["thread"].start()
                done["thread"].join(1.0)  # the other push, at its own pace: it may wait for the lease
            return super().put_integration(integration_id, config)
    store = PushMeanwhile()
    save_integration(store, "amo", amocrm_config(counter_id=4343, timezone="UTC"), moscow)
    save_integration(store, "b24", bitrix24_config(counter_id=4242, timezone="UTC"), moscow)
    replace_mapping(store, "amo", {"entries": [WON, LOST]}, metrika_for)
    replace_mapping(store, "b24", {"entries": [B24_NEW]}, metrika_for)
    moved = save_integration(store, "amo", amocrm_config(counter_id=4242, timezone="UTC"), moscow,
                             around_save=lambda config: push_to_new_counter(store, "amo", config, metrika_for))
    done["thread"].join(10)
    assert moved["counter_id"] == 4242 and "error" not in done, done
    assert set(metrika_sandbox.counter(4242).order_statuses) == {"won", "lost", "b24_new", "b24_lose"}


def test_a_move_refused_for_its_id_prefix_pushes_nothing_to_the_new_counter(metrika_sandbox):
    """A 400 is an answer before any effect: a body that sends back an `id_prefix` other than the stored
    one is refused, and the counter it named must not have been sent the mover's statuses first."""
    from chalicelib.mapping_admin import push_to_new_counter

    def metrika_for(integration):
        return MetrikaClient(integration["metrika_token"], metrika_sandbox.url)
    store = MemoryStore()
    save_integration(store, "amo", amocrm_config(counter_id=4343, timezone="UTC"), moscow)
    replace_mapping(store, "amo", {"entries": [WON, LOST]}, metrika_for)
    before = len(metrika_sandbox.requests)
    with pytest.raises(ApiError) as refused:
        save_integration(store, "amo", {**amocrm_config(counter_id=4242, timezone="UTC"), "id_prefix": "amo:"}, moscow,
                         around_save=lambda config: push_to_new_counter(store, "amo", config, metrika_for))
    assert refused.value.status == 400 and "id_prefix" in refused.value.details
    assert store.get_integration("amo")["counter_id"] == 4343
    assert not [r for r in metrika_sandbox.requests[before:] if "order_statuses" in r["path"]]
    assert metrika_sandbox.counter(4242).order_statuses == {}
