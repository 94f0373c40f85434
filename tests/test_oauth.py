"""The OAuth token core (`chalicelib.oauth`): one refresher at a time, waiting instead of racing, a dead
refresher taken over after its lease, a refused refresh recorded. On the in-memory store (the store's
own conditions are held to DynamoDB by tests/test_store_contract.py); clocks are fake, nothing sleeps."""
from __future__ import annotations

import threading

import pytest

from chalicelib import deadline
from chalicelib.errors import Misconfigured, Transient
from chalicelib.oauth import (RefreshPending, RefreshRefused, TokenKeeper, TokenPair, due_by_margin,
                              public_view)
from chalicelib.store.memory import MemoryStore
from tests.core import Clock, StoredSignal, at_once

NOW = 1_750_000_000.0
IID = "oauth-test"


class Refresher:
    source = "amocrm"
    reinstall_hint = "reinstall the integration from amoCRM"

    def __init__(self, clock, *, fail=None, before=None):
        self.clock, self.fail, self.before = clock, fail, before
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def refresh(self, integration, refresh_token):
        with self.lock:
            self.calls.append(refresh_token)
            n = len(self.calls)
        if self.before:
            self.before()
        if self.fail:
            raise self.fail
        return TokenPair(f"access-{n + 1}", f"refresh-{n + 1}", int(self.clock()) + 86400)


def setup(expires_in=86400, **refresher_options):
    clock = Clock(NOW)
    store = MemoryStore(clock=clock)
    store.put_tokens(IID, {"access_token": "access-1", "refresh_token": "refresh-1",
                           "expires_at": int(NOW) + expires_in})
    refresher = Refresher(clock, **refresher_options)

    def sleep(seconds):
        clock.now += seconds
    keeper = TokenKeeper(store, refresher, due=due_by_margin(3600), clock=clock, sleep=sleep, wait_seconds=60)
    return clock, store, refresher, keeper


def test_a_fresh_token_is_used_as_stored():
    clock, store, refresher, keeper = setup()
    assert keeper.access_token(IID, {}) == "access-1"
    clock.now = NOW + 86400 - 3601  # just over an hour left: still fresh
    assert keeper.access_token(IID, {}) == "access-1"
    assert refresher.calls == []


def test_a_token_with_less_than_an_hour_left_is_refreshed_once_and_stored():
    clock, store, refresher, keeper = setup()
    clock.now = NOW + 86400 - 3599
    assert keeper.access_token(IID, {}) == "access-2"
    assert keeper.access_token(IID, {}) == "access-2"
    assert refresher.calls == ["refresh-1"]
    tokens = store.get_tokens(IID)
    assert tokens["refresh_token"] == "refresh-2" and tokens["version"] == 2
    assert {"lease_owner", "refreshing_until", "failure"}.isdisjoint(tokens)


def test_two_threads_refreshing_at_once_make_one_refresh_call():
    """Whichever thread loses the election finds the lease and waits; the winner's refresh answers only
    once the other waits, and the waiter re-reads only once the new pair is stored."""
    waiting = threading.Event()
    clock = Clock(NOW + 86400)  # expired
    store = StoredSignal(clock=clock)
    stored = store.stored
    store.put_tokens(IID, {"access_token": "access-1", "refresh_token": "refresh-1", "expires_at": int(NOW) + 86400})
    refresher = Refresher(clock, before=lambda: waiting.wait(5))

    def sleep(seconds):
        waiting.set()
        stored.wait(5)
    keeper = TokenKeeper(store, refresher, due=due_by_margin(3600), clock=clock, sleep=sleep)
    results, errors = at_once(lambda: keeper.access_token(IID, {}), 2, timeout=10)
    assert errors == []
    assert waiting.is_set() and stored.is_set()
    assert results == ["access-2", "access-2"]
    assert refresher.calls == ["refresh-1"]
    assert store.get_tokens(IID)["version"] == 2


def test_a_dead_refresher_is_taken_over_once_its_lease_has_passed():
    clock, store, refresher, keeper = setup(expires_in=0)
    assert store.take_refresh_lease(IID, version=1, owner="died", now=NOW, until=NOW + 30)
    assert keeper.access_token(IID, {}) == "access-2"  # waited (fake sleeps) until the lease passed
    assert clock.now > NOW + 30
    assert refresher.calls == ["refresh-1"]
    assert "lease_owner" not in store.get_tokens(IID)


def test_a_waiter_gives_up_after_its_wait_without_counting_an_attempt():
    clock, store, refresher, keeper = setup(expires_in=0)
    store.take_refresh_lease(IID, version=1, owner="busy", now=NOW, until=NOW + 3600)
    with pytest.raises(RefreshPending) as caught:
        keeper.access_token(IID, {})
    assert not caught.value.counts_attempt and refresher.calls == []
    assert clock.now - NOW <= 60  # bounded by wait_seconds


def test_no_time_left_in_the_invocation_takes_no_lease():
    clock, store, refresher, keeper = setup(expires_in=0)
    with deadline.invocation(0.5, clock=lambda: 0.0):
        with pytest.raises(RefreshPending):
            keeper.access_token(IID, {})
    assert refresher.calls == [] and "lease_owner" not in store.get_tokens(IID)


