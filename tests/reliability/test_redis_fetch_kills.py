"""A worker's main process killed with -9 at random instants, 30 times over, while it drains a
queue kept thousands of commands deep on Redis: no command is lost, none takes effect twice.

Stock kombu loses the message its consumer is fetching when the process dies (BRPOP takes it off
the queue a round trip before it is recorded as unacknowledged, celery/celery#7950); postroom's
transport does both in one script (postroom/_celery/fetch.py). Each kill lands while messages
flow, a random fraction of a second after the worker said it was ready; its successor is already
starting by then (a worker takes seconds to start, and the test would otherwise wait for each).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from config.pools import Pool
from postroom import MessageBus
from postroom.reliability import reliability
from postroom.topology import command_queue_name
from tests.integration.services import SERVICE, Count
from tests.support import BrokerContext, broker_context, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]
POOL = Pool("probe", (command_queue_name(SERVICE),), concurrency=2)
KILLS, BATCH, BACKLOG = 30, 1000, 400


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerContext]:
    """Redis only (RabbitMQ keeps a delivered message until it is acknowledged); a killed worker's
    messages come back within about two seconds."""
    workdir = tmp_path_factory.mktemp("redis-fetch-kills")
    ctx = broker_context("redis", workdir, visibility_timeout="2", restore_interval="1")
    yield ctx
    ctx.close()


def test_a_worker_killed_30_times_while_fetching_loses_no_command_and_doubles_none(
    broker: BrokerContext,
) -> None:
    run = uuid.uuid4().hex
    bus = MessageBus(broker.app, source="tests")
    keys: list[str] = []
    db = broker.state()

    def counted() -> int:
        return sum(1 for v in db.mget(keys) if v)

    def top_up() -> None:
        """However fast this machine drains, every kill lands with a backlog still queued."""
        if len(keys) - counted() >= BACKLOG:
            return
        batch = [f"{run}-{i}" for i in range(len(keys), len(keys) + BATCH)]
        keys.extend(broker.key(SERVICE, "count", key) for key in batch)
        bus.send_many([Count(key=key) for key in batch])

    chance = random.Random()
    started = time.monotonic()
    top_up()
    worker = broker.spawn_worker(POOL)
    for _ in range(KILLS):
        successor = broker.spawn_worker(POOL)
        wait_for(lambda w=worker: " ready." in w.output(), timeout=60, interval=0.02)
        time.sleep(chance.uniform(0, 0.3))
        top_up()
        worker.kill_9()
        worker = successor
    sent = len(keys)
    print(f"{KILLS} kills in {time.monotonic() - started:.1f}s, {counted()} of {sent} counted")

    try:
        wait_for(lambda: counted() == sent and _nothing_unacknowledged(broker), timeout=60)
    except AssertionError:
        raise AssertionError(f"{sent - counted()} of {sent} commands never took effect") from None
    assert db.mget(keys) == ["1"] * sent  # every command took effect, once
    assert len(reliability(broker.app).dead_letters) == 0


def _nothing_unacknowledged(broker: BrokerContext) -> bool:
    with redis.Redis.from_url(broker.app.conf.broker_url) as client:
        return not client.hlen(f"{broker.namespace}:unacked")
