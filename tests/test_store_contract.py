"""The `StateStore` contract, run against both implementations: `MemoryStore` and `DynamoStore` on the
moto_server of conftest. Every test uses its own integration id (and quota scope), so tests do not
see each other's data; times are passed in (`now`, a settable clock), never slept."""
from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from chalicelib.crm import EntityRef
from chalicelib.errors import Unavailable
from chalicelib.store import CLAIM_GRACE_SECONDS, Hold, day_counter_expiry
from chalicelib.store.dynamodb import DynamoStore
from chalicelib.store.memory import MemoryStore

NOW = 1_750_000_000.0
LEASE = 300.0
SKEW = 600.0
YEAR_2100 = 4_102_444_800


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


def _dynamo_store(request, clock, client=None) -> DynamoStore:
    request.getfixturevalue("service_env")
    from chalicelib.settings import get_settings
    settings = get_settings()
    return DynamoStore(client or boto3.client("dynamodb"), settings.config_table, settings.state_table,
                       quota_table=settings.quota_table, clock=clock)


@pytest.fixture(params=["memory", "dynamodb"])
def store(request, clock):
    if request.param == "memory":
        return MemoryStore(clock=clock)
    return _dynamo_store(request, clock)


# moto_server applies each request in its own thread without a lock, so two conditional writes to one
# item can both pass their condition: it does not keep DynamoDB's promise that writes to an item are
# applied one at a time. Concurrency tests therefore run against a moto_server that serialises requests
# (their clients still interleave freely), which is the atomicity DynamoStore relies on.
SERIAL_MOTO = """
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
backend, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()
def serialised(environ, start_response):
    with lock:
        return list(backend(environ, start_response))
run_simple("127.0.0.1", int(sys.argv[1]), serialised, threaded=True, request_handler=MotoRequestHandler)
"""


@pytest.fixture(scope="module")
def serial_moto_url(service_env):
    import subprocess
    import sys
    from sandbox.local_stack import free_port, stop, wait_http
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERIAL_MOTO, str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", process=process)
        from tools.infra import Clients, ensure_resources
        from chalicelib.settings import get_settings
        ensure_resources(get_settings(), emulator=True, clients=Clients.create(f"http://127.0.0.1:{port}"))
        yield f"http://127.0.0.1:{port}"
    finally:
        stop([process])


@pytest.fixture(params=["memory", "dynamodb"])
def racing_store(request, clock):
    """`store` for tests that race calls from threads."""
    if request.param == "memory":
        return MemoryStore(clock=clock)
    url = request.getfixturevalue("serial_moto_url")
    return _dynamo_store(request, clock, boto3.client("dynamodb", endpoint_url=url))


@pytest.fixture
def iid():
    return "contract-" + uuid.uuid4().hex[:12]


def mark(store, iid, crm_id, event_time, *, now=NOW, action="update", kind="order", lease=LEASE):
    return store.mark_dirty(iid, EntityRef(kind, crm_id, int(event_time), action), now=now, lease_seconds=lease,
                            future_skew=SKEW)


def entity(store, iid, crm_id, kind="order"):
    return store.get_entity(iid, kind, crm_id)


def assert_plain(value):
    """No Decimal and no DynamoDB typed values anywhere."""
    if isinstance(value, dict):
        assert not (len(value) == 1 and next(iter(value)) in ("N", "S", "BOOL", "M", "L")), value
        for v in value.values():
            assert_plain(v)
    elif isinstance(value, (list, set, tuple)):
        for v in value:
            assert_plain(v)
    else:
        assert not isinstance(value, Decimal), value


def race(*calls):
    """Run the calls at the same moment from threads; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(run, c) for c in calls]]


@pytest.mark.parametrize("implementation", [MemoryStore, DynamoStore])
def test_implementations_have_the_protocols_signatures(implementation):
    import inspect
    from chalicelib.store import StateStore
    names = [n for n, v in vars(StateStore).items() if callable(v) and not n.startswith("_")]
    for base in StateStore.__mro__[1:]:
        names += [n for n, v in vars(base).items() if callable(v) and not n.startswith("_") and n not in names
                  and base.__module__ == "chalicelib.store"]
    assert len(names) == 67, sorted(names)  # every method of every concern
    for name in names:
        expected, actual = inspect.signature(getattr(StateStore, name)), inspect.signature(getattr(implementation, name))
        assert list(expected.parameters.values()) == list(actual.parameters.values()), name


# --- IntegrationStore --------------------------------------------------------------------------------

def test_integration_round_trip_and_listing(store, iid):
    assert store.get_integration(iid) is None
    assert iid not in store.list_integration_ids()
    config = {"crm": "amocrm", "counter_id": 4242, "connection": {"base_url": "https://x.amocrm.ru"}, "tags": ["a"]}
    store.put_integration(iid, config)
    store.put_integration(iid + "-b", {"crm": "bitrix24"})
    assert store.get_integration(iid) == config
    ids = store.list_integration_ids()
    assert ids == sorted(ids) and {iid, iid + "-b"} <= set(ids)
    store.put_integration(iid, {**config, "counter_id": 1})
    assert store.get_integration(iid, max_age=5)["counter_id"] == 1  # a write through this store shows at once


def test_get_integration_returns_copies_on_hit_and_miss(store, iid):
    config = {"crm": "amocrm", "connection": {"secret": "s1"}}
    store.put_integration(iid, config)
    config["connection"]["secret"] = "changed by the caller after the put"
    miss = store.get_integration(iid)
    miss["connection"]["secret"] = "mutated"
    hit = store.get_integration(iid, max_age=5)
    assert hit["connection"]["secret"] == "s1"
    hit["connection"]["secret"] = "mutated again"
    hit["crm"] = "bitrix24"
    assert store.get_integration(iid, max_age=5) == {"crm": "amocrm", "connection": {"secret": "s1"}}
    assert store.get_integration(iid) == {"crm": "amocrm", "connection": {"secret": "s1"}}


def test_mappings_and_cursors(store, iid):
    assert store.get_status_mapping(iid) is None
    assert store.get_attribute_mapping(iid) == []
    assert store.get_cursor(iid, "reconcile") is None
    entries = [{"crm_status": "142", "metrika_status": "PAID"}]
    store.put_status_mapping(iid, entries, 1_700_000_000)
    store.put_attribute_mapping(iid, [{"crm_field": "77", "attribute": "city"}])
    store.put_cursor(iid, "reconcile", 1_700_000_123)
    store.put_cursor(iid, "other", 5)
    assert store.get_status_mapping(iid) == {"entries": entries, "pushed_at": 1_700_000_000}
    assert store.get_attribute_mapping(iid) == [{"crm_field": "77", "attribute": "city"}]
    assert store.get_cursor(iid, "reconcile") == 1_700_000_123 and store.get_cursor(iid, "other") == 5
    store.put_status_mapping(iid, [], None)
    assert store.get_status_mapping(iid) == {"entries": [], "pushed_at": None}


def test_delete_integration_removes_everything_under_it(store, iid, clock):
    other = iid + "-other"
    for target in (iid, other):
        store.put_integration(target, {"crm": "amocrm"})
        store.put_status_mapping(target, [{"crm_status": "1"}], 1)
        store.put_attribute_mapping(target, [{"crm_field": "2"}])
        store.put_cursor(target, "reconcile", 3)
        store.put_cursor(target, "reconcile_position", 2)
        store.put_backfill(target, {"run_id": "r", "state": "running"})
        assert mark(store, target, "5", NOW)
        store.note_contacts_sent(target, {"9": "h9"})
        store.record_upload(target, "u1", kind="orders", rows=1, entities=[("order", "5")])
        store.put_products(target, {"p1": "Product"})
    assert store.delete_integration(iid) is True
    assert store.get_integration(iid) is None and iid not in store.list_integration_ids()
    assert store.get_status_mapping(iid) is None and store.get_attribute_mapping(iid) == []
    assert store.get_cursor(iid, "reconcile") is None and store.get_backfill(iid) is None
    assert store.get_cursor(iid, "reconcile_position") is None and store.get_cursor(other, "reconcile_position") == 2
    assert store.list_entities(iid) == [] and store.uploads(iid) == [] and store.products(iid) == {}
    assert store.claim(iid, "order", "5") is None
    assert store.delete_integration(iid) is False
    # the other integration is untouched
    assert store.get_integration(other) == {"crm": "amocrm"}
    assert [e["crm_id"] for e in store.list_entities(other)] == ["5", "9"]
    assert store.uploads(other)[0]["uploading_id"] == "u1" and store.products(other) == {"p1": "Product"}
    assert store.upload_entities(iid, "u1") == [] and store.upload_entities(other, "u1") == [("order", "5")]


# --- EntityStore: mark_dirty and the queue lease ----------------------------------------------------

def test_first_mark_takes_the_lease_and_records_the_event(store, iid):
    assert mark(store, iid, "5", 1_700_000_000, action="add") is True
    state = entity(store, iid, "5")
    assert state == {"kind": "order", "crm_id": "5", "event_time": 1_700_000_000, "dirty": True,
                     "last_action": "add", "queued_until": NOW + LEASE, "seq": 1}
    assert isinstance(state["event_time"], int)
    assert mark(store, iid, "5", 1_700_000_001, action="status", now=NOW + 10) is False  # lease live
    assert mark(store, iid, "5", 1_700_000_002, now=NOW + LEASE) is False  # live through its last second
    state = entity(store, iid, "5")
    assert (state["event_time"], state["last_action"], state["queued_until"]) == (1_700_000_002, "update", NOW + LEASE)


def test_a_stale_event_never_overwrites_a_newer_one(store, iid):
    assert mark(store, iid, "5", 1_700_000_200, action="status")
    store.claim(iid, "order", "5")  # even with no lease, a stale event takes nothing
    assert mark(store, iid, "5", 1_700_000_100, action="add") is False
    state = entity(store, iid, "5")
    assert (state["event_time"], state["last_action"]) == (1_700_000_200, "status")
    assert "queued_until" not in state


def test_equal_time_passes(store, iid):
    assert mark(store, iid, "5", 1_700_000_000, action="update")
    assert mark(store, iid, "5", 1_700_000_000, action="status") is False  # recorded; the pending message covers it
    assert entity(store, iid, "5")["last_action"] == "status"
    store.claim(iid, "order", "5")
    assert mark(store, iid, "5", 1_700_000_000, action="delete") is True
    assert entity(store, iid, "5")["last_action"] == "delete"


def test_a_bogus_future_time_is_overwritten_by_a_real_event(store, iid):
    assert mark(store, iid, "5", YEAR_2100)  # written by older code that trusted the CRM's clock
    store.claim(iid, "order", "5")
    assert mark(store, iid, "5", NOW - 60, action="status") is True
    state = entity(store, iid, "5")
    assert (state["event_time"], state["last_action"], state["dirty"]) == (NOW - 60, "status", True)
    # a stored time only slightly ahead (within the skew) is real: an older event stays stale
    assert mark(store, iid, "6", NOW + SKEW - 1)
    assert mark(store, iid, "6", NOW - 60) is False
    assert entity(store, iid, "6")["event_time"] == NOW + SKEW - 1


def test_an_expired_lease_is_taken_over(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)
    later = NOW + LEASE + 1  # the message was lost
    assert mark(store, iid, "5", 1_700_000_001, now=later) is True
    assert entity(store, iid, "5")["queued_until"] == later + LEASE
    assert mark(store, iid, "5", 1_700_000_002, now=later + 1) is False


def test_of_two_concurrent_marks_exactly_one_takes_a_lease(racing_store, iid):
    store = racing_store
    for round_ in range(5):
        crm_id = f"race-{round_}"
        # a fresh entity: one of two simultaneous webhooks queues
        assert sorted(race(lambda: mark(store, iid, crm_id, 1_700_000_000),
                           lambda: mark(store, iid, crm_id, 1_700_000_000))) == [False, True]
        # an expired lease: exactly one of two simultaneous webhooks takes it over
        later = NOW + LEASE + 1 + round_
        assert sorted(race(lambda: mark(store, iid, crm_id, 1_700_000_001, now=later, action="a"),
                           lambda: mark(store, iid, crm_id, 1_700_000_002, now=later, action="b"))) == [False, True]
        state = entity(store, iid, crm_id)
        assert state["queued_until"] == later + LEASE and state["event_time"] in (1_700_000_001, 1_700_000_002)


def test_release_lease_lets_the_next_event_queue(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)
    store.release_queue_lease(iid, "order", "5")
    assert "queued_until" not in entity(store, iid, "5")
    assert entity(store, iid, "5")["dirty"] is True
    assert mark(store, iid, "5", 1_700_000_000) is True
    assert mark(store, iid, "5", 1_700_000_000) is False  # leased again: a repeat queues nothing
    store.release_queue_lease(iid, "order", "absent")  # no state: nothing is created
    assert entity(store, iid, "absent") is None


def test_claim_removes_the_lease_and_returns_the_state(store, iid):
    assert store.claim(iid, "order", "5") is None
    assert mark(store, iid, "5", 1_700_000_000, action="status")
    claimed = store.claim(iid, "order", "5")
    assert claimed == {"kind": "order", "crm_id": "5", "event_time": 1_700_000_000, "dirty": True,
                       "last_action": "status", "claimed_at": int(NOW), "seq": 1}
    assert entity(store, iid, "5") == claimed
    assert mark(store, iid, "5", 1_700_000_001) is True  # a new event queues a new message
    assert store.claim(iid, "order", "absent") is None and entity(store, iid, "absent") is None


# --- EntityStore: the read before a delivery, and closing what was read -------------------------------

def test_delivery_states_reads_many_without_writing(store, iid):
    assert store.delivery_states(iid, [("order", "5")]) == {}
    assert mark(store, iid, "5", 1_700_000_000) and mark(store, iid, "6", 1_700_000_000, kind="contact")
    states = store.delivery_states(iid, [("order", "5"), ("contact", "6"), ("order", "absent"), ("order", "5")])
    assert set(states) == {("order", "5"), ("contact", "6")}
    assert states[("order", "5")] == entity(store, iid, "5") and states[("contact", "6")]["kind"] == "contact"
    assert states[("order", "5")]["seq"] == 1 and states[("order", "5")]["queued_until"] == NOW + LEASE
    assert_plain(states[("order", "5")])
    states[("order", "5")]["dirty"] = False  # the caller's copy
    assert entity(store, iid, "5")["dirty"] is True and "claimed_at" not in entity(store, iid, "5")
    many = [("order", str(i)) for i in range(150)]  # more than one BatchGetItem holds
    for _, crm_id in many[:120]:
        mark(store, iid, crm_id, 1_700_000_000)
    assert len(store.delivery_states(iid, many)) == 120


def test_seq_counts_every_write_that_owes_a_delivery(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)
    assert mark(store, iid, "5", 1_700_000_000) is False and entity(store, iid, "5")["seq"] == 2  # same second
    assert mark(store, iid, "5", 1_699_999_999) is False and entity(store, iid, "5")["seq"] == 2  # stale: nothing
    assert store.mark_resend(iid, "order", "5") == 1_700_000_000 and entity(store, iid, "5")["seq"] == 3
    store.note_attempt(iid, "order", "5", attempts=1, error={"m": "503"}, lease_until=NOW + 30)
    store.mark_dead_lettered(iid, "order", "5")
    store.clear_dead_lettered(iid, "order", "5")
    assert entity(store, iid, "5")["seq"] == 3  # the worker's own writes owe nothing new


def test_close_with_the_version_read_ends_the_lease_and_a_hold(store, iid, clock):
    assert mark(store, iid, "5", 1_700_000_000)
    seen = store.delivery_states(iid, [("order", "5")])[("order", "5")]
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h", row_hashes={"order:5": "r"},
                            uploading_id="u", version=seen["seq"]) is True
    state = entity(store, iid, "5")
    assert state["dirty"] is False and "queued_until" not in state and "owner" not in state
    assert mark(store, iid, "5", 1_700_000_001) is True  # the next event queues at once
    # an import's hold the delivery read is the delivery's to end
    hold = store.take_for_backfill(iid, "order", "7", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    seen = store.delivery_states(iid, [("order", "7")])[("order", "7")]
    assert store.mark_failed(iid, "order", "7", event_time=1_700_000_000, error={"m": "bad"}, version=seen["seq"])
    state = entity(store, iid, "7")
    assert state["last_error"] == {"m": "bad"} and "owner" not in state and "queued_until" not in state
    assert store.release_backfilled(hold, content_hash="h", uploading_id="u", last_order=None, facts=None) is False


@pytest.mark.parametrize("meanwhile", ["same-second event", "newer event", "resend", "import hold", "release"])
def test_close_with_the_version_read_fails_after_anything_owing_a_delivery(store, iid, meanwhile):
    crm_id = "5"
    if meanwhile == "import hold":
        store.take_for_backfill(iid, "order", crm_id, 1_700_000_000, "h", absent=True, now=NOW - LEASE - 1,
                                lease_seconds=LEASE)  # a crashed import's hold: its lease ran out
        assert mark(store, iid, crm_id, 1_700_000_000) is True  # a webhook takes the lease over
    elif meanwhile == "release":  # a stray message's delivery reads an entity an import holds
        hold = store.take_for_backfill(iid, "order", crm_id, 1_700_000_000, "h", absent=True, now=NOW,
                                       lease_seconds=LEASE)
    else:
        assert mark(store, iid, crm_id, 1_700_000_000)
    seen = store.delivery_states(iid, [("order", crm_id)])[("order", crm_id)]
    if meanwhile == "same-second event":
        assert mark(store, iid, crm_id, 1_700_000_000) is False  # the live lease: nothing queued
    elif meanwhile == "newer event":
        assert mark(store, iid, crm_id, 1_700_000_005) is False
    elif meanwhile == "resend":
        store.mark_resend(iid, "order", crm_id)
    elif meanwhile == "import hold":
        assert store.take_for_backfill(iid, "order", crm_id, 1_700_000_000, "h", now=NOW, lease_seconds=LEASE)
    else:
        assert store.release_backfilled(hold, content_hash="h", uploading_id="u", last_order=None, facts=None)
    before = entity(store, iid, crm_id)
    for close in (lambda: store.mark_clean(iid, "order", crm_id, event_time=seen["event_time"], content_hash="x",
                                           row_hashes={}, uploading_id="u2", version=seen["seq"]),
                  lambda: store.mark_failed(iid, "order", crm_id, event_time=seen["event_time"], error={"m": "x"},
                                            version=seen["seq"])):
        assert close() is False
        assert entity(store, iid, crm_id) == before  # nothing written


def test_an_event_in_the_hold_s_own_second_is_not_absorbed_by_the_release(store, iid):
    """Recorded during an import's hold with the very time the import read: the release refuses (the
    caller queues the entity), so the live path delivers the change the import's read may have missed."""
    hold = store.take_for_backfill(iid, "order", "5", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert mark(store, iid, "5", 1_700_000_000) is False  # the hold's lease is live: nothing queued
    assert store.release_backfilled(hold, content_hash="h", uploading_id="u", last_order=None, facts=None) is False
    assert entity(store, iid, "5")["dirty"] is True


def test_close_of_a_legacy_item_without_seq(store, iid):
    """Items recorded before `seq` existed: version 0 stands for none, and any event since adds one."""
    assert mark(store, iid, "5", 1_700_000_000)
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h", row_hashes={},
                            uploading_id=None, version=0) is False  # it has seq 1: recorded after the read
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h", row_hashes={},
                            uploading_id=None, version=1) is True


