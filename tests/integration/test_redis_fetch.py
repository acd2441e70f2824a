"""postroom's Redis fetch, against kombu's own Redis transport on a real Redis.

Taking a message and recording it as unacknowledged is one script (postroom/_celery/fetch.py);
these tests hold it, and the workers' heartbeat that refreshes the same record, to what kombu
itself writes and reads, so that kombu's acks and restores, and workers running stock kombu, keep
working on postroom's queues. Each test keeps its keys under a prefix of its own in Redis DB 14,
and deletes them afterwards.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue

from postroom._celery import transport
from postroom._celery.bootsteps import refresh
from postroom._celery.fetch import doorbell
from tests.private_brokers import PrivateRedis
from tests.support import REDIS

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]
URL = f"{REDIS}/14"
STOCK = "redis"  # kombu's own Redis transport, as an older worker or a plain client runs it


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"fetch-{uuid.uuid4().hex[:8]}:"
    yield prefix
    with redis.Redis.from_url(URL) as db:
        keys = list(db.scan_iter(f"{prefix}*", count=1000))
        if keys:
            db.delete(*keys)


@pytest.fixture
def db() -> Iterator[redis.Redis]:
    with redis.Redis.from_url(URL) as client:
        yield client


def connect(prefix: str, kind: str = transport.NAME, url: str = URL, **options: Any) -> Connection:
    return Connection(
        url, transport=kind, transport_options={"global_keyprefix": prefix, **options}
    )


def take(conn: Connection, *queues: Queue, n: int = 1, no_ack: bool = False) -> list[Message]:
    """The next ``n`` messages from ``queues``, left unacknowledged."""
    taken: list[Message] = []
    with Consumer(conn, list(queues), callbacks=[lambda _, m: taken.append(m)], no_ack=no_ack):
        while len(taken) < n:
            conn.drain_events(timeout=5)
    return taken


def test_a_fetched_message_is_recorded_unacknowledged_exactly_as_kombu_records_it(
    prefix: str, db: redis.Redis
) -> None:
    queue = Queue("q", Exchange("x", type="direct"), routing_key="rk")
    with connect(prefix) as ours, connect(prefix + "stock:", STOCK) as stock:
        Producer(ours).publish({"n": 1}, exchange=queue.exchange, routing_key="rk", declare=[queue])
        # the very same message, in the queue stock kombu consumes
        db.lpush(f"{prefix}stock:q", db.lindex(f"{prefix}q", 0))
        before = time.time()
        [mine], [theirs] = take(ours, queue), take(stock, queue)
        after = time.time()

        tag = mine.delivery_tag
        assert theirs.delivery_tag == tag
        record = json.loads(db.hget(f"{prefix}unacked", tag))
        assert record == json.loads(db.hget(f"{prefix}stock:unacked", tag))
        assert record[1:] == ["x", "rk"]
        assert before <= float(db.zscore(f"{prefix}unacked_index", tag)) <= after


def test_kombus_own_ack_and_restore_handle_a_fetched_message(prefix: str, db: redis.Redis) -> None:
    queue = Queue("q")
    unacked = f"{prefix}unacked"
    with connect(prefix) as ours, connect(prefix, STOCK, visibility_timeout=0) as stock:
        producer = Producer(ours)
        for n in (1, 2, 3):
            producer.publish({"n": n}, routing_key="q", declare=[queue])
        first, second, third = take(ours, queue, n=3)
        assert db.hlen(unacked) == 3

        first.ack()  # kombu's QoS.ack
        assert not db.hexists(unacked, first.delivery_tag)
        assert db.zscore(f"{prefix}unacked_index", first.delivery_tag) is None

        db.delete(f"{prefix}{doorbell('q')}")
        second.reject(requeue=True)  # kombu's restore, through postroom's channel: it rings
        assert db.exists(f"{prefix}{doorbell('q')}")

        # an older worker's sweep, on stock kombu, finds the third overdue and puts it back
        stock.default_channel.qos.restore_visible(num=10)
        assert db.hlen(unacked) == 0
        again = take(ours, queue, n=2)
        assert sorted(m.payload["n"] for m in again) == [2, 3]
        assert all(m.delivery_info["redelivered"] for m in again)
        assert third.delivery_tag in {m.delivery_tag for m in again}


def test_a_heartbeat_keeps_a_held_message_from_kombus_sweep_and_never_revives_an_acked_one(
    prefix: str, db: redis.Redis
) -> None:
    queue, index = Queue("q"), f"{prefix}unacked_index"
    with connect(prefix) as ours, connect(prefix, STOCK, visibility_timeout=60) as stock:
        producer = Producer(ours)
        for n in (1, 2):
            producer.publish({"n": n}, routing_key="q", declare=[queue])
        held, acked = take(ours, queue, n=2)
        acked.ack()
        db.zadd(index, {held.delivery_tag: 0})  # delivered long ago, past any visibility timeout

        now = time.time()
        refresh(ours.default_channel, [held.delivery_tag, acked.delivery_tag], now)
        assert db.zscore(index, held.delivery_tag) == pytest.approx(now)
        assert db.zscore(index, acked.delivery_tag) is None
        sweep = stock.default_channel.qos
        sweep.restore_visible(num=10, interval=1)  # each call sweeps (not one in ten)
        assert db.hexists(f"{prefix}unacked", held.delivery_tag)  # still held, not given back

        db.zadd(index, {held.delivery_tag: 0})  # its worker stopped beating
        sweep.restore_visible(num=10, interval=1)
        assert [m.delivery_tag for m in take(ours, queue)] == [held.delivery_tag]


def test_a_consumer_of_several_queues_takes_messages_in_the_order_kombus_brpop_does(
    prefix: str,
) -> None:
    queues = [Queue(f"q{i}", max_priority=9) for i in range(3)]
    sent = [(queue, n, priority) for n in range(4) for queue in queues for priority in (0, 5, 9)]

    def drained(kind: str, keyprefix: str) -> list[tuple[str, int, int]]:
        with connect(keyprefix, kind) as conn:
            producer = Producer(conn)
            for queue, n, priority in sent:
                body = {"queue": queue.name, "n": n, "priority": priority}
                producer.publish(body, routing_key=queue.name, priority=priority, declare=[queue])
            taken = take(conn, *queues, n=len(sent))
            for message in taken:
                message.ack()
            return [(m.payload["queue"], m.payload["n"], m.payload["priority"]) for m in taken]

    assert drained(transport.NAME, prefix) == drained(STOCK, prefix + "stock:")


def test_an_idle_consumer_wakes_at_a_ring_and_finds_an_unrung_message_within_a_second(
    prefix: str, db: redis.Redis
) -> None:
    queue = Queue("q")
    with connect(prefix) as ours, connect(prefix, STOCK) as stock:
        ours.default_channel.queue_declare("q")

        def latency(publisher: Connection) -> float:
            sent: list[float] = []

            def publish() -> None:
                with publisher.clone() as conn:
                    producer = Producer(conn)
                    time.sleep(0.3)  # the consumer is waiting on its doorbells by now
                    sent.append(time.monotonic())
                    producer.publish({}, routing_key="q")

            thread = threading.Thread(target=publish)
            thread.start()
            take(ours, queue)[0].ack()
            thread.join()
            return time.monotonic() - sent[0]

        assert latency(ours) < 0.2
        assert latency(stock) < 1.5  # found by the fetch the wait's one-second timeout triggers
        assert not db.exists(f"{prefix}{doorbell('q')}")


def test_a_no_ack_consumer_leaves_nothing_unacknowledged(prefix: str, db: redis.Redis) -> None:
    queue = Queue("q")
    with connect(prefix) as ours:
        Producer(ours).publish({"n": 1}, routing_key="q", declare=[queue])
        [message] = take(ours, queue, no_ack=True)
        assert message.payload == {"n": 1}
        assert db.hlen(f"{prefix}unacked") == 0


def test_a_consumer_goes_on_after_redis_forgets_its_script() -> None:
    queue = Queue("q")
    with PrivateRedis() as server, connect("", url=server.url) as ours:
        producer = Producer(ours)
        producer.publish({"n": 1}, routing_key="q", declare=[queue])
        assert take(ours, queue)[0].payload == {"n": 1}
        with server.client() as db:
            db.script_flush()  # as after a restart
        producer.publish({"n": 2}, routing_key="q")
        assert take(ours, queue)[0].payload == {"n": 2}