def test_a_refused_refresh_is_recorded_with_what_to_do_and_not_asked_again():
    refused = Misconfigured("amoCRM answered 401: Token has been revoked", source="amocrm", status=401)
    clock, store, refresher, keeper = setup(expires_in=0, fail=refused)
    with pytest.raises(RefreshRefused) as caught:
        keeper.access_token(IID, {})
    message = caught.value.message
    assert "Token has been revoked" in message and "reinstall the integration from amoCRM" in message
    assert isinstance(caught.value, Misconfigured)  # the worker parks the integration's deals with it
    tokens = store.get_tokens(IID)
    assert tokens["failure"] == {"code": 401, "message": message, "at": int(NOW)}
    assert "lease_owner" not in tokens
    with pytest.raises(RefreshRefused):
        keeper.access_token(IID, {})
    assert refresher.calls == ["refresh-1"]  # the dead refresh token is not sent again
    view = public_view(store.get_tokens(IID))
    assert view["refresh_failure"]["message"] == message
    assert "refresh-1" not in str(view) and "access-1" not in str(view)
    # a reinstall stores a new pair and clears the failure
    refresher.fail = None
    store.put_tokens(IID, {"access_token": "new", "refresh_token": "new-r", "expires_at": int(NOW) + 86400})
    assert keeper.access_token(IID, {}) == "new"


def test_a_transient_refresh_failure_releases_the_lease_and_records_nothing():
    clock, store, refresher, keeper = setup(expires_in=0, fail=Transient("amoCRM unreachable", source="amocrm"))
    with pytest.raises(Transient):
        keeper.access_token(IID, {})
    tokens = store.get_tokens(IID)
    assert {"lease_owner", "refreshing_until", "failure"}.isdisjoint(tokens)
    refresher.fail = None
    assert keeper.access_token(IID, {}) == "access-3"
    assert refresher.calls == ["refresh-1", "refresh-1"]


def test_a_bug_in_the_refresher_releases_the_lease():
    clock, store, refresher, keeper = setup(expires_in=0, fail=KeyError("access_token"))
    with pytest.raises(KeyError):
        keeper.access_token(IID, {})
    assert {"lease_owner", "failure"}.isdisjoint(store.get_tokens(IID))


def test_a_rejected_token_is_refreshed_once_unless_another_worker_already_did():
    clock, store, refresher, keeper = setup()
    assert keeper.access_token(IID, {}, rejected="access-1") == "access-2"
    assert keeper.access_token(IID, {}, rejected="access-1") == "access-2"  # stored is another: no refresh
    assert refresher.calls == ["refresh-1"]


def test_a_pair_that_lost_to_a_reinstall_is_dropped_for_the_reinstalled_one():
    clock, store, refresher, keeper = setup(expires_in=0)
    refresher.before = lambda: store.put_tokens(IID, {"access_token": "installed", "refresh_token": "r",
                                                      "expires_at": int(NOW) + 86400})
    assert keeper.access_token(IID, {}) == "installed"
    assert store.get_tokens(IID)["access_token"] == "installed" and store.get_tokens(IID)["version"] == 2


def test_a_refusal_after_another_stored_a_pair_is_not_recorded():
    """A slow refresher took over a lease; the first stored its pair meanwhile, so the CRM refuses the
    old refresh token: that is no failure of the integration."""
    clock, store, refresher, keeper = setup(expires_in=0)

    def first_refresher_stores():
        store.finish_refresh(IID, version=1, tokens={"access_token": "first", "refresh_token": "rf",
                                                     "expires_at": int(NOW) + 86400})
        refresher.fail = Misconfigured("invalid_grant", source="amocrm", status=400)
    refresher.before = first_refresher_stores
    assert keeper.access_token(IID, {}) == "first"
    assert "failure" not in store.get_tokens(IID)


def test_keep_alive_refreshes_only_idle_integrations():
    clock, store, refresher, keeper = setup()
    assert not keeper.keep_alive(IID, {}, max_idle=30 * 86400)
    clock.now = NOW + 30 * 86400 + 1
    store.put_tokens(IID, {"access_token": "access-1", "refresh_token": "refresh-1", "expires_at": int(clock.now) + 86400})
    assert not keeper.keep_alive(IID, {}, max_idle=30 * 86400)  # just installed again
    clock.now += 30 * 86400 + 1
    assert keeper.keep_alive(IID, {}, max_idle=30 * 86400)
    assert refresher.calls == ["refresh-1"] and store.get_tokens(IID)["refreshed_at"] == int(clock.now)


def test_no_tokens_is_misconfigured_and_odd_expiries_count_as_due():
    clock, store, refresher, keeper = setup()
    with pytest.raises(Misconfigured):
        keeper.access_token("not-installed", {})
    due = due_by_margin(3600)
    assert due({"expires_at": "4102444800"}, NOW)  # a string where a number belongs: refresh
    assert due({}, NOW)
    assert not due({"expires_at": 4_102_444_800}, NOW)  # year 2100: fresh


def test_token_pairs_never_show_their_tokens_and_keep_reserved_names():
    pair = TokenPair("secret-access", "secret-refresh", 1, {"version": 7})
    assert "secret" not in repr(pair)
    with pytest.raises(ValueError):
        pair.fields()
