"""One rule book, two stores: the Redis rate limits every worker shares (on the server's clock)
and the harness's in-memory ones hand out slots alike (the Redis one in a namespace of DB 13)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from postroom.ratelimits import AHEAD, MemoryRateLimits, RateLimitStore, RedisRateLimits

REDIS = "redis://127.0.0.1:6379/13"
NAME = "vendor:vendor.Call"
INTERVAL = 10.0  # long enough that the time the test itself takes does not count


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[RateLimitStore]:
    if request.param == "memory":
        yield MemoryRateLimits()
        return
    namespace = f"r{uuid.uuid4().hex[:10]}"
    with redis.Redis.from_url(REDIS, decode_responses=True) as client:
        yield RedisRateLimits(client, namespace)
        keys = list(client.scan_iter(f"{namespace}:*"))
        if keys:
            client.delete(*keys)


def _take(store: RateLimitStore, carried: str = "", in_place: float = 0.1) -> tuple[float, str]:
    slot = store.take(NAME, time.time(), INTERVAL, carried, in_place)
    return slot.wait, slot.token


def test_slots_are_one_interval_apart_and_reserved_beyond_a_wait_in_place(
    store: RateLimitStore,
) -> None:
    (now, none), (next_, token), (after, other) = (_take(store) for _ in range(3))
    assert (now, none) == (pytest.approx(0.0, abs=0.05), "")  # free: runs at once
    assert next_ == pytest.approx(INTERVAL, abs=0.05)
    assert after == pytest.approx(2 * INTERVAL, abs=0.05)
    assert token
    assert other
    assert token != other


def test_a_slot_within_the_wait_in_place_is_not_reserved(store: RateLimitStore) -> None:
    _take(store)
    wait, token = _take(store, in_place=INTERVAL + 1)  # a partitioned message's, say
    assert wait == pytest.approx(INTERVAL, abs=0.05)
    assert token == ""


def test_a_reservation_is_spent_once(store: RateLimitStore) -> None:
    assert store.take(NAME, time.time(), 0.2, "", 0.0).token == ""  # a free slot: runs
    held = store.take(NAME, time.time(), 0.2, "", 0.0)
    time.sleep(held.wait)
    assert store.take(NAME, time.time(), 0.2, held.token, 0.0).wait == 0.0  # back: runs at once
    again = store.take(NAME, time.time(), 0.2, held.token, 0.0)  # a redelivered copy asks anew
    assert 0 < again.wait <= 0.2 + 0.005  # the next slot, less the time this test took
    assert again.token
    assert again.token != held.token


def test_a_late_reservation_runs_where_the_runs_leave_room(store: RateLimitStore) -> None:
    assert store.take(NAME, time.time(), 0.2, "", 0.0).token == ""  # a free slot: runs
    held = [store.take(NAME, time.time(), 0.2, "", 0.0) for _ in range(2)]
    assert all(h.token for h in held)
    time.sleep(held[1].wait + 0.1)  # both slots passed
    assert store.take(NAME, time.time(), 0.2, held[0].token, 0.0).wait == 0.0  # room: it runs
    again = store.take(NAME, time.time(), 0.2, held[1].token, 0.0)
    assert again.token  # no room for a second at once: it asked anew
    assert 0 < again.wait <= 0.2 - AHEAD + 0.005  # an interval after the run, less AHEAD
    assert store.take(NAME, time.time(), 0.2, "made-up", 0.0).token  # counts for nothing
