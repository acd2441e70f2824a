"""Events over real workers, on Redis and RabbitMQ: each pool gets its own copy, and keeps it."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus
from tests.integration.services import POOLS, EmitProbe, ProbeHappened
from tests.support import BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]
PROBE_CONCURRENCY = 2


def deliveries(broker: BrokerContext, key: str, pool: str) -> list[dict[str, object]]:
    return [
        json.loads(d) for d in broker.state().lrange(broker.key("probe", key, "done", pool), 0, -1)
    ]


def runs(broker: BrokerContext, key: str) -> dict[str, int]:
    counted = broker.state().hgetall(broker.key("probe", key, "runs"))
    return {pool: int(counted.get(pool, 0)) for pool in POOLS}


def settle(broker: BrokerContext, key: str, expected: dict[str, int], timeout: float = 60) -> None:
    """Until each pool has handled ``expected`` deliveries, then a moment more to catch extras."""
    wait_for(
        lambda: all(len(deliveries(broker, key, p)) >= n for p, n in expected.items()),
        timeout=timeout,
    )
    time.sleep(1.0)


def test_event_published_by_a_handler_reaches_every_pool_once_in_the_same_conversation(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    pending = bus.send(EmitProbe(key=key))
    event_id = pending.reply(timeout=30).value
    settle(broker, key, dict.fromkeys(POOLS, 1))
    for pool in POOLS:
        [delivery] = deliveries(broker, key, pool)
        assert delivery["message_id"] == event_id
        assert delivery["correlation_id"] == pending.correlation_id
        assert delivery["causation_id"] == pending.message_id


def test_a_retried_event_runs_again_in_the_failing_pool_only(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    bus.publish(ProbeHappened(key=key, fail_pool="pool_a", fail_times=2))
    settle(broker, key, dict.fromkeys(POOLS, 1))
    assert runs(broker, key) == {"pool_a": 3, "pool_b": 1, "pool_c": 1}
    assert [d["attempt"] for d in deliveries(broker, key, "pool_a")] == [3]


def test_a_stopped_pool_receives_every_event_when_it_starts_again(
    broker: BrokerContext, bus: MessageBus, pools: dict[str, Pool]
) -> None:
    key = uuid.uuid4().hex
    [worker] = [w for w in broker.workers if w.pool.name == "pool_c" and w.proc.poll() is None]
    worker.stop()
    published = {bus.publish(ProbeHappened(key=key)) for _ in range(500)}
    settle(broker, key, {"pool_a": 500, "pool_b": 500}, timeout=120)
    assert deliveries(broker, key, "pool_c") == []
    broker.start_worker(pools["pool_c"])
    settle(broker, key, dict.fromkeys(POOLS, 500), timeout=120)
    for pool in POOLS:
        handled = [d["message_id"] for d in deliveries(broker, key, pool)]
        assert len(handled) == 500, pool
        assert set(handled) == published, pool
    assert runs(broker, key) == dict.fromkeys(POOLS, 500)


def test_a_worker_killed_mid_event_gets_it_again_in_its_own_pool_only(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    bus.publish(ProbeHappened(key=key, hang_pool="pool_b"))
    hung = broker.key("probe", key, "hung", "pool_b")
    wait_for(lambda: broker.state().get(hung) is not None, timeout=30)
    os.kill(int(broker.state().get(hung) or 0), signal.SIGKILL)
    settle(broker, key, dict.fromkeys(POOLS, 1))
    assert runs(broker, key) == {"pool_a": 1, "pool_b": 2, "pool_c": 1}
    assert [len(deliveries(broker, key, p)) for p in POOLS] == [1, 1, 1]
