"""What postroom adds to a Celery worker: partition leases, the outbox sweep, the unrouted queue,
and on Redis the heartbeat of the messages it holds and the promotion of delayed messages.

The partition leasing logic (postroom.partitions) asks the worker three things through
WorkerHooks; the answers here touch Celery's consumer, its worker state and kombu's Redis
storage format, which is why they live in this package.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import bootsteps
from celery.worker import state as worker_state

from postroom._celery.delays import Promoter
from postroom._celery.fetch import DOORBELL_TTL_MS, RING, doorbell
from postroom.outbox import Relay
from postroom.partitions import LeaseBoard, PartitionLeaser, partition_count
from postroom.registry import registry
from postroom.reliability import reliability
from postroom.topology import GIVEN_UP_QUEUE, UNROUTED_QUEUE, command_queue_name

logger = logging.getLogger(__name__)

#: put one unacknowledged message back at the head of its queue, unless someone else already did,
#: and ring the queue's doorbell (postroom._celery.fetch)
_RESTORE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('RPUSH', KEYS[3], ARGV[2])
    redis.call('ZADD', KEYS[4], 0, ARGV[3])
    redis.call('PEXPIRE', KEYS[4], ARGV[4])
    return 1
end
return 0
"""


def restore_orphans(client: redis.Redis, keyprefix: str, queue: str) -> int:
    """Put a crashed consumer's unacknowledged messages of ``queue`` back at its head, oldest
    first; the number restored.

    kombu keeps each delivered-but-unacknowledged message in a hash, with its delivery time in
    a sorted set, until the consumer acknowledges it. Only the previous lease holder consumed
    this queue, so every entry for it here is that holder's.
    """
    unacked, index = keyprefix + "unacked", keyprefix + "unacked_index"
    orphans = []
    for tag, raw in client.hscan_iter(unacked, count=500):
        message, _exchange, routing_key = json.loads(raw)
        if routing_key == queue:
            orphans.append((client.zscore(index, tag) or 0.0, tag, message))
    restore = client.register_script(_RESTORE)
    restored = 0
    # RPUSH puts a message where the consumer takes the next one from (the tail): newest first,
    # so the oldest is taken first.
    for _score, tag, message in sorted(orphans, key=lambda o: o[0], reverse=True):
        keys = [unacked, index, keyprefix + queue, keyprefix + doorbell(queue)]
        args = [tag, json.dumps(message), RING, DOORBELL_TTL_MS]
        restored += int(restore(keys=keys, args=args))
    return restored


def broker_redis(app: Any) -> tuple[redis.Redis | None, str]:
    """A client of the app's Redis broker and its key prefix; no client on RabbitMQ."""
    keyprefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    if app.conf.broker_url.startswith(("redis://", "rediss://")):
        return redis.Redis.from_url(app.conf.broker_url), keyprefix
    return None, keyprefix


class CeleryWorkerHooks:
    """A Celery consumer, as a partition leaser sees it."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        app = consumer.app
        self._client, self._keyprefix = broker_redis(app)

    def consume(self, queue: str, on: bool) -> None:
        c = self.consumer
        c.call_soon(c.add_task_queue if on else c.cancel_task_queue, queue)

    def in_hand(self, queue: str) -> bool:
        requests = [*worker_state.active_requests, *worker_state.reserved_requests]
        return any(
            (getattr(r, "delivery_info", None) or {}).get("routing_key") == queue for r in requests
        )

    def restore(self, queue: str) -> int:
        """On Redis by hand; RabbitMQ gives a lost consumer's messages back by itself."""
        if self._client is None:
            return 0
        return restore_orphans(self._client, self._keyprefix, queue)


