"""Products at scale (issue 15, item 3): the product check reads the integration's product list once per
batch (or history-import step), however many products the orders name, and a deal's state item stays
small however many products the deal has. In process: the in-memory store, the Metrika sandbox (and for
the import the amoCRM sandbox) over loopback HTTP."""
from __future__ import annotations

import json
import time

import pytest

from chalicelib.crm import ORDER, EntityRef, EntityRows
from chalicelib.crm.amocrm.source import AmoCrmSource
from chalicelib.delivery import KEPT_PRODUCTS_BYTES, kept_order
from tests.core import Clock, Core, count_calls, deal_rows

PRODUCT_METHODS = ("products", "put_products", "integrations_on_counter")


def count_product_calls(store) -> dict[str, int]:
    """Wrap the store's product-list methods (on this object only) to count their calls: the list
    methods, and any other method with "product" in its name (there must be none left to call)."""
    return count_calls(store, {*PRODUCT_METHODS, *(n for n in dir(store) if "product" in n and not n.startswith("_"))})

def deals_naming(products: int, deals: int = 8, *, version: int = 0) -> dict:
    """`deals` deals sharing `products` distinct products between them, each deal its own slice."""
    per_deal = products // deals
    return {(ORDER, str(d)): deal_rows(str(d), contact=str(100 + d), revenue=1000 + version,
                                       products={f"sku-{d}-{i}": 1 + i % 3 for i in range(per_deal)})
            for d in range(deals)}


def one_batch(core: Core, shop: str, deals: int, at: int) -> float:
    """Deals 0 … deals-1 changed at `at`: delivered in one worker batch (the time it took)."""
    core.ingest.record(shop, [EntityRef(ORDER, str(d), at, "update") for d in range(deals)], origin="replay")
    started = time.perf_counter()
    assert core.drain() >= 1
    return time.perf_counter() - started


@pytest.mark.parametrize("products", [8, 800])
def test_the_product_check_reads_the_list_once_per_batch_whatever_the_batch_names(metrika_sandbox, products):
    """Before: one `known_products` read (a BatchGetItem per 100 ids on DynamoDB) plus the list for the
    save; now one read of the list, then set lookups; the same counts for 8 and for 800 products."""
    core = Core(metrika_sandbox.url)
    shop = core.integration()
    core.source.rows = deals_naming(products)
    named = []
    core.source.product_names = lambda integration, wanted: named.append(len(wanted)) or {p: f"Товар {p}" for p in wanted}
    calls = count_product_calls(core.store)
    elapsed = one_batch(core, shop, 8, 1789990000)
    assert calls == {"products": 1, "put_products": 1, "integrations_on_counter": 1}
    assert named == [products]  # one naming call for the batch
    counter = metrika_sandbox.counter(core.counter_id)
    assert len(counter.products) == products and counter.products["sku-0-0"] == "Товар sku-0-0"
    assert sum(len(o["products"]) for o in counter.orders.values()) == products
    assert elapsed < 1.0, f"{products} products in one batch took {elapsed:.2f} s"

    # The same products again (the deals changed): one read, nothing written, no list sent.
    saves = len([r for r in metrika_sandbox.requests if r["path"].endswith("/schema/products")])
    core.source.rows = deals_naming(products, version=1)
    calls.update({name: 0 for name in calls})
    one_batch(core, shop, 8, 1789990100)
    assert calls == {"products": 1, "put_products": 0, "integrations_on_counter": 0}
    assert len([r for r in metrika_sandbox.requests if r["path"].endswith("/schema/products")]) == saves
    assert {o["revenue"] for o in counter.orders.values()} == {1001}


def test_a_product_list_that_cannot_be_saved_is_tried_again_with_the_next_order(metrika_sandbox):
    """Best effort, and no product is taken for known before Metrika has it."""
    core = Core(metrika_sandbox.url)
    shop = core.integration()
    core.source.rows = deals_naming(16)
    metrika_sandbox.set_faults(error_503=1.0, paths="/schema/products")
    one_batch(core, shop, 8, 1789990000)
    assert core.store.products(shop) == {} and len(metrika_sandbox.counter(core.counter_id).orders) == 8
    metrika_sandbox.set_faults()
    core.source.rows = deals_naming(16, version=1)
    one_batch(core, shop, 8, 1789990100)
    assert len(core.store.products(shop)) == 16 and len(metrika_sandbox.counter(core.counter_id).products) == 16


# --- a deal's state item ------------------------------------------------------------------------------

def state_bytes(core: Core, shop: str, crm_id: str) -> int:
    return len(json.dumps(core.store.get_entity(shop, ORDER, crm_id), ensure_ascii=False).encode())


