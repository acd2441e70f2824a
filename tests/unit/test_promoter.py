"""The Redis promoter moves a parked message onto its list within milliseconds of its due time
when others are parked (it sleeps until the earliest is due), and a rate limit's slot holder to
the head of its list (DB 13, a namespace of the test's own)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from postroom._celery.delays import DELAYED_KEY, Promoter, park
from postroom.ratelimits import RESERVATION

REDIS = "redis://127.0.0.1:6379/13"


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"p{uuid.uuid4().hex[:10]}:"
    yield prefix
    with redis.Redis.from_url(REDIS) as client:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)


def _park(client: redis.Redis, prefix: str, name: str, due: float, **headers: str) -> None:
    def add(command: str, key: str, mapping: dict[str, float]) -> None:
        client.zadd(prefix + key, mapping)

    park(add, "queue", "queue", {"body": name, "headers": headers}, due)


@pytest.mark.timeout(30)
def test_parked_messages_reach_their_list_on_time_the_slot_holder_first(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS)
    client.lpush(prefix + "queue", b"queued before")
    start = time.time()
    dues = [start + 0.6 + 0.07 * k for k in range(5)]
    for k, due in enumerate(dues):
        _park(client, prefix, f"m{k}", due, **({RESERVATION: "token"} if k == 4 else {}))
    promoter = Promoter(redis.Redis.from_url(REDIS), prefix)
    promoter.start()
    try:
        arrived: dict[int, float] = {}
        while len(arrived) < 5 and time.time() < start + 5:
            found = client.lrange(prefix + "queue", 0, -1)
            for k in range(5):
                if k not in arrived and any(f'"m{k}"'.encode() in raw for raw in found):
                    arrived[k] = time.time()
            time.sleep(0.002)
    finally:
        promoter.stop()
    assert sorted(arrived) == list(range(5))
    lateness = [arrived[k] - due for k, due in enumerate(dues)]
    assert min(lateness) >= -0.002
    # ticking every 0.5 s, the first would be 0.4 s late; a loaded machine adds tens of ms
    assert max(lateness) < 0.2
    assert client.zcard(prefix + DELAYED_KEY) == 0
    head = client.rpop(prefix + "queue")  # kombu takes from this end
    assert head is not None
    assert b'"m4"' in head
    client.close()
