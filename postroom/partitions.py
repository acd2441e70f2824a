"""Ordering by partition key: messages with the same key are handled strictly in send order.

A contract declares its key (``class RecordPosition(Command, partition_key="asset_id")``). The
sender hashes the key's value to one of N partition queues of the owning service
(``commands.<service>.p<k>``), so all of one asset's positions share a queue and keep their
order there; different assets spread over the queues and proceed in parallel.

A queue keeps order only if one consumer at a time takes one message at a time from it. So each
worker of a partitioned service runs one message at a time (``-c 1``, prefetch 1), and holds a
*lease* per partition queue it consumes: a Redis key that expires unless renewed. Workers announce
themselves, take a fair share of the leases, give extras back when another worker joins (after
their in-flight message from that queue has finished), and take over the leases of a worker that
stopped renewing (one that crashed). On RabbitMQ the queues are also single-active-consumer, so the
broker enforces the same rule by itself. On Redis a crashed worker's unacknowledged message would
only come back after the visibility timeout, at the back of the queue; the worker taking over the
lease puts it back at the front first, so order survives the crash.

A transient failure of a partitioned message is retried in place (see handlers): sending it back
to the queue would let the messages behind it overtake it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from typing import Any, Protocol

import redis

from postroom.topology import partition_queue_name

logger = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def partition_of(value: object, partitions: int) -> int:
    """The partition a key value belongs to: the same in every process and every Python run.

    (``hash()`` is salted per process, so it would scatter one key over several queues.)
    """
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def partition_count(app: Any) -> int:
    from postroom.install import installation  # noqa: PLC0415 - install imports this module

    return installation(app).settings.partitions


class LeaseBoard:
    """Which worker consumes which partition queue of one service, kept in Redis with expiry."""

    def __init__(self, client: redis.Redis, namespace: str, service: str, ttl: float) -> None:
        self.client = client
        self.prefix = f"{namespace}:partitions:{service}"
        self.ttl_ms = int(ttl * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def lease_key(self, partition: int) -> str:
        return f"{self.prefix}:lease:{partition}"

    def beat(self, member: str) -> int:
        """Announce ``member`` as alive; the number of workers alive, this one included."""
        now = time.time()
        members = f"{self.prefix}:members"
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(members, {member: now})
        pipe.zremrangebyscore(members, "-inf", now - self.ttl_ms / 1000)
        pipe.zcard(members)
        return max(1, int(pipe.execute()[-1]))

    def leave(self, member: str) -> None:
        self.client.zrem(f"{self.prefix}:members", member)

    def acquire(self, partition: int, member: str) -> bool:
        return bool(self.client.set(self.lease_key(partition), member, nx=True, px=self.ttl_ms))

    def renew(self, partition: int, member: str) -> bool:
        return bool(self._renew(keys=[self.lease_key(partition)], args=[member, self.ttl_ms]))

    def release(self, partition: int, member: str) -> None:
        self._release(keys=[self.lease_key(partition)], args=[member])

    def holder(self, partition: int) -> str | None:
        value = self.client.get(self.lease_key(partition))
        return None if value is None else str(value)


class WorkerHooks(Protocol):
    """What a leaser asks of the worker it runs in (postroom._celery.bootsteps gives Celery's)."""

    def consume(self, queue: str, on: bool) -> None:
        """Start or stop taking messages from ``queue``."""

    def in_hand(self, queue: str) -> bool:
        """Whether a message of ``queue`` is running or reserved here."""

    def restore(self, queue: str) -> int:
        """Put a crashed consumer's unacknowledged messages of ``queue`` back at its head."""


class PartitionLeaser(threading.Thread):
    """Keeps this worker's fair share of one service's partition queues, and only those."""

    def __init__(self, member: str, service: str, partitions: int, board: LeaseBoard, *,
                 period: float, worker: WorkerHooks) -> None:  # fmt: skip
        super().__init__(name=f"postroom-partitions-{service}", daemon=True)
        self.worker = worker
        self.service = service
        self.partitions = partitions
        self.board = board
        self.period = period
        self.member = member
        self.held: set[int] = set()
        self._stopping = threading.Event()

    def queue(self, partition: int) -> str:
        return partition_queue_name(self.service, partition)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("partition leases of %s: will try again", self.service)
            self._stopping.wait(self.period)

    def tick(self) -> None:
        share = math.ceil(self.partitions / self.board.beat(self.member))
        for partition in sorted(self.held):
            if not self.board.renew(partition, self.member):
                logger.warning(
                    "lost the lease of %s; no longer consuming it", self.queue(partition)
                )
                self._consume(partition, False)
                self.held.discard(partition)
        if len(self.held) > share:
            self.give_back(max(self.held))
            return
        start = partition_of(self.member, self.partitions)  # workers try different ones first
        for offset in range(self.partitions):
            if len(self.held) >= share:
                break
            partition = (start + offset) % self.partitions
            if partition not in self.held and self.board.acquire(partition, self.member):
                restored = self.worker.restore(self.queue(partition))
                if restored:
                    logger.warning("put %d message(s) of a crashed consumer back at the head of %s",
                                   restored, self.queue(partition))  # fmt: skip
                self.held.add(partition)
                self._consume(partition, True)

    def give_back(self, partition: int) -> None:
        """Stop taking from the queue, let the message in hand finish, then free the lease."""
        self._consume(partition, False)
        queue = self.queue(partition)
        while self.worker.in_hand(queue) and not self._stopping.is_set():
            time.sleep(0.05)
        self.held.discard(partition)
        self.board.release(partition, self.member)
        logger.info("gave %s back for another worker", queue)

    def _consume(self, partition: int, on: bool) -> None:
        self.worker.consume(self.queue(partition), on)

    def stop(self) -> None:
        """On shutdown: leases are freed for the other workers (a crash lets them expire instead)."""
        self._stopping.set()
        for partition in sorted(self.held):
            self.board.release(partition, self.member)
        self.held.clear()
        self.board.leave(self.member)