def test_renew_queue_lease_only_when_the_lease_is_still_the_one_read(store, iid):
    assert store.renew_queue_lease(iid, "order", "absent", seen=None, until=NOW + 10) is False
    assert entity(store, iid, "absent") is None  # nothing created
    assert mark(store, iid, "5", 1_700_000_000)
    read = store.delivery_states(iid, [("order", "5")])[("order", "5")]["queued_until"]
    assert store.renew_queue_lease(iid, "order", "5", seen=read + 1, until=NOW + 10) is False
    assert store.renew_queue_lease(iid, "order", "5", seen=read, until=NOW + 900.5) is True
    assert entity(store, iid, "5")["queued_until"] == NOW + 900.5
    assert store.renew_queue_lease(iid, "order", "5", seen=read, until=NOW + 10) is False  # another's now
    store.claim(iid, "order", "5")  # no lease: `seen` None
    assert store.renew_queue_lease(iid, "order", "5", seen=None, until=NOW + 20) is True
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h", row_hashes={},
                            uploading_id=None, version=1) is True
    assert store.renew_queue_lease(iid, "order", "5", seen=None, until=NOW + 30) is False  # clean: owes nothing


# --- EntityStore: outcomes ---------------------------------------------------------------------------

def test_mark_clean_records_what_was_sent(store, iid, clock):
    assert mark(store, iid, "5", 1_700_000_000)
    store.note_attempt(iid, "order", "5", attempts=2, error={"message": "503"}, lease_until=NOW + 30)
    store.claim(iid, "order", "5")
    clock.t = NOW + 50
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h1",
                            row_hashes={"order:5": "r1", "contact:9": "r2"}, uploading_id="up-1",
                            last_order='{"id": "5"}', facts={"late": False, "revenue": 12.5}) is True
    state = entity(store, iid, "5")
    assert state == {"kind": "order", "crm_id": "5", "event_time": 1_700_000_000, "dirty": False,
                     "last_action": "update", "content_hash": "h1", "row_hashes": {"order:5": "r1", "contact:9": "r2"},
                     "uploading_id": "up-1", "sent_at": int(NOW + 50), "attempts": 0, "last_order": '{"id": "5"}',
                     "facts": {"late": False, "revenue": 12.5}, "claimed_at": int(NOW), "seq": 1}
    # None → "" for the upload and the order; facts not given are kept; row hashes None are forgotten
    assert mark(store, iid, "5", 1_700_000_001) and store.claim(iid, "order", "5")
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_001, content_hash="h2", row_hashes=None,
                            uploading_id=None)
    state = entity(store, iid, "5")
    assert (state["uploading_id"], state["last_order"], state["facts"]) == ("", "", {"late": False, "revenue": 12.5})
    assert "row_hashes" not in state and state["content_hash"] == "h2"


def test_mark_clean_and_mark_failed_refuse_after_a_newer_event(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)
    store.claim(iid, "order", "5")
    assert mark(store, iid, "5", 1_700_000_005) is True
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h", row_hashes={},
                            uploading_id="u") is False
    assert store.mark_failed(iid, "order", "5", event_time=1_700_000_000, error={"message": "bad"}) is False
    state = entity(store, iid, "5")
    assert state["dirty"] is True and state["event_time"] == 1_700_000_005
    assert "content_hash" not in state and "last_error" not in state
    assert store.mark_clean(iid, "order", "absent", event_time=1, content_hash="h", row_hashes={},
                            uploading_id="u") is False
    assert entity(store, iid, "absent") is None


