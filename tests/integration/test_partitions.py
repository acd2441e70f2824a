"""Ordering by partition key on Redis and RabbitMQ: 3,000 positions of 50 assets over 4
partitions and 2 single-message workers, one of them killed with -9 a third of the way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from config.pools import Pool
from postroom import MessageBus
from postroom._celery.bootsteps import restore_orphans
from postroom.bus import route
from postroom.partitions import partition_of
from tests.integration.ordering import MoveTo
from tests.support import BROKER_DB, REDIS, BrokerContext, children, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(600)]
SETTINGS = {
    "imports": "tests.integration.services,tests.integration.ordering",
    "partitions": "4",
    "partition_lease": "3",
    "log_level": "INFO",
}
ASSETS, PER_ASSET = 50, 60


def worker(name: str) -> Pool:
    return Pool(name, ("commands.ordered",), concurrency=1)


def test_the_same_key_always_hashes_to_the_same_partition() -> None:
    assert partition_of("asset-7", 4) == partition_of("asset-7", 4)
    assert {partition_of(f"asset-{i}", 4) for i in range(50)} == {0, 1, 2, 3}
    # the same in another Python process (hash() would not be)
    other = subprocess.run(
        [sys.executable, "-c", "from postroom.partitions import partition_of; print(partition_of('asset-7', 4))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert int(other.stdout) == partition_of("asset-7", 4)


def test_a_partitioned_command_goes_to_the_partition_queue_of_its_key(
    broker: BrokerContext,
) -> None:
    queue = route(broker.app, MoveTo(asset="a1", seq=0))
    assert queue.name == f"commands.ordered.p{partition_of('a1', 4)}"
    assert queue.queue_arguments["x-single-active-consumer"] is True


def test_each_keys_messages_are_handled_in_send_order_even_when_a_worker_is_killed(
    broker: BrokerContext,
) -> None:
    run = uuid.uuid4().hex[:8]
    assets = [f"{run}-{i}" for i in range(ASSETS)]
    db = broker.state()
    lists = [broker.key("ordered", "handled", a) for a in assets]  # see ordering.handled
    first = broker.start_worker(worker("ordered-a"))
    broker.start_worker(worker("ordered-b"))
    bus = MessageBus(broker.app, source="tests")
    for seq in range(PER_ASSET):  # interleaved across assets, in order per asset
        bus.send_many([MoveTo(asset=a, seq=seq, flaky=(seq % 97 == 13)) for a in assets])

    def done() -> int:
        pipe = db.pipeline()
        for name in lists:
            pipe.llen(name)
        return sum(pipe.execute())

    wait_for(lambda: done() >= ASSETS * PER_ASSET // 3, timeout=300)
    for pid in [first.proc.pid, *children(first.proc.pid)]:  # the whole worker, mid-way
        os.kill(pid, signal.SIGKILL)
    first.proc.wait()
    wait_for(lambda: done() >= ASSETS * PER_ASSET, timeout=400, interval=0.5)
    time.sleep(1)  # anything doubled would show up now
    for asset, name in zip(assets, lists, strict=True):
        seen = [int(v) for v in db.lrange(name, 0, -1)]
        assert seen == list(range(PER_ASSET)), f"{asset}: out of order, lost or doubled"


def test_a_crashed_consumers_unacknowledged_messages_go_back_to_the_head_oldest_first() -> None:
    """What kombu's Redis transport leaves behind when a consumer dies mid-message, restored."""
    client = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    queue = "commands.ordered.p1"
    try:
        client.rpush(prefix + queue, json.dumps({"n": 2}))  # the next one waiting
        for n, tag, at in ((0, "tag-a", 100.0), (1, "tag-b", 200.0)):
            client.hset(prefix + "unacked", tag, json.dumps([{"n": n}, "", queue]))
            client.zadd(prefix + "unacked_index", {tag: at})
        client.hset(prefix + "unacked", "other", json.dumps([{"n": 9}, "", "commands.other"]))
        assert restore_orphans(client, prefix, queue) == 2
        assert restore_orphans(client, prefix, queue) == 0  # restored once only
        taken = [json.loads(client.rpop(prefix + queue))["n"] for _ in range(3)]  # as BRPOP would
        assert taken == [0, 1, 2]
        assert client.hkeys(prefix + "unacked") == [b"other"]
    finally:
        for name in client.scan_iter(prefix + "*"):
            client.delete(name)
        client.close()
