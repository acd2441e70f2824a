"""One rule book, two stores: the Redis breakers every worker shares and the harness's in-memory
ones open, hold, probe and close alike (the Redis one in a namespace of DB 13 of its own)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from postroom.breakers import BreakerStore, Limits, MemoryBreakers, RedisBreakers

REDIS = "redis://127.0.0.1:6379/13"
LIMITS = Limits(failures=3, cooldown=10.0)
NAME = "billing:billing.Charge"


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[BreakerStore]:
    if request.param == "memory":
        yield MemoryBreakers()
        return
    namespace = f"b{uuid.uuid4().hex[:10]}"
    with redis.Redis.from_url(REDIS, decode_responses=True) as client:
        yield RedisBreakers(client, namespace)
        keys = list(client.scan_iter(f"{namespace}:*"))
        if keys:
            client.delete(*keys)


def _fail(store: BreakerStore, now: float, probe: bool = False) -> str:
    return store.record(NAME, False, probe, now, LIMITS)[0]


def test_it_opens_after_failures_in_a_row_only(store: BreakerStore) -> None:
    assert [_fail(store, 0.0), _fail(store, 0.0)] == ["", ""]
    assert store.record(NAME, True, False, 0.0, LIMITS) == ("", 0)  # a success starts again
    assert [_fail(store, 1.0), _fail(store, 1.0)] == ["", ""]
    assert store.admit(NAME, 1.0, LIMITS).hold is None
    assert store.record(NAME, False, False, 1.0, LIMITS) == ("opened", 3)
    assert store.admit(NAME, 2.5, LIMITS).hold == pytest.approx(8.5)
    assert [s.status(2.5) for s in store.states()] == ["open"]


def test_failures_of_runs_begun_before_it_opened_change_nothing(store: BreakerStore) -> None:
    for _ in range(3):
        _fail(store, 0.0)
    assert [_fail(store, 5.0), _fail(store, 6.0)] == ["", ""]
    assert store.admit(NAME, 9.0, LIMITS).hold == pytest.approx(1.0)


def test_after_the_cooldown_exactly_one_probe_runs(store: BreakerStore) -> None:
    for _ in range(3):
        _fail(store, 0.0)
    probe = store.admit(NAME, 10.0, LIMITS)
    assert (probe.hold, probe.probe) == (None, True)
    others = [store.admit(NAME, 10.5, LIMITS) for _ in range(5)]
    assert {(a.hold, a.probe) for a in others} == {(1.0, False)}
    assert [s.status(10.5) for s in store.states()] == ["half-open"]


def test_a_probe_that_fails_opens_it_again_and_one_that_succeeds_closes_it(
    store: BreakerStore,
) -> None:
    for _ in range(3):
        _fail(store, 0.0)
    assert store.admit(NAME, 10.0, LIMITS).probe
    assert _fail(store, 10.0, probe=True) == "reopened"
    assert store.admit(NAME, 15.0, LIMITS).hold == pytest.approx(5.0)
    assert store.admit(NAME, 20.0, LIMITS).probe
    assert store.record(NAME, True, True, 20.0, LIMITS)[0] == "closed"
    assert store.admit(NAME, 20.0, LIMITS).hold is None
    assert [(s.failures, s.status(20.0)) for s in store.states()] == [(0, "closed")]


def test_a_probe_whose_worker_died_gives_way_after_a_cooldown(store: BreakerStore) -> None:
    short = Limits(failures=3, cooldown=0.05)  # the Redis lease is a key with this TTL
    for _ in range(3):
        store.record(NAME, False, False, 0.0, short)
    assert store.admit(NAME, 0.05, short).probe
    assert not store.admit(NAME, 0.06, short).probe
    time.sleep(0.2)
    assert store.admit(NAME, 0.2, short).probe


def test_it_can_be_opened_and_closed_by_hand(store: BreakerStore) -> None:
    store.force(NAME, 45.0)
    assert store.admit(NAME, 40.0, LIMITS).hold == pytest.approx(5.0)
    store.force(NAME, 0.0)
    assert store.admit(NAME, 40.0, LIMITS).hold is None


def test_a_message_is_never_held_longer_than_a_cooldown(store: BreakerStore) -> None:
    store.force(NAME, 1e9)  # opened by hand, until closed by hand
    assert store.admit(NAME, 40.0, LIMITS).hold == LIMITS.cooldown


RATIO = Limits(failures=100, cooldown=10.0, ratio=0.5, window=60.0, min_calls=10)


def _run(store: BreakerStore, ok: bool, now: float) -> tuple[str, int]:
    return store.record(NAME, ok, False, now, RATIO)


def test_a_failure_ratio_over_a_window_opens_it_once_the_window_saw_enough_runs(
    store: BreakerStore,
) -> None:
    changes = [_run(store, n % 2 == 0, 1.0 + n)[0] for n in range(9)]  # 4 of 9 failed
    assert changes == [""] * 9
    assert _run(store, False, 10.0) == ("opened", 5)  # 5 of 10: half
    assert store.admit(NAME, 10.0, RATIO).hold == pytest.approx(10.0)


def test_the_window_starts_again_once_it_is_over(store: BreakerStore) -> None:
    for n in range(9):
        _run(store, n % 3 != 0, 0.0 + n)  # 3 of 9 failed
    # a new window at 60 s: its runs alone count, and 1 failure of 1 run is not enough runs
    assert _run(store, False, 60.0)[0] == ""
    assert [_run(store, True, 61.0 + n)[0] for n in range(8)] == [""] * 8
    assert _run(store, False, 70.0)[0] == ""  # 2 of 10 failed
    assert store.admit(NAME, 70.0, RATIO).hold is None


def test_without_a_ratio_no_window_is_counted(store: BreakerStore) -> None:
    for n in range(20):
        assert store.record(NAME, n % 2 == 0, False, float(n), LIMITS)[0] == ""