def test_mark_failed_parks(store, iid, clock):
    assert mark(store, iid, "5", 1_700_000_000)
    clock.t = NOW + 7
    store.claim(iid, "order", "5")  # as the worker does before closing
    assert store.mark_failed(iid, "order", "5", event_time=1_700_000_000,
                             error={"code": "unmapped_stage", "crm_status": "142"}) is True
    state = entity(store, iid, "5")
    assert state["dirty"] is False and state["failed_at"] == int(NOW + 7)
    assert state["last_error"] == {"code": "unmapped_stage", "crm_status": "142"}


def test_note_attempt_leaves_an_entity_delivered_meanwhile_alone(store, iid):
    """A duplicate of the message delivered the entity while this delivery failed: no lease, no attempt,
    no row hashes on the clean entity (its retry message finds nothing to do), and no item created."""
    assert mark(store, iid, "5", 1_700_000_000)
    seen = store.delivery_states(iid, [("order", "5")])[("order", "5")]
    assert store.mark_clean(iid, "order", "5", event_time=seen["event_time"], content_hash="h",
                            row_hashes={"order:5": "r"}, uploading_id="u", version=seen["seq"])
    before = entity(store, iid, "5")
    assert store.note_attempt(iid, "order", "5", attempts=1, error={"message": "503"}, lease_until=NOW + 60,
                              row_hashes={"contact:9": "r9"}) is False
    assert entity(store, iid, "5") == before and "queued_until" not in before
    assert mark(store, iid, "5", 1_700_000_001) is True  # the next event queues at once
    assert store.note_attempt(iid, "order", "absent", attempts=1, error={"m": 1}, lease_until=NOW + 60) is False
    assert entity(store, iid, "absent") is None


def test_note_attempt_stores_the_retry_and_the_rows_already_accepted(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)
    store.claim(iid, "order", "5")
    store.note_attempt(iid, "order", "5", attempts=1, error={"message": "429"}, lease_until=NOW + 12.5,
                       row_hashes={"contact:9": "r9"})
    state = entity(store, iid, "5")
    assert (state["attempts"], state["last_error"], state["queued_until"]) == (1, {"message": "429"}, NOW + 12.5)
    assert state["row_hashes"] == {"contact:9": "r9"} and isinstance(state["queued_until"], float)
    assert state["dirty"] is True
    assert mark(store, iid, "5", 1_700_000_001, now=NOW) is False  # the retry message holds the lease
    store.note_attempt(iid, "order", "5", attempts=2, error={"message": "503"}, lease_until=NOW + 20)
    state = entity(store, iid, "5")
    assert state["attempts"] == 2 and state["row_hashes"] == {"contact:9": "r9"}  # not given: kept


def test_forget_content(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)
    store.claim(iid, "order", "5")  # as the worker does before closing
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h", row_hashes={"o": "r"},
                            uploading_id="u", last_order="{}")
    store.forget_content(iid, "order", "5")
    state = entity(store, iid, "5")
    assert not {"content_hash", "last_order", "row_hashes"} & set(state)
    assert state["uploading_id"] == "u" and state["event_time"] == 1_700_000_000
    store.forget_content(iid, "order", "absent")
    assert entity(store, iid, "absent") is None


def test_mark_dead_lettered_flags_only_an_entity_that_owes_a_delivery(store, iid, clock):
    assert store.mark_dead_lettered(iid, "order", "absent") is False
    assert entity(store, iid, "absent") is None  # nothing created
    assert mark(store, iid, "5", 1_700_000_000)
    store.claim(iid, "order", "5")
    clock.t = NOW + 3
    assert store.mark_dead_lettered(iid, "order", "5") is True
    assert entity(store, iid, "5")["dead_lettered_at"] == int(NOW + 3)
    assert mark(store, iid, "6", 1_700_000_000)
    store.claim(iid, "order", "6")
    assert store.mark_clean(iid, "order", "6", event_time=1_700_000_000, content_hash="h", row_hashes={},
                            uploading_id="u")
    assert store.mark_dead_lettered(iid, "order", "6") is False  # delivered: nothing owed, nothing flagged
    assert "dead_lettered_at" not in entity(store, iid, "6")


def test_clear_dead_lettered_removes_only_the_flag_and_creates_nothing(store, iid, clock):
    assert mark(store, iid, "5", 1_700_000_000)
    store.claim(iid, "order", "5")
    assert store.mark_dead_lettered(iid, "order", "5")
    before = entity(store, iid, "5")
    store.clear_dead_lettered(iid, "order", "5")
    after = entity(store, iid, "5")
    assert "dead_lettered_at" not in after
    assert after == {k: v for k, v in before.items() if k != "dead_lettered_at"}  # dirty, lease, claim kept
    store.clear_dead_lettered(iid, "order", "5")  # twice: nothing to remove, no error
    store.clear_dead_lettered(iid, "order", "absent")
    assert entity(store, iid, "absent") is None  # nothing created
    assert entity(store, iid, "5") == after