class PartitionLeasing(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: a worker consuming a partitioned service's command queue also takes
    its share of that service's partition queues, and only runs one message at a time."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.leasers: list[PartitionLeaser] = []

    def start(self, c: Any) -> None:
        app = c.app
        consumed = set(app.amqp.queues.consume_from or {})
        services = [s for s in registry.partitioned_services() if command_queue_name(s) in consumed]
        if not services:
            return
        if c.controller.concurrency != 1 or (c.initial_prefetch_count or 1) > 1:
            raise RuntimeError(
                f"{', '.join(services)} keep(s) messages in order by partition key, which needs "
                "one message at a time per worker: start this worker with -c 1 and "
                "--prefetch-multiplier 1 (run more workers to handle more partitions at once)"
            )
        from postroom.install import installation  # noqa: PLC0415 - install imports this module

        state = reliability(app)
        ttl = float(installation(app).settings.partition_lease)
        hooks = CeleryWorkerHooks(c)
        for service in services:
            board = LeaseBoard(state.client, state.namespace, service, ttl)
            leaser = PartitionLeaser(
                c.hostname, service, partition_count(app), board, period=ttl / 4, worker=hooks
            )
            self.leasers.append(leaser)
            leaser.start()

    def stop(self, c: Any) -> None:
        for leaser in self.leasers:
            leaser.stop()
            for partition in range(leaser.partitions):
                c.app.amqp.queues.deselect(leaser.queue(partition))
        self.leasers.clear()

    shutdown = stop


def consume_unrouted(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """celeryd_after_setup receiver: every postroom worker also drains the unrouted queue, where a
    message no service owns lands, and the given-up queue, where RabbitMQ puts a message
    delivered too often; the consumer dead-letters each (unknown, delivery-limit)."""
    app = getattr(instance, "app", None)
    if app is None or app.conf.get("postroom") is None:
        return  # a plain Celery app in the same process: not ours to change
    # the declared queue itself, not its name: Celery would build a classic queue from a name
    for name in (UNROUTED_QUEUE, GIVEN_UP_QUEUE):
        if name in app.amqp.queues:  # the given-up queue: with a delivery limit only
            app.amqp.queues.select_add(app.amqp.queues[name])


class OutboxSweeper(threading.Thread):
    """Every few seconds, sends what a dead worker committed and never dispatched."""

    def __init__(self, relay: Relay, stores: list[Any], grace: float, interval: float) -> None:
        super().__init__(name="postroom-outbox-sweep", daemon=True)
        self.relay, self.stores, self.grace, self.interval = relay, stores, grace, interval
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval):
            for store in self.stores:
                try:
                    self.relay.sweep(store, self.grace)
                except Exception:
                    logger.exception("outbox sweep failed; will try again")

    def stop(self) -> None:
        self._stopping.set()


class OutboxSweep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: every worker sweeps the outboxes of its deployment's stores."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sweeper: OutboxSweeper | None = None

    def start(self, c: Any) -> None:
        from postroom.install import installation  # noqa: PLC0415 - install imports this module

        installed = installation(c.app)
        settings, runtime = installed.settings, installed.runtime
        if settings.outbox_sweep <= 0:
            return
        stores = list({id(s): s for s in [runtime.inbox, *runtime.stores.values()]}.values())
        self.sweeper = OutboxSweeper(
            runtime.relay, stores, settings.outbox_grace, settings.outbox_sweep
        )
        self.sweeper.start()

    def stop(self, c: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
            self.sweeper = None

    shutdown = stop


#: heartbeats per visibility timeout: a live worker's messages outlast three missed beats
BEATS_PER_TIMEOUT = 4


def held_delivery_tags() -> list[str]:
    """The delivery tags of the messages this worker process holds: waiting for a pool process,
    running, or waiting out a countdown. Celery's worker state lists them all in ``requests``,
    kept by the process that consumes (a prefork worker's main process)."""
    # copied at once, as the consumer's thread changes it meanwhile (a change in the middle of the
    # copy raises RuntimeError, and that beat is skipped)
    return [request.message.delivery_tag for request in list(worker_state.requests.values())]


def refresh(channel: Any, tags: Sequence[str], now: float) -> None:
    """Mark ``tags`` as delivered at ``now`` in kombu's unacknowledged index, in one ``ZADD XX``:
    a message acknowledged meanwhile is left out rather than added back."""
    if tags:
        with channel.conn_or_acquire() as client:  # kombu's client: it adds the key prefix
            client.zadd(channel.unacked_index_key, dict.fromkeys(tags, now), xx=True)


class Heartbeat(threading.Thread):
    """Every ``interval`` seconds, marks the messages this worker holds as just delivered.

    kombu's Redis sweep gives back every unacknowledged message delivered more than the
    visibility timeout ago, whether its worker died or is still running it. Beating keeps a
    live worker's messages young, so the timeout can be short (a dead worker's messages come
    back soon) without a long handler or a held countdown being delivered twice. A thread rather
    than a timer of the worker's event loop: a solo pool runs its handler on that loop.
    """

    def __init__(self, app: Any, interval: float) -> None:
        super().__init__(name="postroom-heartbeat", daemon=True)
        self.app, self.interval = app, interval
        self._stopping = threading.Event()

    def run(self) -> None:
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            while not self._stopping.wait(self.interval):
                try:
                    refresh(channel, held_delivery_tags(), time.time())
                except Exception as error:  # Redis away, say: the next beat tries again
                    logger.warning("heartbeat of the messages in hand failed: %r", error)

    def stop(self) -> None:
        self._stopping.set()


class MessageHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: on Redis, a worker beats for the messages it holds, BEATS_PER_TIMEOUT
    times per visibility timeout, from its start until its shutdown (not only while its consumer
    is connected: the messages it runs across a reconnection are still its own)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.heartbeat: Heartbeat | None = None

    def start(self, c: Any) -> None:
        from postroom.install import installation  # noqa: PLC0415 - install imports this module

        settings = installation(c.app).settings
        if self.heartbeat is not None or not settings.broker_is_redis:
            return  # RabbitMQ keeps a delivered message as long as its consumer's connection
        self.heartbeat = Heartbeat(c.app, settings.visibility_timeout / BEATS_PER_TIMEOUT)
        self.heartbeat.start()

    def shutdown(self, c: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None


class DelayPromotion(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: on Redis, every worker moves due delayed messages to their queues
    (postroom._celery.delays); RabbitMQ does that itself."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.promoter: Promoter | None = None

    def start(self, c: Any) -> None:
        client, keyprefix = broker_redis(c.app)
        if client is None:
            return
        self.promoter = Promoter(client, keyprefix)
        self.promoter.start()

    def stop(self, c: Any) -> None:
        if self.promoter is not None:
            self.promoter.stop()
            self.promoter = None

    shutdown = stop