def test_a_deals_state_item_stays_small_however_many_products_it_has(metrika_sandbox):
    """Before: the order kept for a later deletion held every product (6 KB at 500; 2,000 products with
    255-character ids made an item over DynamoDB's 400 KB, which no write could store). Metrika still
    gets every product; the state keeps them only while they are small."""
    core = Core(metrika_sandbox.url)
    shop = core.integration()
    long_ids = {("x" * 250) + f"{i:05d}": 1 for i in range(2000)}
    core.source.rows = {(ORDER, "0"): deal_rows("0", contact="10", products={"sku-1": 2, "sku-2": 1}),
                        (ORDER, "1"): deal_rows("1", contact="11", products={f"p{i}": 1 for i in range(500)}),
                        (ORDER, "2"): deal_rows("2", contact="12", products=long_ids)}
    one_batch(core, shop, 3, 1789990000)
    orders = metrika_sandbox.counter(core.counter_id).orders
    assert len(orders["1"]["products"]) == 500 and len(orders["2"]["products"]) == 2000
    assert json.loads(core.store.get_entity(shop, ORDER, "0")["last_order"])["products"] == {"sku-1": 2, "sku-2": 1}
    for crm_id in ("1", "2"):
        state = core.store.get_entity(shop, ORDER, crm_id)
        assert state["dirty"] is False and "products" not in json.loads(state["last_order"])
        assert state_bytes(core, shop, crm_id) < 2048, state_bytes(core, shop, crm_id)
    assert state_bytes(core, shop, "0") < 2048

    # Deleted in the CRM: each is re-sent CANCELLED; the small one with its products, the large without.
    core.source.rows = {(ORDER, c): EntityRows(gone=True) for c in ("0", "1", "2")}
    core.ingest.record(shop, [EntityRef(ORDER, c, 1789990100, "delete") for c in ("0", "1", "2")], origin="amocrm")
    core.drain()
    assert {orders[c]["order_status"] for c in ("0", "1", "2")} == {"CANCELLED"}
    assert orders["0"]["products"] == {"sku-1": 2, "sku-2": 1}
    assert not orders["1"].get("products") and not orders["2"].get("products")


def test_kept_order_keeps_products_up_to_the_bound_and_never_changes_the_order_sent():
    order = {"id": "5", "client_uniq_id": "11", "order_status": "PAID", "products": {"a": 1}}
    assert json.loads(kept_order(order)) == order
    edge = {f"p{i:03d}": 1 for i in range(200)}
    while len(json.dumps(edge).encode()) > KEPT_PRODUCTS_BYTES:
        edge.popitem()
    assert json.loads(kept_order({**order, "products": edge}))["products"] == edge
    big = {**order, "products": {**edge, "zz": 1, "zzz": 2, "zzzz": 3}}
    assert json.loads(kept_order(big)) == {k: v for k, v in order.items() if k != "products"}
    assert big["products"]["zz"] == 1  # the caller's order (sent to Metrika) is left as it is
    # Non-ASCII ids count in bytes, as DynamoDB counts them.
    cyrillic = {"товар-" + str(i): 1 for i in range(60)}
    assert len(json.dumps(cyrillic).encode()) > KEPT_PRODUCTS_BYTES
    assert "products" not in json.loads(kept_order({**order, "products": cyrillic}))


# --- the history import over a large catalogue --------------------------------------------------------