def test_the_dead_letter_flag_goes_when_the_entity_is_settled_or_queued_again(store, iid):
    def flagged(crm_id):
        assert mark(store, iid, crm_id, 1_700_000_000)
        store.claim(iid, "order", crm_id)
        assert store.mark_dead_lettered(iid, "order", crm_id)

    for crm_id in ("clean", "parked", "retried", "superseded"):
        flagged(crm_id)
    assert store.mark_clean(iid, "order", "clean", event_time=1_700_000_000, content_hash="h", row_hashes={},
                            uploading_id="u")
    assert store.mark_failed(iid, "order", "parked", event_time=1_700_000_000, error={"message": "bad"})
    store.note_attempt(iid, "order", "retried", attempts=1, error={"message": "503"}, lease_until=NOW + 60)
    store.note_attempt(iid, "order", "retried", attempts=2, error={"message": "503"}, lease_until=NOW + 60,
                       row_hashes={"o": "r"})  # both forms of the update
    for crm_id in ("clean", "parked", "retried"):
        assert "dead_lettered_at" not in entity(store, iid, crm_id), crm_id
    # A newer event during the delivery: the close is refused and the flag stays with the dirty entity
    # (the event's own message, once delivered, clears it).
    assert mark(store, iid, "superseded", 1_700_000_009)
    assert store.mark_clean(iid, "order", "superseded", event_time=1_700_000_000, content_hash="h", row_hashes={},
                            uploading_id="u") is False
    assert entity(store, iid, "superseded")["dead_lettered_at"] == int(NOW)
    # A history import releasing an entity it holds again (an interrupted run) drops the flag too.
    hold = store.take_for_backfill(iid, "order", "held", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert store.mark_dead_lettered(iid, "order", "held")
    again = store.take_for_backfill(iid, "order", "held", 1_700_000_000, "h", now=NOW, lease_seconds=LEASE)
    assert again is not None and again.owner == hold.owner and "dead_lettered_at" in again.state
    assert store.release_backfilled(again, content_hash="h", uploading_id="u", last_order=None, facts=None)
    assert "dead_lettered_at" not in entity(store, iid, "held")


def test_stuck_entities_are_dirty_without_a_live_lease(store, iid):
    assert mark(store, iid, "no-lease", 1_700_000_000)
    store.release_queue_lease(iid, "order", "no-lease")
    assert mark(store, iid, "live", 1_700_000_000)
    assert mark(store, iid, "expired", 1_700_000_000, now=NOW - LEASE - 10)
    assert mark(store, iid, "clean", 1_700_000_000)
    store.claim(iid, "order", "clean")  # as the worker does before closing
    assert store.mark_clean(iid, "order", "clean", event_time=1_700_000_000, content_hash="h", row_hashes={},
                            uploading_id="u")
    store.release_queue_lease(iid, "order", "clean")
    assert mark(store, iid, "c-lost", 1_700_000_000, kind="contact", now=NOW - LEASE - 10)
    assert store.take_for_backfill(iid, "order", "held", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert store.take_for_backfill(iid, "order", "held-crashed", 1_700_000_000, "h", absent=True,
                                   now=NOW - LEASE - 10, lease_seconds=LEASE)
    stuck = store.stuck_entities(iid, now=NOW)
    assert [(e["kind"], e["crm_id"]) for e in stuck] == [
        ("order", "expired"), ("order", "held-crashed"), ("order", "no-lease"), ("contact", "c-lost")]
    assert all(e["dirty"] for e in stuck)
    assert store.stuck_entities(iid, now=NOW - LEASE - 10) == [e for e in stuck if e["crm_id"] == "no-lease"]
    # Dead-lettered: every receive of its message failed; it waits for a redrive or a replay, not the sweep.
    assert store.mark_dead_lettered(iid, "order", "expired")
    assert [e["crm_id"] for e in store.stuck_entities(iid, now=NOW)] == ["held-crashed", "no-lease", "c-lost"]


def test_list_existing_and_content_hashes(store, iid):
    for crm_id in ("10", "2", "b"):
        assert mark(store, iid, crm_id, 1_700_000_000)
        assert mark(store, iid, crm_id, 1_700_000_000, kind="contact")
    store.note_contacts_sent(iid, {"c1": "hc1"})
    assert [(e["kind"], e["crm_id"]) for e in store.list_entities(iid)] == [
        ("order", "10"), ("order", "2"), ("order", "b"),
        ("contact", "10"), ("contact", "2"), ("contact", "b"), ("contact", "c1")]
    many = [("order", str(i)) for i in range(150)] + [("contact", "c1"), ("contact", "b"), ("order", "b")]
    assert store.existing_entities(iid, many) == {("order", "10"), ("order", "2"), ("order", "b"),
                                                  ("contact", "c1"), ("contact", "b")}
    assert store.existing_entities(iid, []) == set()
    for crm_id in ("2", "10"):
        store.claim(iid, "order", crm_id)  # as the worker does before closing
        assert store.mark_clean(iid, "order", crm_id, event_time=1_700_000_000, content_hash=f"h{crm_id}",
                                row_hashes={}, uploading_id="u")
    ids = [str(i) for i in range(150)] + ["b", "2"]
    assert store.content_hashes(iid, "order", ids) == {"2": "h2", "10": "h10"}
    assert store.content_hashes(iid, "contact", ["c1", "2", "nope"]) == {"c1": "hc1"}


def test_delivered_versions_name_only_entities_metrika_holds_as_recorded(store, iid):
    """Reconciliation skips what these name (issue 15): so only clean entities with a content hash that
    no history import holds. Dirty, parked, replayed, held, absent or of another kind: left out."""
    def delivered(crm_id, at=1_700_000_000, content_hash=None):
        assert mark(store, iid, crm_id, at)
        store.claim(iid, "order", crm_id)
        assert store.mark_clean(iid, "order", crm_id, event_time=at, content_hash=content_hash or f"h{crm_id}",
                                row_hashes={}, uploading_id="u")

    for crm_id in ("clean", "dirty-again", "replayed", "held", "resent", "no-hash"):
        delivered(crm_id)
    delivered("later", at=1_700_000_500)
    assert mark(store, iid, "dirty-again", 1_700_000_100)
    assert mark(store, iid, "dirty", 1_700_000_000)
    assert mark(store, iid, "parked-now", 1_700_000_000)
    store.claim(iid, "order", "parked-now")
    assert store.mark_failed(iid, "order", "parked-now", event_time=1_700_000_000, error={"kind": "permanent"})
    store.forget_content(iid, "order", "replayed")
    assert store.mark_resend(iid, "order", "resent") == 1_700_000_000
    assert store.take_for_backfill(iid, "order", "held", 1_700_000_900, "other", now=NOW, lease_seconds=LEASE)
    store.claim(iid, "order", "no-hash")
    assert store.mark_clean(iid, "order", "no-hash", event_time=1_700_000_000, content_hash="", row_hashes={},
                            uploading_id=None)
    assert mark(store, iid, "clean", 1_700_000_000, kind="contact")  # a contact of the same id: another entity
    many = [str(i) for i in range(120)] + ["clean", "later", "dirty-again", "dirty", "parked-now", "replayed",
                                           "resent", "held", "no-hash", "clean"]
    got = store.delivered_versions(iid, "order", many)
    assert got == {"clean": {"event_time": 1_700_000_000, "content_hash": "hclean"},
                   "later": {"event_time": 1_700_000_500, "content_hash": "hlater"}}
    assert all(isinstance(v["event_time"], int) for v in got.values())
    got["clean"]["content_hash"] = "changed by the caller"
    assert store.delivered_versions(iid, "order", ["clean"])["clean"]["content_hash"] == "hclean"
    assert store.delivered_versions(iid, "contact", ["clean"]) == {}
    assert store.delivered_versions(iid, "order", []) == {}
    assert store.delivered_versions(f"{iid}-other", "order", ["clean"]) == {}


def test_note_contacts_sent_only_where_nothing_is_pending_or_held(store, iid):
    assert mark(store, iid, "pending", 1_700_000_000, kind="contact")
    assert mark(store, iid, "clean", 1_700_000_000, kind="contact")
    store.claim(iid, "contact", "clean")  # as the worker does before closing
    assert store.mark_clean(iid, "contact", "clean", event_time=1_700_000_000, content_hash="old", row_hashes={},
                            uploading_id="u")
    hold = store.take_for_backfill(iid, "contact", "held", 1_700_000_000, "h", absent=True, now=NOW,
                                   lease_seconds=LEASE)
    assert hold is not None
    store.note_contacts_sent(iid, {"new": "h-new", "pending": "h-p", "clean": "h-c", "held": "h-h"})
    assert entity(store, iid, "new", "contact") == {"kind": "contact", "crm_id": "new", "content_hash": "h-new",
                                                    "event_time": 0, "dirty": False}
    assert entity(store, iid, "clean", "contact")["content_hash"] == "h-c"
    assert entity(store, iid, "clean", "contact")["event_time"] == 1_700_000_000
    assert "content_hash" not in entity(store, iid, "pending", "contact")
    assert "content_hash" not in entity(store, iid, "held", "contact")
    assert mark(store, iid, "new", 5, kind="contact") is True  # any real change is newer than 0


def test_returned_state_is_a_copy(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)
    store.claim(iid, "order", "5")  # as the worker does before closing
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h", row_hashes={"o": "r"},
                            uploading_id="u", facts={"nested": {"a": [1]}})
    for state in (entity(store, iid, "5"), store.list_entities(iid)[0]):
        state["row_hashes"]["o"] = "mutated"
        state["facts"]["nested"]["a"].append(2)
        state["dirty"] = True
    state = entity(store, iid, "5")
    assert state["row_hashes"] == {"o": "r"} and state["facts"] == {"nested": {"a": [1]}} and state["dirty"] is False


# --- UploadStore, ProductStore -----------------------------------------------------------------------

def test_uploads(store, iid, clock):
    assert store.uploads(iid) == [] and store.pending_uploads(iid) == [] and store.recent_uploads(iid, limit=50) == []
    store.record_upload(iid, "u2", kind="contacts", rows=3)
    clock.t = NOW + 1
    store.record_upload(iid, "u1", kind="orders", rows=7)
    pending = [{"uploading_id": "u2", "kind": "contacts", "rows": 3, "status": "SENT", "sent_at": int(NOW),
                "expires_at": int(NOW) + 14 * 86400},
               {"uploading_id": "u1", "kind": "orders", "rows": 7, "status": "SENT", "sent_at": int(NOW + 1),
                "expires_at": int(NOW + 1) + 14 * 86400}]
    assert store.pending_uploads(iid) == pending  # oldest sent first
    assert store.uploads(iid) == pending[::-1] and store.recent_uploads(iid, limit=50) == []
    clock.t = NOW + 60
    store.confirm_upload(iid, "u1", "PASSED", 7)
    store.confirm_upload(iid, "u2", "FAILED", None)
    final = [{"uploading_id": "u1", "kind": "orders", "rows": 7, "status": "PASSED", "sent_at": int(NOW + 1),
              "elements_count": 7, "confirmed_at": int(NOW + 60), "expires_at": int(NOW + 60) + 30 * 86400},
             {"uploading_id": "u2", "kind": "contacts", "rows": 3, "status": "FAILED", "sent_at": int(NOW),
              "elements_count": 0, "confirmed_at": int(NOW + 60), "expires_at": int(NOW + 60) + 30 * 86400}]
    assert store.uploads(iid) == final and store.pending_uploads(iid) == []
    assert store.recent_uploads(iid, limit=50) == final  # newest sent first
    assert store.recent_uploads(iid, limit=1) == final[:1] and store.recent_uploads(iid, limit=0) == []
    assert_plain(store.recent_uploads(iid, limit=5))


def test_recent_uploads_are_the_last_sent_and_the_limit_is_checked(store, iid, clock):
    for n in range(12):
        clock.t = NOW + (n // 2)  # two uploads in each second: the uploading id orders them
        store.record_upload(iid, f"u{n:02d}", kind="orders", rows=1)
    clock.t = NOW + 100
    for n in range(12):
        store.confirm_upload(iid, f"u{n:02d}", "PASSED", 1)
    assert [u["uploading_id"] for u in store.recent_uploads(iid, limit=5)] == ["u11", "u10", "u09", "u08", "u07"]
    returned = store.recent_uploads(iid, limit=3)
    returned[0]["status"] = "changed by the caller"
    assert store.recent_uploads(iid, limit=1)[0]["status"] == "PASSED"
    for bad in (-1, 1001, 2.5, "5", True, None, 10 ** 2000):
        with pytest.raises(ValueError, match="limit"):
            store.recent_uploads(iid, limit=bad)


def test_confirming_an_upload_not_pending_changes_nothing(store, iid, clock):
    store.confirm_upload(iid, "never-recorded", "PASSED", 1)
    assert store.uploads(iid) == [] and store.recent_uploads(iid, limit=5) == []
    store.record_upload(iid, "u1", kind="orders", rows=1, entities=[("order", "5")])
    clock.t = NOW + 60
    store.confirm_upload(iid, "u1", "FAILED", 0, resent=1)
    clock.t = NOW + 120  # a second confirmation (another run that read it pending) keeps the first
    store.confirm_upload(iid, "u1", "PASSED", 1)
    assert [(u["status"], u["confirmed_at"], u["resent"]) for u in store.uploads(iid)] == [("FAILED", int(NOW + 60), 1)]
    assert len(store.recent_uploads(iid, limit=5)) == 1


def test_recording_an_id_again_replaces_the_pending_upload(store, iid, clock):
    store.record_upload(iid, "u1", kind="orders", rows=1)
    clock.t = NOW + 5
    store.record_upload(iid, "u1", kind="orders", rows=2)
    assert [(u["rows"], u["sent_at"]) for u in store.pending_uploads(iid)] == [(2, int(NOW + 5))]


def stored_expiry(store, kind: str, *key: str) -> int | None:
    """`expires_at` as written for an item the protocol does not return: read raw from DynamoDB (the
    attribute its TTL acts on), or the copy MemoryStore keeps. kind "carried": (integration id,
    uploading id), first part; "day": (quota key, day)."""
    if isinstance(store, MemoryStore):
        return store.expiry(kind, *key)
    pk, sk = ((f"INTEGRATION#{key[0]}", f"CARRIED#{key[1]}#0") if kind == "carried"
              else (f"QUOTA#{key[0]}", f"DAY#{key[1]}"))
    for table in filter(None, (getattr(store, "_quota", None), store._state)):  # quota items may move tables
        item = boto3.client("dynamodb").get_item(TableName=table, Key={"pk": {"S": pk}, "sk": {"S": sk}},
                                                 ConsistentRead=True).get("Item")
        if item:
            return int(item["expires_at"]["N"]) if "expires_at" in item else None
    return None


def test_an_uploads_entity_list_outlives_every_chance_to_confirm_it():
    from chalicelib.operations import GIVE_UP_AFTER
    from chalicelib.store import CARRIED_TTL, UPLOAD_RECORD_TTL
    # Confirmed (or given up) within GIVE_UP_AFTER of its sending, a FAILED upload still finds the
    # entities to send again; a list a crash left behind goes with its record's 30 days.
    assert CARRIED_TTL >= GIVE_UP_AFTER + UPLOAD_RECORD_TTL


def test_every_upload_record_expires(store, iid, clock):
    store.record_upload(iid, "u1", kind="orders", rows=2, entities=[("order", "5"), ("contact", "9")])
    store.record_upload(iid, "u2", kind="orders", rows=1)  # nothing carried: no list to expire
    # Still SENT: the record expires after 14 days, should confirmation never run again; the list it
    # carries expires only after the upload could no longer be confirmed, should a crash leave it behind.
    assert [u["expires_at"] for u in store.pending_uploads(iid)] == [int(NOW) + 14 * 86400] * 2
    assert stored_expiry(store, "carried", iid, "u1") == int(NOW) + 32 * 86400
    assert stored_expiry(store, "carried", iid, "u2") is None
    for status, at in (("FAILED", NOW + 7200), ("UNCONFIRMED", NOW + 2 * 86400)):
        clock.t = at
        store.confirm_upload(iid, "u1" if status == "FAILED" else "u2", status, None, resent=1 if status == "FAILED" else None)
    by_id = {u["uploading_id"]: u for u in store.uploads(iid)}
    assert by_id["u1"]["expires_at"] == int(NOW + 7200) + 30 * 86400
    assert by_id["u2"]["expires_at"] == int(NOW + 2 * 86400) + 30 * 86400
    assert store.upload_entities(iid, "u1") == [] and stored_expiry(store, "carried", iid, "u1") is None


def test_a_pending_upload_expires_before_its_entity_list_and_after_confirmation_gives_up():
    from chalicelib.operations import GIVE_UP_AFTER, UNCONFIRMED_AFTER
    from chalicelib.store import CARRIED_TTL, PENDING_UPLOAD_TTL
    # Reported (6 h) and given up (2 days) long before it expires; DynamoDB may delete it up to two days
    # late and reads return it until then, so its list must outlast that too.
    assert UNCONFIRMED_AFTER < GIVE_UP_AFTER < PENDING_UPLOAD_TTL and PENDING_UPLOAD_TTL + 2 * 86400 < CARRIED_TTL


def test_products(store, iid):
    assert store.products(iid) == {}
    names = {f"p{i:02d}": f"Product {i}" for i in range(30)}  # more than one batch write of 25
    store.put_products(iid, names)
    store.put_products(iid, {"p00": "Renamed", "p01": ""})
    assert store.products(iid) == {**names, "p00": "Renamed", "p01": ""}
    assert list(store.products(iid)) == sorted(names)
    listed = store.products(iid)
    listed["p02"] = "changed by the caller"
    assert store.products(iid)["p02"] == "Product 2"  # the caller's copy
    assert store.products(f"{iid}-other") == {}


# --- CrmAccountStore ---------------------------------------------------------------------------------

def test_crm_accounts_are_kept_per_scope_replaced_whole_and_returned_as_copies(store):
    scope, other = "amocrm:" + uuid.uuid4().hex[:16], "amocrm:" + uuid.uuid4().hex[:16]
    assert store.get_crm_account(scope) is None
    account = {"base_url": "https://shop.amocrm.ru", "country": "BY", "currency": "USD", "read_at": int(NOW)}
    store.put_crm_account(scope, account)
    account["currency"] = "changed by the caller after the put"
    got = store.get_crm_account(scope)
    assert got == {"base_url": "https://shop.amocrm.ru", "country": "BY", "currency": "USD", "read_at": int(NOW)}
    assert_plain(got) and isinstance(got["read_at"], int)
    got["country"] = "mutated"
    assert store.get_crm_account(scope)["country"] == "BY"
    assert store.get_crm_account(other) is None
    store.put_crm_account(scope, {"base_url": "https://shop.amocrm.ru", "country": "", "read_at": int(NOW) + 1})
    assert store.get_crm_account(scope) == {"base_url": "https://shop.amocrm.ru", "country": "", "read_at": int(NOW) + 1}



def test_an_expired_crm_account_keeps_its_facts_read_at_zero_and_a_missing_one_stays_missing(store):
    scope = f"amocrm:{uuid.uuid4().hex}"
    store.expire_crm_account(scope)  # nothing kept: nothing written
    assert store.get_crm_account(scope) is None
    store.put_crm_account(scope, {"base_url": "https://shop.amocrm.ru", "country": "BY", "currency": "USD",
                                  "read_at": int(NOW)})
    store.expire_crm_account(scope)
    assert store.get_crm_account(scope) == {"base_url": "https://shop.amocrm.ru", "country": "BY", "currency": "USD",
                                            "read_at": 0}


# --- QuotaStore --------------------------------------------------------------------------------------

def test_reserve_slot_spaces_callers(store):
    scope = "rate-" + uuid.uuid4().hex
    assert store.reserve_slot(scope, 0.5, NOW) == NOW
    assert store.reserve_slot(scope, 0.5, NOW + 0.1) == pytest.approx(NOW + 0.5)
    assert store.reserve_slot(scope, 0.5, NOW + 0.2) == pytest.approx(NOW + 1.0)
    assert store.reserve_slot(scope, 0.5, NOW + 10) == NOW + 10  # idle again


def test_count_request_stops_at_the_budget(store):
    key = "token-" + uuid.uuid4().hex
    assert store.requests_on(key, "2025-06-15") == 0
    assert [store.count_request(key, "2025-06-15", 3) for _ in range(5)] == [1, 2, 3, None, None]
    assert store.requests_on(key, "2025-06-15") == 3
    assert store.count_request(key, "2025-06-16", 3) == 1  # a new day, a new budget


def test_day_counters_expire_3_days_after_their_utc_day(store):
    key = "token-" + uuid.uuid4().hex
    assert store.count_request(key, "2024-02-29", 5) == 1  # a leap day; 2024-03-01T00:00Z = 1709251200
    assert stored_expiry(store, "day", key, "2024-02-29") == 1709251200 + 3 * 86400
    assert store.count_request(key, "2100-12-31", 5) == 1  # the year 2100: 2101-01-01T00:00Z = 4133980800
    assert stored_expiry(store, "day", key, "2100-12-31") == 4133980800 + 3 * 86400
    assert store.count_request(key, "2024-02-29", 1) is None  # refused: nothing written, expiry unchanged
    assert stored_expiry(store, "day", key, "2024-02-29") == 1709251200 + 3 * 86400
    assert store.requests_on(key, "2024-02-29") == 1
    for bad in ("2024-02-30", "29.02.2024", "2024-02-29T00:00", ""):
        with pytest.raises(ValueError):
            store.count_request(key, bad, 5)
        assert store.requests_on(key, bad) == 0  # nothing counted without an expiry


def test_leases_are_exclusive_and_expire(store):
    scope = "lease-" + uuid.uuid4().hex
    assert store.acquire_lease(scope, 2, "a", NOW, 60) == 0
    assert store.acquire_lease(scope, 2, "b", NOW, 60) == 1
    assert store.acquire_lease(scope, 2, "c", NOW, 60) is None
    store.release_lease(scope, 0, "not-the-owner")
    assert store.acquire_lease(scope, 2, "c", NOW + 1, 60) is None
    store.release_lease(scope, 0, "a")
    assert store.acquire_lease(scope, 2, "c", NOW + 1, 60) == 0
    assert store.acquire_lease(scope, 2, "d", NOW + 61, 60) == 1  # b's lease expired: free again
    store.release_lease(scope, 1, "b")  # b's expired lease was taken over: not b's to free
    assert store.acquire_lease(scope, 2, "e", NOW + 61, 60) is None  # c holds 0 through NOW + 61, d holds 1


def test_concurrent_callers_share_limits(racing_store):
    store, scope = racing_store, uuid.uuid4().hex
    for round_ in range(3):
        now = NOW + 100 * round_
        starts = race(*[lambda: store.reserve_slot(scope, 0.5, now) for _ in range(4)])
        assert sorted(starts) == pytest.approx([now, now + 0.5, now + 1, now + 1.5])
        day = f"2025-06-{10 + round_}"
        counts = race(*[lambda: store.count_request(scope, day, 2) for _ in range(4)])
        assert sorted(counts, key=str) == [1, 2, None, None] and store.requests_on(scope, day) == 2
        slots = race(*[lambda owner=owner: store.acquire_lease(scope, 2, owner, now, 60) for owner in "abcd"])
        assert sorted(slots, key=str) == [0, 1, None, None]


def test_day_expiry_is_three_days_after_the_day_ends():
    assert day_counter_expiry("2025-06-15") == 1_750_291_200  # 2025-06-19T00:00:00Z
    assert day_counter_expiry("2024-02-29") - day_counter_expiry("2024-02-28") == 86400
    assert day_counter_expiry("2100-12-31") == 4_134_240_000  # 2101-01-04T00:00:00Z
    for bad in ("2025-02-30", "2025-6-15x", "", "9" * 2000):
        with pytest.raises(ValueError):
            day_counter_expiry(bad)


def test_day_counts_live_in_the_quota_table_with_their_expiry(request, clock):
    """Counts and leases are the quota table's (shared by stages), none in the stage's state table."""
    from chalicelib.settings import get_settings
    store, settings, client = _dynamo_store(request, clock), get_settings(), boto3.client("dynamodb")
    key = "token-" + uuid.uuid4().hex
    assert store.count_request(key, "2025-06-15", 10) == 1 and store.acquire_lease(key, 3, "a", NOW, 60) == 0

    def item(table, pk, sk):
        return client.get_item(TableName=table, Key={"pk": {"S": pk}, "sk": {"S": sk}}, ConsistentRead=True).get("Item")
    assert item(settings.quota_table, f"QUOTA#{key}", "DAY#2025-06-15")["expires_at"] == {"N": "1750291200"}
    assert float(item(settings.quota_table, f"LEASE#{key}", "SLOT#0")["expires_at"]["N"]) == NOW + 60
    assert item(settings.state_table, f"QUOTA#{key}", "DAY#2025-06-15") is None
    assert item(settings.state_table, f"LEASE#{key}", "SLOT#0") is None


def test_stages_share_metrika_limits_through_the_quota_table(request, clock, serial_moto_url):
    """dev and prod on one token: each its own config and state tables, one quota table. Callers of
    both stages at once get 3 leases in all, and one daily count."""
    from tools.infra import Clients, ensure_resources
    from chalicelib.settings import load_settings
    client = boto3.client("dynamodb", endpoint_url=serial_moto_url)
    stores = []
    for stage in ("dev", "prod"):
        settings = load_settings({"STAGE": stage})
        ensure_resources(settings, emulator=True, clients=Clients.create(serial_moto_url))
        stores.append(DynamoStore(client, settings.config_table, settings.state_table,
                                  quota_table=settings.quota_table, clock=clock))
    dev, prod = stores
    key, day = "token-" + uuid.uuid4().hex, "2025-06-15"
    callers = [(store, f"{stage}-{i}") for stage, store in (("dev", dev), ("prod", prod)) for i in range(3)]
    slots = race(*[lambda store=store, owner=owner: store.acquire_lease(key, 3, owner, NOW, 60)
                   for store, owner in callers])
    assert sorted(slots, key=str) == [0, 1, 2, None, None, None]
    counts = race(*[lambda store=store: store.count_request(key, day, 4) for store, _ in callers])
    assert sorted(counts, key=str) == [1, 2, 3, 4, None, None]
    assert dev.requests_on(key, day) == prod.requests_on(key, day) == 4


# --- ImportStore -------------------------------------------------------------------------------------

def test_put_backfill_with_expect_run(store, iid):
    assert store.get_backfill(iid) is None
    assert store.put_backfill(iid, {"run_id": "r1", "state": "running"}, expect_run="r1") is False  # nothing stored
    assert store.put_backfill(iid, {"run_id": "r1", "state": "running", "counts": {"read": 0}}) is True
    assert store.put_backfill(iid, {"run_id": "r1", "state": "running", "counts": {"read": 5}}, expect_run="r1") is True
    assert store.get_backfill(iid)["counts"] == {"read": 5}
    assert store.put_backfill(iid, {"run_id": "r0", "state": "running"}, expect_run="r0") is False  # another run
    assert store.put_backfill(iid, {"run_id": "r1", "state": "stopped"}) is True  # a stop always wins
    assert store.put_backfill(iid, {"run_id": "r1", "state": "running", "counts": {"read": 9}}, expect_run="r1") is False
    assert store.get_backfill(iid) == {"run_id": "r1", "state": "stopped"}


@pytest.mark.parametrize("absent", [True, False])
def test_take_and_release_for_backfill(store, iid, clock, absent):
    hold = store.take_for_backfill(iid, "order", "5", 1_700_000_000, "h1", absent=absent, now=NOW, lease_seconds=LEASE)
    assert isinstance(hold, Hold)
    assert (hold.integration_id, hold.kind, hold.crm_id, hold.event_time) == (iid, "order", "5", 1_700_000_000)
    assert hold.state == {"kind": "order", "crm_id": "5", "event_time": 1_700_000_000, "dirty": True,
                          "queued_until": NOW + LEASE, "last_action": "backfill", "owner": hold.owner, "seq": 1}
    assert_plain(hold.state) and isinstance(hold.event_time, int)
    assert entity(store, iid, "5") == hold.state
    clock.t = NOW + 30
    assert store.release_backfilled(hold, content_hash="h1", row_hashes={"order:5": "r"}, uploading_id="u1",
                                    last_order='{"id": "5"}', facts={"late": True}) is True
    assert entity(store, iid, "5") == {
        "kind": "order", "crm_id": "5", "event_time": 1_700_000_000, "dirty": False, "last_action": "backfill",
        "content_hash": "h1", "row_hashes": {"order:5": "r"}, "uploading_id": "u1", "sent_at": int(NOW + 30),
        "attempts": 0, "last_order": '{"id": "5"}', "facts": {"late": True}, "seq": 2}
    assert store.release_backfilled(hold, content_hash="h1", uploading_id="u1", last_order=None, facts=None) is False
    assert mark(store, iid, "5", 1_700_000_001) is True  # no lease left behind


def test_take_for_backfill_leaves_the_live_path_alone(store, iid):
    take = lambda crm_id, t, h, absent=False: store.take_for_backfill(  # noqa: E731
        iid, "order", crm_id, t, h, absent=absent, now=NOW, lease_seconds=LEASE)
    assert mark(store, iid, "dirty", 1_700_000_000)
    assert take("dirty", 1_700_000_100, "h", absent=True) is None  # a webhook wrote after the caller's read
    assert take("dirty", 1_700_000_100, "h") is None  # a message is pending
    for crm_id in ("same", "newer", "sent", "ok"):
        assert mark(store, iid, crm_id, 1_700_000_000)
        store.claim(iid, "order", crm_id)  # as the worker does before closing
        assert store.mark_clean(iid, "order", crm_id, event_time=1_700_000_000, content_hash="h-old", row_hashes={},
                                uploading_id="u")
    assert take("same", 1_700_000_000, "h-new") is None  # as new
    assert take("newer", 1_699_000_000, "h-new") is None  # newer
    assert take("sent", 1_700_000_100, "h-old") is None  # this content was already sent
    assert entity(store, iid, "sent")["dirty"] is False and "owner" not in entity(store, iid, "sent")
    hold = take("ok", 1_700_000_100, "h-new")
    assert hold is not None and hold.state["content_hash"] == "h-old" and hold.state["uploading_id"] == "u"
    again = take("ok", 1_700_000_100, "h-new")  # left held by an interrupted run: taken again
    assert again is not None and again.owner == hold.owner
    assert store.release_backfilled(again, content_hash="h-new", uploading_id="u2", last_order=None, facts=None)
    state = entity(store, iid, "ok")
    assert (state["content_hash"], state["uploading_id"], state["last_order"], state["dirty"]) == ("h-new", "u2", "", False)
    assert "row_hashes" not in state  # sent without hashes: the old ones no longer describe Metrika's rows


def test_backfill_overtaken_by_a_newer_webhook(store, iid):
    hold = store.take_for_backfill(iid, "order", "5", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert mark(store, iid, "5", 1_700_000_050, action="status", now=NOW + 5) is False  # the hold's lease is live
    assert entity(store, iid, "5")["event_time"] == 1_700_000_050
    assert store.release_backfilled(hold, content_hash="h", uploading_id="u", last_order=None, facts=None) is False
    state = entity(store, iid, "5")
    assert state["dirty"] is True and state["event_time"] == 1_700_000_050 and "content_hash" not in state
    # the import crashed before queueing it: once the hold's lease expires a webhook queues
    assert mark(store, iid, "5", 1_700_000_060, now=NOW + LEASE + 1) is True
    claimed = store.claim(iid, "order", "5")
    assert "owner" not in claimed and "queued_until" not in claimed
    assert store.release_backfilled(hold, content_hash="h", uploading_id="u", last_order=None, facts=None) is False


def test_backfill_claimed_by_a_worker_cannot_be_released(store, iid):
    hold = store.take_for_backfill(iid, "order", "5", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert store.claim(iid, "order", "5")["dirty"] is True
    assert store.release_backfilled(hold, content_hash="h", uploading_id="u", last_order=None, facts=None) is False
    assert entity(store, iid, "5")["dirty"] is True


def test_release_backfilled_with_an_error_parks(store, iid, clock):
    assert mark(store, iid, "5", 1_700_000_000)
    store.claim(iid, "order", "5")  # as the worker does before closing
    assert store.mark_clean(iid, "order", "5", event_time=1_700_000_000, content_hash="h-old",
                            row_hashes={"o": "r-old"}, uploading_id="u")
    hold = store.take_for_backfill(iid, "order", "5", 1_700_000_100, "h-new", now=NOW, lease_seconds=LEASE)
    clock.t = NOW + 9
    assert store.release_backfilled(hold, content_hash=None, uploading_id=None, last_order=None, facts=None,
                                    error={"message": "row failed validation"}) is True
    state = entity(store, iid, "5")
    assert state["dirty"] is False and state["last_error"] == {"message": "row failed validation"}
    assert state["failed_at"] == int(NOW + 9) and state["event_time"] == 1_700_000_100
    # Rows Metrika holds are as they were; the whole-content hash goes (some rows may have gone up
    # before a refusal, so it no longer proves what Metrika holds).
    assert "content_hash" not in state and state["row_hashes"] == {"o": "r-old"}
    assert not {"owner", "queued_until"} & set(state)


def test_values_come_back_as_plain_python(store, iid):
    store.put_integration(iid, {"rate": 1.5, "whole": 2.0, "n": 3, "flag": True, "none": None, "list": [1, (2, 3)]})
    assert store.get_integration(iid) == {"rate": 1.5, "whole": 2, "n": 3, "flag": True, "none": None,
                                          "list": [1, [2, 3]]}
    assert_plain(store.get_integration(iid))
    with pytest.raises(TypeError):
        store.put_integration(iid, {"bad": float("nan")})


# --- DynamoStore only --------------------------------------------------------------------------------

class CountingClient:
    def __init__(self, client) -> None:
        self._client, self.calls = client, []

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(**kwargs):
            self.calls.append(name)
            return method(**kwargs)
        return call


def test_dynamo_mark_dirty_is_one_write_unless_a_lease_expired(request, clock, iid):
    client = CountingClient(boto3.client("dynamodb"))
    store = _dynamo_store(request, clock, client)
    assert mark(store, iid, "5", 1_700_000_000) and mark(store, iid, "5", 1_700_000_001) is False
    assert mark(store, iid, "5", 1_699_000_000) is False  # stale
    assert client.calls == ["update_item"] * 3
    assert mark(store, iid, "5", 1_700_000_002, now=NOW + LEASE + 1)
    assert client.calls == ["update_item"] * 5


def test_dynamo_integration_cache(request, clock, iid):
    client = CountingClient(boto3.client("dynamodb"))
    webhooks, admin = _dynamo_store(request, clock, client), _dynamo_store(request, clock)
    admin.put_integration(iid, {"secret": "s1"})
    assert webhooks.get_integration(iid, max_age=5) == {"secret": "s1"}
    admin.put_integration(iid, {"secret": "s2"})  # another process's write
    assert webhooks.get_integration(iid, max_age=5) == {"secret": "s1"}  # this process's copy, for up to 5 s
    assert client.calls.count("get_item") == 1
    assert webhooks.get_integration(iid) == {"secret": "s2"}  # max_age=0 always reads
    webhooks.put_integration(iid, {"secret": "s3"})
    assert webhooks.get_integration(iid, max_age=5) == {"secret": "s3"}  # own writes drop the copy


def test_dynamo_ignores_the_legacy_queued_flag(request, clock, iid):
    store = _dynamo_store(request, clock)
    from chalicelib.settings import get_settings
    boto3.client("dynamodb").put_item(TableName=get_settings().state_table, Item={
        "pk": {"S": f"INTEGRATION#{iid}"}, "sk": {"S": "ORDER#5"}, "event_time": {"N": "1700000000"},
        "dirty": {"BOOL": True}, "queued": {"BOOL": True}, "received_at": {"N": "1700000000"}})
    assert mark(store, iid, "5", 1_700_000_001) is True  # no lease: queue (the old flag proves nothing)
    # An import that rewrites an old item whole leaves the legacy attributes out.
    seen = store.claim(iid, "order", "5")
    assert store.mark_clean(iid, "order", "5", event_time=seen["event_time"], content_hash="h0", row_hashes={},
                            uploading_id="u")
    hold = store.take_for_backfill(iid, "order", "5", 1_700_000_100, "h", now=NOW, lease_seconds=LEASE)
    assert {"queued", "received_at"} <= set(hold.state)
    assert store.release_backfilled(hold, content_hash="h", uploading_id="u", last_order=None, facts=None)
    assert not {"queued", "received_at"} & set(entity(store, iid, "5"))


def test_dynamo_unreachable_is_unavailable(request, clock, iid):
    request.getfixturevalue("service_env")
    from sandbox.local_stack import free_port
    client = boto3.client("dynamodb", endpoint_url=f"http://127.0.0.1:{free_port()}",
                          config=Config(connect_timeout=0.2, read_timeout=0.2, retries={"total_max_attempts": 1}))
    store = DynamoStore(client, "config", "state", quota_table="quota", clock=clock)
    with pytest.raises(Unavailable) as raised:
        store.get_integration(iid)
    assert raised.value.what == "store"
    with pytest.raises(Unavailable):
        mark(store, iid, "5", 1_700_000_000)


@pytest.mark.parametrize("code", ["ProvisionedThroughputExceededException", "ThrottlingException",
                                  "RequestLimitExceeded", "InternalServerError", "ServiceUnavailable"])
def test_dynamo_throttling_is_unavailable(clock, iid, code):
    class Throttled:
        def __getattr__(self, name):
            def call(**kwargs):
                raise ClientError({"Error": {"Code": code, "Message": "slow down"}}, name)
            return call
    store = DynamoStore(Throttled(), "config", "state", quota_table="quota", clock=clock)
    with pytest.raises(Unavailable, match=code):
        store.get_entity(iid, "order", "5")
    with pytest.raises(Unavailable):
        mark(store, iid, "5", 1_700_000_000)


def test_dynamo_validation_error_is_not_unavailable(request, clock, iid):
    store = _dynamo_store(request, clock)
    with pytest.raises(ClientError) as raised:  # Unavailable is no ClientError: this proves it was not mapped
        store.record_upload(iid, "x" * 2000, kind="orders", rows=1)  # a sort key over DynamoDB's 1,024 bytes
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(ClientError) as raised:
        store.take_for_backfill(iid, "order", "x" * 2000, 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert raised.value.response["Error"]["Code"] == "ValidationException"


# --- rules added with the review of the delivery core ----------------------------------------------------

def test_an_event_recorded_after_the_claim_keeps_the_entity_dirty_even_at_the_same_time(store, iid):
    """Two changes within one second, or a capped future time: the second event has the time the
    claim saw, but it took a lease and queued its message, so the first delivery must not close it."""
    assert mark(store, iid, "5", 1_700_000_000)
    seen = store.claim(iid, "order", "5")
    assert mark(store, iid, "5", 1_700_000_000) is True  # same second, after the claim
    assert store.mark_clean(iid, "order", "5", event_time=seen["event_time"], content_hash="h", row_hashes=None,
                            uploading_id="u") is False
    assert store.mark_failed(iid, "order", "5", event_time=seen["event_time"], error={"m": 1}) is False
    assert entity(store, iid, "5")["dirty"] is True
    store.claim(iid, "order", "5")  # the second message's delivery closes it
    assert store.mark_clean(iid, "order", "5", event_time=seen["event_time"], content_hash="h", row_hashes=None,
                            uploading_id="u") is True


def test_partial_progress_and_parking_drop_the_stale_content_hash(store, iid):
    """Rows went up but the entity is not delivered whole: the old content hash would let a revert to
    that content be skipped while Metrika holds the newer rows."""
    for crm_id, finish in (("5", "attempt"), ("6", "park")):
        assert mark(store, iid, crm_id, 1_700_000_000)
        seen = store.claim(iid, "order", crm_id)
        assert store.mark_clean(iid, "order", crm_id, event_time=seen["event_time"], content_hash="old",
                                row_hashes={"contact:1": "a"}, uploading_id="u")
        assert mark(store, iid, crm_id, 1_700_000_100)
        seen = store.claim(iid, "order", crm_id)
        if finish == "attempt":
            store.note_attempt(iid, "order", crm_id, attempts=1, error={"m": 1}, lease_until=NOW + 60,
                               row_hashes={"contact:1": "b"})
            assert entity(store, iid, crm_id)["row_hashes"] == {"contact:1": "b"}
        else:
            assert store.mark_failed(iid, "order", crm_id, event_time=seen["event_time"], error={"m": 1})
        assert "content_hash" not in entity(store, iid, crm_id)
    store.note_attempt(iid, "order", "7", attempts=1, error={"m": 1}, lease_until=NOW + 60)  # no progress: kept
    hold = store.take_for_backfill(iid, "order", "8", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert store.release_backfilled(hold, content_hash=None, uploading_id=None, last_order=None, facts=None,
                                    error={"m": "refused"})
    assert "content_hash" not in entity(store, iid, "8")


def test_a_fresh_claim_is_being_delivered_not_stuck(store, iid):
    from chalicelib.store import CLAIM_GRACE_SECONDS
    assert mark(store, iid, "5", 1_700_000_000)
    store.claim(iid, "order", "5")  # at NOW (the store's clock)
    assert store.stuck_entities(iid, now=NOW + 1) == []
    assert [e["crm_id"] for e in store.stuck_entities(iid, now=NOW + CLAIM_GRACE_SECONDS + 1)] == ["5"]


def test_retaking_a_held_entity_never_moves_its_time_back(store, iid):
    """A page read before a webhook must not take the entity back to the page's older time."""
    assert store.take_for_backfill(iid, "order", "5", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert mark(store, iid, "5", 1_700_000_200) is False  # the hold's lease is live: recorded, not queued
    assert store.take_for_backfill(iid, "order", "5", 1_700_000_000, "h", now=NOW, lease_seconds=LEASE) is None
    assert entity(store, iid, "5")["event_time"] == 1_700_000_200
    assert store.take_for_backfill(iid, "order", "5", 1_700_000_300, "h", now=NOW, lease_seconds=LEASE) is not None


# --- issue 13: what each upload carried, sending again, integrations sharing a counter -------------------

def test_an_upload_keeps_its_entities_until_confirmed(store, iid, clock):
    store.record_upload(iid, "u1", kind="contacts", rows=3,
                        entities=[("order", "5"), ("contact", "9"), ("order", "5"), ("ORDER", "10")])
    store.record_upload(iid, "u2", kind="orders", rows=1)  # none recorded (an older caller)
    assert store.upload_entities(iid, "u1") == [("contact", "9"), ("order", "10"), ("order", "5")]
    assert store.upload_entities(iid, "u2") == [] and store.upload_entities(iid, "nope") == []
    assert "entities" not in store.uploads(iid)[0] and "entities" not in store.pending_uploads(iid)[0]
    clock.t = NOW + 60
    store.confirm_upload(iid, "u1", "FAILED", 2, resent=2)
    store.confirm_upload(iid, "u2", "UNCONFIRMED", None)
    assert store.upload_entities(iid, "u1") == []
    assert store.uploads(iid) == [
        {"uploading_id": "u1", "kind": "contacts", "rows": 3, "status": "FAILED", "sent_at": int(NOW),
         "elements_count": 2, "confirmed_at": int(NOW + 60), "resent": 2, "expires_at": int(NOW + 60) + 30 * 86400},
        {"uploading_id": "u2", "kind": "orders", "rows": 1, "status": "UNCONFIRMED", "sent_at": int(NOW),
         "elements_count": 0, "confirmed_at": int(NOW + 60), "expires_at": int(NOW + 60) + 30 * 86400}]


def test_any_number_of_carried_entities_fits(store, iid, monkeypatch):
    """DynamoDB keeps an upload's entities in items of CARRIED_PER_ITEM keys, each far below the 400 KB
    item limit even with 19-digit ids; more keys take more items (here made small, so 1,200 entities
    take three: moto is slow with long lists)."""
    from chalicelib.store import dynamodb
    longest = len("contact:") + 19 + 3  # a key and its list-element overhead, in bytes
    assert dynamodb.CARRIED_PER_ITEM * longest + 1024 < 400 * 1024 / 2
    monkeypatch.setattr(dynamodb, "CARRIED_PER_ITEM", 500)
    keys = [("contact" if n % 2 else "order", str(9_000_000_000_000_000_000 + n)) for n in range(1_200)]
    store.record_upload(iid, "big", kind="contacts", rows=1000, entities=keys)
    assert store.upload_entities(iid, "big") == sorted(keys)
    store.confirm_upload(iid, "big", "PASSED", 1000)
    assert store.upload_entities(iid, "big") == []


def test_mark_resend_forgets_what_was_sent_and_owes_a_delivery(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)
    seen = store.claim(iid, "order", "5")
    assert store.mark_clean(iid, "order", "5", event_time=seen["event_time"], content_hash="h",
                            row_hashes={"order:5": "r", "contact:1": "c"}, uploading_id="u1", last_order='{"id": "5"}',
                            facts={"order": True})
    assert store.mark_resend(iid, "order", "5") == 1_700_000_000
    state = entity(store, iid, "5")
    assert state["dirty"] is True and state["row_hashes"] == {} and "content_hash" not in state
    assert state["last_order"] == '{"id": "5"}' and state["facts"] == {"order": True}
    assert [e["crm_id"] for e in store.stuck_entities(iid, now=NOW + CLAIM_GRACE_SECONDS + 1)] == ["5"]
    assert mark(store, iid, "5", 1_700_000_000) is True  # the run-out lease is taken over: queue it
    assert mark(store, iid, "5", 1_700_000_000) is False
    assert store.mark_resend(iid, "order", "nope") is None and entity(store, iid, "nope") is None


def test_mark_resend_keeps_a_live_lease_and_defeats_stale_writers(store, iid):
    assert mark(store, iid, "5", 1_700_000_000)  # a message is on its way
    store.mark_resend(iid, "order", "5")
    assert mark(store, iid, "5", 1_700_000_000) is False  # that message covers the re-send
    assert mark(store, iid, "6", 1_700_000_000)
    seen = store.claim(iid, "order", "6")  # a worker holds 6 with what it read before the re-send
    store.mark_resend(iid, "order", "6")
    assert store.mark_clean(iid, "order", "6", event_time=seen["event_time"], content_hash="old",
                            row_hashes={"order:6": "r"}, uploading_id=None) is False
    assert store.mark_failed(iid, "order", "6", event_time=seen["event_time"], error={"m": 1}) is False
    assert entity(store, iid, "6")["row_hashes"] == {} and entity(store, iid, "6")["dirty"] is True


def test_mark_resend_takes_the_entity_from_a_history_import(store, iid):
    hold = store.take_for_backfill(iid, "order", "5", 1_700_000_000, "h", absent=True, now=NOW, lease_seconds=LEASE)
    assert store.mark_resend(iid, "order", "5") == 1_700_000_000
    assert "owner" not in entity(store, iid, "5")
    assert store.release_backfilled(hold, content_hash="h", row_hashes={"order:5": "r"}, uploading_id="u",
                                    last_order=None, facts=None) is False  # the import queues it to the live path
    assert entity(store, iid, "5")["row_hashes"] == {}


def test_integrations_on_counter(store, iid):
    counter = int(uuid.uuid4().int % 2**31)
    assert store.integrations_on_counter(counter) == []
    for n, target in enumerate((iid + "-b", iid + "-a", iid + "-c")):
        store.put_integration(target, {"crm": "amocrm", "counter_id": counter if n < 2 else counter + 1})
    assert store.integrations_on_counter(counter) == [iid + "-a", iid + "-b"]
    store.delete_integration(iid + "-a")
    assert store.integrations_on_counter(counter) == [iid + "-b"]


# --- InboxStore ------------------------------------------------------------------------------------------

def test_inbox_batches_round_trip_in_order_until_deleted(store, iid):
    big = [EntityRef("order", str(10**18 + i), 1_700_000_000 + i, "status") for i in range(500)]  # a full batch
    odd = [EntityRef("contact", "9223372036854775807", YEAR_2100, "update"), EntityRef("order", "7", 0, "contact_update"),
           EntityRef("order", "7", 5, "status")]  # the same entity twice is kept as recorded
    store.put_inbox(iid, {"b1": big, "b2": odd}, now=NOW)
    store.put_inbox(iid + "-other", {"b1": odd[:1]}, now=NOW)
    assert store.get_inbox(iid, "b1") == big and store.get_inbox(iid, "b2") == odd
    assert store.get_inbox(iid, "missing") is None
    assert all(isinstance(r.event_time, int) for r in store.get_inbox(iid, "b2"))
    store.delete_inbox(iid, ["b1", "never-there", "b1"])
    assert store.get_inbox(iid, "b1") is None and store.get_inbox(iid, "b2") == odd
    assert store.get_inbox(iid + "-other", "b1") == odd[:1]  # another integration's batch of the same id
    assert store.list_entities(iid) == []  # batches are not entities
    store.delete_inbox(iid, [])


def test_stale_inbox_lists_batches_recorded_before_a_time_oldest_first(store, iid):
    ref = [EntityRef("order", "1", 1, "add")]
    store.put_inbox(iid, {"late": ref}, now=NOW + 20)
    store.put_inbox(iid, {"early": ref, "middle": ref}, now=NOW)
    store.put_inbox(iid, {"middle": ref}, now=NOW + 10)  # written again: the new time
    assert store.stale_inbox(iid, before=NOW) == []
    assert store.stale_inbox(iid, before=NOW + 0.5) == ["early"]
    assert store.stale_inbox(iid, before=NOW + 30) == ["early", "middle", "late"]
    store.delete_inbox(iid, ["early"])
    assert store.stale_inbox(iid, before=NOW + 30) == ["middle", "late"]


def test_more_inbox_batches_than_one_batch_write_takes(store, iid):
    batches = {f"b{i:02d}": [EntityRef("order", str(i), i, "add")] for i in range(30)}  # BatchWriteItem takes 25
    store.put_inbox(iid, batches, now=NOW)
    assert sorted(store.stale_inbox(iid, before=NOW + 1)) == sorted(batches)
    store.delete_inbox(iid, list(batches))
    assert store.stale_inbox(iid, before=NOW + 1) == []


def test_delete_integration_removes_its_inbox(store, iid):
    store.put_integration(iid, {"crm": "amocrm"})
    store.put_inbox(iid, {"b": [EntityRef("order", "1", 1, "add")]}, now=NOW)
    assert store.delete_integration(iid) is True
    assert store.get_inbox(iid, "b") is None and store.stale_inbox(iid, before=NOW + 1) == []


# --- CustomerStore (corrections: each customer's sources) -------------------------------------------------

CONTACT_PART = {"name": "Иван", "create_date_time": "2026-09-20 10:00:00", "phones": ["79161234567"],
                "attribute_values": {"tier": ["gold"]}}


def test_customer_sources_round_trip_and_a_write_names_only_its_sources(store, iid):
    assert store.customers(iid, ["11"]) == {}
    sources = {"contact:11": CONTACT_PART, "order:5": {"client_ids": ["1714651234567890123"]}}
    assert store.record_customer(iid, "11", put=sources, drop=[], sent="h1", version=0) is True
    first = store.customers(iid, ["11", "12"])
    assert first == {"11": {"sources": sources, "sent": "h1", "version": 1}}
    assert_plain(first)
    first["11"]["sources"]["contact:11"]["phones"].append("x")  # the caller's copy
    assert store.record_customer(iid, "11", put={"order:6": {"client_ids": ["2"]}}, drop=["order:5", "order:404"],
                                 sent=None, version=1) is True
    assert store.customers(iid, ["11"])["11"] == {
        "sources": {"contact:11": CONTACT_PART, "order:6": {"client_ids": ["2"]}}, "sent": None, "version": 2}


def test_a_customer_write_from_a_stale_read_writes_nothing(store, iid):
    assert store.record_customer(iid, "11", put={"order:5": {"client_ids": ["1"]}}, drop=[], sent="h1", version=0)
    for stale in (0, 2, 7):
        assert store.record_customer(iid, "11", put={"order:6": {"client_ids": ["2"]}}, drop=["order:5"], sent="h2",
                                     version=stale) is False
    assert store.customers(iid, ["11"])["11"] == {"sources": {"order:5": {"client_ids": ["1"]}}, "sent": "h1",
                                                  "version": 1}


def test_concurrent_sources_of_one_customer_are_never_lost(racing_store, iid):
    """Eight deliveries record eight deals' ClientIDs for one customer at once, each reading first and
    reading again when its write is refused: every source ends recorded, once."""
    store = racing_store

    def deliver(n):
        for _ in range(20):
            seen = store.customers(iid, ["11"]).get("11", {}).get("version", 0)
            if store.record_customer(iid, "11", put={f"order:{n}": {"client_ids": [str(1000 + n)]}}, drop=[],
                                     sent=f"h{n}", version=seen):
                return True
        return False

    assert race(*[lambda n=n: deliver(n) for n in range(8)]) == [True] * 8
    record = store.customers(iid, ["11"])["11"]
    assert record["sources"] == {f"order:{n}": {"client_ids": [str(1000 + n)]} for n in range(8)}
    assert record["version"] == 8
    assert sorted(race(*[lambda n=n: store.record_customer(iid, "11", put={f"order:{n}": {}}, drop=[], sent=None,
                                                           version=8) for n in range(3)])) == [False, False, True]


def test_customers_go_with_their_integration(store, iid):
    store.put_integration(iid, {"crm": "amocrm"})
    assert store.record_customer(iid, "11", put={"contact:11": CONTACT_PART}, drop=[], sent="h", version=0)
    assert store.record_customer(iid + "-other", "11", put={"contact:11": {}}, drop=[], sent="h", version=0)
    assert store.delete_integration(iid) is True
    assert store.customers(iid, ["11"]) == {}
    assert store.customers(iid + "-other", ["11"]) == {"11": {"sources": {"contact:11": {}}, "sent": "h", "version": 1}}


# --- ConsoleStore ------------------------------------------------------------------------------------

def test_console_links_round_trip_revoke_and_go_with_their_integration(store, iid):
    store.put_integration(iid, {"crm": "amocrm", "counter_id": 1})
    assert store.get_console_link(iid, "0123456789abcdef") is None and store.console_links(iid) == []
    link = {"hash": "ab" * 32, "label": "Маркетинг — Ольга", "created_at": YEAR_2100}
    store.put_console_link(iid, "0123456789abcdef", link)
    store.put_console_link(iid, "fedcba9876543210", {**link, "label": ""})
    store.put_integration(iid + "-other", {"crm": "amocrm", "counter_id": 1})
    store.put_console_link(iid + "-other", "0123456789abcdef", {**link, "hash": "cd" * 32})
    assert store.get_console_link(iid, "0123456789abcdef") == {"link_id": "0123456789abcdef", **link}
    assert [x["link_id"] for x in store.console_links(iid)] == ["0123456789abcdef", "fedcba9876543210"]
    assert_plain(store.console_links(iid))
    assert store.delete_console_link(iid, "fedcba9876543210") is True
    assert store.delete_console_link(iid, "fedcba9876543210") is False  # already revoked
    assert store.get_console_link(iid, "fedcba9876543210") is None
    assert store.get_console_link(iid + "-other", "0123456789abcdef")["hash"] == "cd" * 32  # not another's
    store.delete_integration(iid)  # a deleted integration's links die with it: a new one of the same id
    assert store.get_console_link(iid, "0123456789abcdef") is None  # does not inherit them
    assert store.console_links(iid) == []
    store.delete_integration(iid + "-other")


def test_entity_summary_counts_what_it_read_and_stops_at_its_limit(store, iid):
    assert store.entity_summary(iid, limit=10) == {"scanned": 0, "complete": True, "backlog": 0, "retrying": 0,
                                                  "parked": 0, "dead_lettered": 0, "last_sent_at": None}
    for n in range(3):
        mark(store, iid, f"o{n}", NOW - 100)
    store.note_attempt(iid, "order", "o1", attempts=2, error={"code": "x", "message": "later"}, lease_until=NOW + 60)
    claimed = store.claim(iid, "order", "o2")
    store.mark_failed(iid, "order", "o2", event_time=claimed["event_time"], error={"code": "unmapped_stage", "message": "m"})
    mark(store, iid, "c1", NOW - 100, kind="contact")
    full = store.entity_summary(iid, limit=100)
    assert full["scanned"] == 4 and full["complete"] is True
    assert (full["parked"], full["backlog"], full["retrying"], full["dead_lettered"]) == (1, 3, 1, 0)
    capped = store.entity_summary(iid, limit=2)
    assert capped["scanned"] == 2 and capped["complete"] is False
    exact = store.entity_summary(iid, limit=4)
    assert exact["scanned"] == 4 and exact["complete"] is True

# --- TokenStore --------------------------------------------------------------------------------------

PAIR = {"access_token": "access-1", "refresh_token": "refresh-1", "expires_at": int(NOW) + 86400}


def test_tokens_round_trip_and_versions(store, iid, clock):
    assert store.get_tokens(iid) is None
    assert store.put_tokens(iid, dict(PAIR, endpoint="https://oauth.example/rest/")) == 1
    got = store.get_tokens(iid)
    assert got == dict(PAIR, endpoint="https://oauth.example/rest/", version=1, refreshed_at=int(NOW))
    assert_plain(got)
    got["access_token"] = "changed by the caller"
    assert store.get_tokens(iid)["access_token"] == "access-1"
    clock.t = NOW + 5
    assert store.put_tokens(iid, {"access_token": "a2", "refresh_token": "r2", "expires_at": YEAR_2100}) == 2
    assert store.get_tokens(iid) == {"access_token": "a2", "refresh_token": "r2", "expires_at": YEAR_2100,
                                     "endpoint": "https://oauth.example/rest/", "version": 2,
                                     "refreshed_at": int(NOW) + 5}


def test_tokens_live_beside_the_config_and_go_with_the_integration(store, iid):
    store.put_integration(iid, {"crm": "amocrm", "counter_id": 1})
    store.put_tokens(iid, PAIR)
    store.put_integration(iid, {"crm": "amocrm", "counter_id": 2})  # a config PUT leaves the tokens alone
    assert store.get_tokens(iid)["access_token"] == "access-1"
    assert "access_token" not in str(store.get_integration(iid))
    assert store.list_integration_ids().count(iid) == 1
    assert store.delete_integration(iid)
    assert store.get_tokens(iid) is None


def test_the_refresh_lease_goes_to_one_caller_at_the_version_read(store, iid):
    assert not store.take_refresh_lease(iid, version=0, owner="a", now=NOW, until=NOW + 30)  # no item
    store.put_tokens(iid, PAIR)
    assert not store.take_refresh_lease(iid, version=2, owner="a", now=NOW, until=NOW + 30)  # not that version
    assert store.take_refresh_lease(iid, version=1, owner="a", now=NOW, until=NOW + 30)
    assert not store.take_refresh_lease(iid, version=1, owner="b", now=NOW + 30, until=NOW + 60)  # still live
    assert store.get_tokens(iid)["lease_owner"] == "a"
    assert store.take_refresh_lease(iid, version=1, owner="b", now=NOW + 30.5, until=NOW + 60.5)  # "a" died
    assert store.get_tokens(iid)["lease_owner"] == "b"
    assert store.get_tokens(iid)["refreshing_until"] == NOW + 60.5


def test_of_concurrent_refreshers_one_takes_the_lease(racing_store, iid):
    racing_store.put_tokens(iid, PAIR)
    won = race(*[lambda o=o: racing_store.take_refresh_lease(iid, version=1, owner=o, now=NOW, until=NOW + 30)
                 for o in "abcd"])
    assert won.count(True) == 1


def test_finish_refresh_stores_the_pair_at_the_version_read_only(store, iid, clock):
    store.put_tokens(iid, PAIR)
    store.take_refresh_lease(iid, version=1, owner="a", now=NOW, until=NOW + 30)
    store.take_refresh_lease(iid, version=1, owner="b", now=NOW + 31, until=NOW + 61)  # took over from "a"
    clock.t = NOW + 40
    new = {"access_token": "a2", "refresh_token": "r2", "expires_at": int(NOW) + 90000}
    # the slow "a" still stores its pair: the version is the one it read, and its pair is what the CRM honours
    assert store.finish_refresh(iid, version=1, tokens=new)
    assert store.get_tokens(iid) == dict(new, version=2, refreshed_at=int(NOW) + 40)
    assert not store.finish_refresh(iid, version=1, tokens=dict(new, access_token="a3"))  # "b" comes too late
    assert not store.release_refresh(iid, version=1, owner="b", failure={"code": 401, "message": "m", "at": 1})
    assert store.get_tokens(iid)["access_token"] == "a2" and "failure" not in store.get_tokens(iid)


def test_release_refresh_records_a_failure_and_an_install_clears_it(store, iid):
    store.put_tokens(iid, PAIR)
    store.take_refresh_lease(iid, version=1, owner="a", now=NOW, until=NOW + 30)
    assert not store.release_refresh(iid, version=1, owner="x", failure=None)  # not the holder
    failure = {"code": 401, "message": "reinstall the integration", "at": int(NOW)}
    assert store.release_refresh(iid, version=1, owner="a", failure=failure)
    got = store.get_tokens(iid)
    assert got["failure"] == failure and "lease_owner" not in got and "refreshing_until" not in got
    assert store.take_refresh_lease(iid, version=1, owner="c", now=NOW, until=NOW + 30)
    assert store.release_refresh(iid, version=1, owner="c", failure=None)  # a transient failure: lease only
    assert store.get_tokens(iid)["failure"] == failure
    store.take_refresh_lease(iid, version=1, owner="d", now=NOW, until=NOW + 30)
    assert store.put_tokens(iid, dict(PAIR, access_token="reinstalled")) == 2
    got = store.get_tokens(iid)
    assert {"failure", "lease_owner", "refreshing_until"}.isdisjoint(got) and got["access_token"] == "reinstalled"
    assert not store.finish_refresh(iid, version=1, tokens=PAIR)  # the refresh under way lost to the install


def test_token_values_the_store_refuses_change_nothing(store, iid):
    store.put_tokens(iid, PAIR)
    with pytest.raises((TypeError, ClientError)):
        store.put_tokens(iid, {"access_token": "x", "expires_at": float("nan")})
    assert store.get_tokens(iid) == dict(PAIR, version=1, refreshed_at=int(NOW))
    big = 10 ** 37  # DynamoDB's numbers hold 38 digits: a 2,000-digit expiry is refused upstream (oauth)
    assert store.put_tokens(iid, dict(PAIR, expires_at=big)) == 2
    assert store.get_tokens(iid)["expires_at"] == big



@pytest.mark.parametrize("write", [
    lambda store, iid: store.claim(iid, "order", "5"),  # update_item: None only when the condition failed
    lambda store, iid: store.mark_dead_lettered(iid, "order", "5"),  # update_item: False likewise
    lambda store, iid: store.release_queue_lease(iid, "order", "5"),  # update_item: a failed condition is silent
    lambda store, iid: store.release_lease("scope", 0, "me"),  # delete_item: likewise
    lambda store, iid: store.acquire_lease("scope", 2, "me", NOW, 60),  # put_item: None when every slot is taken
    lambda store, iid: store.take_refresh_lease(iid, version=1, owner="me", now=NOW, until=NOW + 60),
], ids=["claim", "mark_dead_lettered", "release_queue_lease", "release_lease", "acquire_lease", "take_refresh_lease"])
def test_dynamo_conditional_writes_pass_on_errors_other_than_a_failed_condition(clock, iid, write):
    """Only ConditionalCheckFailed means "not written" (`_IfCondition`): any other refusal (here every
    call's) reaches the caller rather than passing for a condition that did not hold."""
    class Refusing:
        def __getattr__(self, name):
            def call(**kwargs):
                raise ClientError({"Error": {"Code": "ValidationException", "Message": "key too long"}}, name)
            return call
    store = DynamoStore(Refusing(), "config", "state", quota_table="quota", clock=clock)
    with pytest.raises(ClientError) as raised:
        write(store, iid)
    assert raised.value.response["Error"]["Code"] == "ValidationException"
