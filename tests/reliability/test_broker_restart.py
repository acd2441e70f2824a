"""A broker restarted with 2,000 commands queued and no worker running loses none of them.

The broker is a private server of the test's own (tests/private_brokers.py), never the machine's
shared one: RabbitMQ keeps durable queues and persistent messages across a clean node stop, and
Redis keeps its lists in an append-only file fsynced on every write. Replies and the services'
state stay on the shared Redis (DB 12, namespaced like every other test's), so the restart is a
broker event only: the effects and replies counted afterwards were not kept by the server that
was restarted, they were made by a worker started after it came back. And a command or event sent
while the broker is down waits for it, retried, instead of failing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.bus import PendingReply
from postroom.topology import command_queue_name, event_queue_name
from tests.integration.services import POOLS, SERVICE, Count, ProbeHappened
from tests.private_brokers import PrivateRabbitMQ, PrivateRedis
from tests.support import BrokerContext, broker_context, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(400)]
POOL = Pool("probe", (command_queue_name(SERVICE),), concurrency=2)
N = 2_000
CHUNK = 1000
SAMPLE = 100  # replies read back one by one: every 20th command's
#: seconds the server is down under a send: longer than kombu's own connect timeout (a new
#: channel to a server that is down gives up after about 6 s), shorter than the retry policy's
#: waits (POSTROOM_PUBLISH_RETRIES: about 15 s)
DOWN = 9.0


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        yield server


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    with PrivateRabbitMQ() as server:
        yield server


@pytest.fixture
def on_private_redis(private_redis: PrivateRedis, tmp_path: Path) -> Iterator[BrokerContext]:
    ctx = broker_context("redis", tmp_path, broker_url=private_redis.url)
    yield ctx
    ctx.close()  # torn down before the server fixture: the worker stops before its broker


@pytest.fixture
def on_private_rabbitmq(
    private_rabbitmq: PrivateRabbitMQ, tmp_path: Path
) -> Iterator[BrokerContext]:
    # "redis" only means: no vhost on the shared RabbitMQ; the broker is the private node's URL
    ctx = broker_context("redis", tmp_path, broker_url=private_rabbitmq.url)
    yield ctx
    ctx.close()


@dataclass
class Batch:
    """Count commands sent while no worker runs, and how to count their effects."""

    ctx: BrokerContext
    bus: MessageBus
    run: str
    keys: list[str]
    pending: list[PendingReply]

    @classmethod
    def send(cls, ctx: BrokerContext, n: int) -> Batch:
        batch = cls(ctx, MessageBus(ctx.app, source="tests"), uuid.uuid4().hex, [], [])
        for _ in range(n):
            batch.send_one()
        return batch

    def send_one(self) -> None:
        key = f"{self.run}-{len(self.keys)}"
        self.pending.append(self.bus.send(Count(key=key)))
        self.keys.append(key)

    def counts(self) -> list[str | None]:
        db = self.ctx.state()
        counters = [self.ctx.key(SERVICE, "count", k) for k in self.keys]
        return [v for i in range(0, len(counters), CHUNK) for v in db.mget(counters[i : i + CHUNK])]

    def counted(self) -> int:
        return sum(1 for v in self.counts() if v)


def after_restart(batch: Batch, queued: Callable[[], int]) -> float:
    """One more command from the same sender, then a worker: all of them run exactly once."""
    # The sender's pooled broker connection died with the broker: bus.send reconnects by itself,
    # and so does the worker's readiness check (wait_until_ready) that start_worker runs.
    batch.send_one()
    wait_for(lambda: queued() == N + 1, timeout=15, interval=0.5)  # a quorum queue's count lags
    assert batch.counted() == 0  # nothing ran before the worker
    started = time.monotonic()
    worker = batch.ctx.start_worker(POOL)
    total = len(batch.keys)
    try:
        wait_for(lambda: batch.counted() == total, timeout=240, interval=0.5)
    except AssertionError:
        raise AssertionError(
            f"{total - batch.counted()} of {total} commands never ran after the restart "
            f"({queued()} still queued):\n{worker.output()[-3000:]}"
        ) from None
    drained = time.monotonic() - started
    assert batch.counts() == ["1"] * total  # exactly one effect per command
    for p in [*batch.pending[: N : N // SAMPLE], batch.pending[-1]]:
        reply = batch.bus.reply_for(p.correlation_id, timeout=30)
        assert (reply.status, reply.correlation_id) == ("succeeded", p.correlation_id)
    wait_for(lambda: queued() == 0, timeout=30)
    return drained


def test_rabbitmq_node_restart_keeps_2000_queued_commands(
    private_rabbitmq: PrivateRabbitMQ, on_private_rabbitmq: BrokerContext
) -> None:
    node, ctx = private_rabbitmq, on_private_rabbitmq
    queue = command_queue_name(SERVICE)
    # a quorum queue keeps every message on disk (its Raft log), and reports its count on each
    # tick of the queue (every 5 s by default), so the count is waited for
    kept = {"type": "quorum", "durable": "true", "messages": str(N)}

    started = time.monotonic()
    batch = Batch.send(ctx, N)  # publisher confirms: each send returns once the node has it
    sent = time.monotonic()
    wait_for(lambda: node.queues()[queue] == kept, timeout=15, interval=0.5)

    node.restart()  # rabbitmqctl stop, then the same node name, ports and data directory
    restarted = time.monotonic()
    assert (node.starts, node.exit_codes) == (2, [0])  # a clean stop, then a second start
    # recovered from disk, before any consumer
    wait_for(lambda: node.queues().get(queue) == kept, timeout=15, interval=0.5)

    drained = after_restart(batch, lambda: int(node.queues()[queue]["messages"]))
    print(
        f"\nrabbitmq: sent {N} in {sent - started:.1f}s, restarted in {restarted - sent:.1f}s, "
        f"drained in {drained:.1f}s"
    )


def test_redis_restart_keeps_2000_queued_commands(
    private_redis: PrivateRedis, on_private_redis: BrokerContext
) -> None:
    server, ctx = private_redis, on_private_redis
    queue = ctx.key(command_queue_name(SERVICE))  # kombu's list, under the global key prefix

    started = time.monotonic()
    batch = Batch.send(ctx, N)
    sent = time.monotonic()
    assert server.queued(queue) == N

    server.restart()  # SHUTDOWN, then the same port, directory and append-only file
    restarted = time.monotonic()
    assert (server.starts, server.exit_codes) == (2, [0])  # a clean stop, then a second start
    assert server.queued(queue) == N  # read back from the append-only file

    drained = after_restart(batch, lambda: server.queued(queue))
    print(
        f"\nredis: sent {N} in {sent - started:.1f}s, restarted in {restarted - sent:.1f}s, "
        f"drained in {drained:.1f}s"
    )


def test_a_command_and_an_event_sent_while_redis_is_down_are_stored_once_it_is_back(
    private_redis: PrivateRedis, on_private_redis: BrokerContext
) -> None:
    """Both sends retry (POSTROOM_PUBLISH_RETRIES, about 15 s in all). An event published on
    Redis used to have only redis-py's own few retries, and raised SendFailed within seconds;
    then both gave up after kombu's 6 s connect timeout, whatever the policy said."""
    server, ctx = private_redis, on_private_redis
    with ctx.app.connection_for_write() as conn:  # the event queues, bound as a started pool binds
        for queue in ctx.app.amqp.queues.values():
            queue.bind(conn.default_channel).declare()
    bus = MessageBus(ctx.app, source="tests")
    bus.send(Count(key="before"))  # the sender's pooled connection is open when the server goes
    server.stop()
    outcomes: dict[str, object] = {}

    def attempt(name: str, send: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                outcomes[name] = send()
            except Exception as error:  # the test's failure, reported below
                outcomes[name] = error

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    senders = [
        attempt("command", lambda: bus.send(Count(key="while-down"))),
        attempt("event", lambda: bus.publish(ProbeHappened(key="while-down"))),
    ]
    time.sleep(DOWN)
    assert outcomes == {}, outcomes  # neither gave up while the server was down
    server.start()
    for sender in senders:
        sender.join(30)
    assert not any(isinstance(o, Exception) for o in outcomes.values()), outcomes
    assert set(outcomes) == {"command", "event"}
    assert server.queued(ctx.key(command_queue_name(SERVICE))) == 2
    assert {pool: server.queued(ctx.key(event_queue_name(pool))) for pool in POOLS} == {
        pool: 1 for pool in POOLS
    }