def test_a_history_import_reads_the_product_list_once_per_step_over_a_1000_product_catalogue(
        metrika_sandbox, amocrm):
    """100 deals naming 1,000 catalogue products between them (names read from amoCRM's catalogue): one
    list read for the step that sends the orders, one list write and one save of the list."""
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт")], is_main=True)
    elements = [amocrm.add_catalog_element(4521, f"Товар {n}", 100 + n)["id"] for n in range(1000)]
    people = [amocrm.create_contact(f"Клиент {n}", notify=False)["id"] for n in range(20)]
    for n in range(100):
        amocrm.create_lead(f"Сделка {n}", 7001, 1001, price=1000 + n, contacts=[people[n % 20]],
                           products=[(elements[10 * n + i], 1 + i % 2) for i in range(10)], notify=False)
    core = Core(metrika_sandbox.url, clock=Clock(time.time()), sources={})
    core.sources["amocrm"] = AmoCrmSource(core.store.reserve_slot, backoff=0.01)
    shop = core.integration(connection={"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": "s" * 20})
    core.store.put_status_mapping(shop, [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS"}], 0)
    metrika_sandbox.counter(core.counter_id).order_statuses["new"] = {"id": "new", "type": "IN_PROGRESS"}
    calls = count_product_calls(core.store)
    core.backfill.start(shop, {"since": int(time.time()) - 86400})
    core.drain()
    job = core.backfill.status(shop)["backfill"]
    assert job["state"] == "done" and job["counts"]["orders_sent"] == 100, job
    assert calls == {"products": 1, "put_products": 1, "integrations_on_counter": 1}
    listed = metrika_sandbox.counter(core.counter_id).products
    assert len(listed) == 1000 and listed[str(elements[999])] == "Товар 999"
    assert sum(len(o["products"]) for o in metrika_sandbox.counter(core.counter_id).orders.values()) == 1000
    assert len([r for r in metrika_sandbox.requests if r["path"].endswith("/schema/products")]) == 1


# --- on the wire ----------------------------------------------------------------------------------------

def test_on_dynamodb_the_check_is_one_query_however_many_products_are_named(request, metrika_sandbox):
    """The store's calls are what the user pays for: before, the check was a BatchGetItem per 100 product
    ids named (strongly consistent, a read unit per item); now one Query of the list (260 small items:
    one page), and a write only for the new products."""
    import boto3

    from chalicelib.delivery import Sink
    from chalicelib.settings import get_settings
    from chalicelib.store.dynamodb import DynamoStore
    request.getfixturevalue("service_env")
    settings = get_settings()
    client = boto3.client("dynamodb")
    store = DynamoStore(client, settings.config_table, settings.state_table, quota_table=settings.quota_table)
    shop = f"products-{time.time_ns()}"
    # A counter of its own: an integration left on another test's counter would give that test's
    # integration an id prefix (shared_counter), and the suite's DynamoDB is shared by every test.
    integration = {"crm": "amocrm", "counter_id": 5353, "metrika_token": "y0_products", "timezone": "Europe/Moscow"}
    store.put_integration(shop, integration)
    store.put_products(shop, {f"p{i}": f"Product {i}" for i in range(250)})
    operations: list[str] = []
    client.meta.events.register("before-call.dynamodb", lambda model, **_: operations.append(model.name))
    core = Core(metrika_sandbox.url)
    sink = Sink(store, core.metrika_for(integration))
    assert sink.sync_products(shop, integration, {f"p{i}": {} for i in range(250)}) == 0
    assert operations == ["Query"]
    operations.clear()
    assert sink.sync_products(shop, integration, {f"p{i}": {} for i in range(260)}) == 10
    assert operations.count("Query") == 1 and operations.count("BatchWriteItem") == 1
    assert "BatchGetItem" not in operations and "GetItem" not in operations
    assert len(store.products(shop)) == 260 and len(metrika_sandbox.counter(5353).products) == 260
    store.delete_integration(shop)


# --- naming products the rows did not name ------------------------------------------------------------

def test_bitrix24_names_every_product_asked_for_in_one_batch_request(bitrix):
    """A list call answers one page of 50: before, a batch naming 120 unnamed products got 50 names and
    the rest showed as bare ids. Now 50 ids a sub-call, one `batch` request for up to 2,500."""
    from chalicelib.crm.bitrix24.source import Bitrix24Source
    bitrix.reset()
    bitrix.products.update({str(i): {"ID": str(i), "NAME": f"Товар {i}", "PRICE": "1.00"} for i in range(1, 131)})
    source = Bitrix24Source(lambda scope, interval, now: now, attempts=2, backoff=0.01)
    integration = {"crm": "bitrix24", "connection": {"webhook_url": bitrix.webhook_url}}
    asked = {str(i): {} for i in range(1, 121)} | {"row-7": {}, "999999": {}}  # a free-text row, an unknown id
    names = source.product_names(integration, asked)
    assert names == {str(i): f"Товар {i}" for i in range(1, 121)}
    assert [c["method"] for c in bitrix.calls] == ["batch"]
    assert source.product_names(integration, {"row-1": {}}) == {} and len(bitrix.calls) == 1  # nothing to ask


def test_bitrix24_product_naming_that_fails_raises_for_the_sink_to_log(bitrix):
    from chalicelib.crm.bitrix24.source import Bitrix24Source
    from chalicelib.errors import BridgeError
    bitrix.reset()
    bitrix.products.update({str(i): {"ID": str(i), "NAME": f"Товар {i}"} for i in range(1, 61)})
    bitrix.fail_method("crm.product.list", "", "ACCESS_DENIED", "Access denied")
    source = Bitrix24Source(lambda scope, interval, now: now, attempts=2, backoff=0.01)
    with pytest.raises(BridgeError):
        source.product_names({"crm": "bitrix24", "connection": {"webhook_url": bitrix.webhook_url}},
                             {str(i): {} for i in range(1, 61)})
