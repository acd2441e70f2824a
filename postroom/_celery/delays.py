"""Delayed messages held by the broker, never by a worker.

Celery keeps a message with an ETA (``retry(countdown=...)``, ``apply_async(eta=...)``) in the
worker's memory until it is due, and raises the worker's prefetch to make room for it. On Redis a
message held longer than the visibility timeout is then delivered a second time; on RabbitMQ a
prefetch-1 worker holding one is blocked (celery#2599, #4400, #9882), and Celery's native delayed
delivery does not serve the direct exchanges postroom uses. Here a delayed message waits in the
broker, and reaches its queue (the one queue it is meant for: an event's retried copy its own
pool's) once due. Its due time travels in the ``x-postroom-due`` header (seconds since the epoch),
outside the signed ``postroom.*`` envelope since a retry moves it.

**Redis.** The transport's ``_put`` parks a message that is not due yet in one sorted set per
deployment (``<prefix>_postroom.delayed``, scored by due time), with the list it goes to and its
queue's doorbell; every worker runs PROMOTE about twice a second (``Promoter``), which moves the
due ones onto their lists and rings their doorbells in one script: a worker killed at any instant
leaves each message either parked or queued, never lost nor doubled. Between two runs it sleeps
until the earliest parked message is due, if that is sooner, so a message parked behind others
(a rate limit's slots, postroom.ratelimits) reaches its queue within milliseconds of its due
time; one parked while the promoter sleeps, due before it wakes, is up to that sleep late. A
rate limit's slot holder goes to the head of its list, not behind what queued meanwhile. An ETA
set by plain Celery code is parked the same way, and cleared so the worker runs the message as
soon as it arrives.

**RabbitMQ.** A classic queue expires its messages from the head only, so a queue whose messages
all have one TTL (``x-message-ttl``) expires them in order, on time; a per-message TTL would wait
behind a longer one ahead of it. So postroom declares, per destination queue and on first use,
delay queues of fixed TTLs that nobody consumes, dead-lettered through the default exchange to
that destination alone. The TTLs are LEVELS (100 ms doubling up to about 58 h): a message goes
to the largest level not longer than what remains of its delay, and a worker that receives it
early (a delay longer than one level) sends it back for the remainder before running anything.
That takes at most one hop per level, and arrives at most one smallest level (100 ms) late; each
hop is a publish and an ack, so at-least-once: a copy doubled by a crash between the two is
dropped by the consumer's inbox. An event published with a delay goes through one headers
exchange (DELAYED_EVENTS) to its level's queue, dead-lettered to the events exchange with its
event type as routing key, so every subscribed pool gets its copy once it is due. Classic queues
dead-letter at most once: a broker crash at the very moment of expiry can lose the message.
Quorum delay queues (the default, POSTROOM_QUEUE_TYPE) close that gap: they expire from the head
too, and dead-letter at least once (``x-dead-letter-strategy: at-least-once``, which RabbitMQ
allows only with ``x-overflow: reject-publish``): an expired message stays in its delay queue
until its destination has confirmed it, so a crash then can double it (the inbox drops the
copy) but not lose it. A message carrying a plain Celery ETA is moved to its queue's delay queue
by the worker that receives it (``hold_in_broker``), instead of being held there until due.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import cache
from time import time
from typing import Any

import redis
from kombu import Exchange, Queue
from kombu.utils.json import dumps

from postroom._celery.fetch import DOORBELL_TTL_MS, RING, doorbell
from postroom.ratelimits import RESERVATION
from postroom.topology import (
    EVENTS_EXCHANGE,
    QUORUM,
    QueueType,
    delay_queue_name,
    queue_arguments,
    slot_queue_name,
)

logger = logging.getLogger(__name__)

#: the header a delayed message carries its due time in (seconds since the epoch)
DUE = "x-postroom-due"
#: which level's queue a delayed event is for (the DELAYED_EVENTS exchange routes on it)
LEVEL = "x-postroom-delay-level"

#: the sorted set parked messages wait in on Redis (before kombu's global key prefix)
DELAYED_KEY = "_postroom.delayed"
#: due messages moved per PROMOTE run, so one run never holds Redis for long
PROMOTE_BATCH = 500
#: longest sleep (seconds) between two promotions of a worker
PROMOTE_INTERVAL = 0.5
#: shortest, so that a promoter whose parked messages are due but not moved yet does not spin
PROMOTE_AT_LEAST = 0.005

#: KEYS: the delayed set. ARGV: the time now, the batch size, the key prefix, the ring, the
#: doorbell TTL. Each member is ``[list, doorbell, message]`` (keys unprefixed), or ``[list,
#: doorbell, message, 1]`` for one that goes to the head of its list. Returns the number moved.
#: LPUSH as kombu's publish does: the message is taken after those already queued; RPUSH: next.
PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
    local entry = cjson.decode(member)
    redis.call(entry[4] and 'RPUSH' or 'LPUSH', ARGV[3] .. entry[1], entry[3])
    redis.call('ZADD', ARGV[3] .. entry[2], 0, ARGV[4])
    redis.call('PEXPIRE', ARGV[3] .. entry[2], ARGV[5])
    redis.call('ZREM', KEYS[1], member)
end
return #due
"""

#: RabbitMQ delay levels, in milliseconds: 100 ms doubling 21 times (about 58 hours)
LEVELS: tuple[int, ...] = tuple(100 << k for k in range(22))

#: where an event published with a delay waits, by level, before the events exchange fans it out
DELAYED_EVENTS = Exchange("postroom.events.delayed", type="headers", durable=True)


def due_of(headers: Mapping[str, Any] | None) -> float | None:
    """When a message is due: its ``x-postroom-due`` header, else a Celery ETA; None if neither."""
    headers = headers or {}
    due = headers.get(DUE)
    if isinstance(due, int | float) and not isinstance(due, bool):
        return float(due)
    eta = headers.get("eta")
    if isinstance(eta, str):
        try:
            when = datetime.fromisoformat(eta)
        except ValueError:
            return None  # Celery refuses it, with the reason
        return when.timestamp()  # a naive ETA is local time, as Celery reads it
    return None


def is_early(headers: Mapping[str, Any] | None) -> bool:
    """Whether a message arrived before its due time: a RabbitMQ level shorter than its delay, or
    a TTL that expired a few milliseconds early; it then goes back for the remainder."""
    due = due_of(headers)
    return due is not None and due > time()


# Redis


def park(
    add: Callable[..., Any], list_key: str, queue: str, message: dict[str, Any], due: float
) -> None:
    """Queue, through ``add(command, *args)`` (a pipeline's or a publish batch's), the parking of
    ``message`` until ``due``: it goes to ``list_key`` (``queue``'s list) then, at its head if it
    holds a rate-limit slot (its run is due then, not after what queued meanwhile). Its ETA is
    cleared, its due time kept in its header."""
    headers = message["headers"] = {**(message.get("headers") or {}), "eta": None, DUE: due}
    entry = [list_key, doorbell(queue), dumps(message)]
    if headers.get(RESERVATION):
        entry.append(1)
    add("zadd", DELAYED_KEY, {json.dumps(entry): due})


def promote(client: redis.Redis, prefix: str, now: float | None = None) -> int:
    """Move every parked message that is due onto its list, ringing its doorbell; how many."""
    script = client.register_script(PROMOTE)
    moved, total = PROMOTE_BATCH, 0
    while moved == PROMOTE_BATCH:
        args: list[float | int | str] = [
            time() if now is None else now,
            PROMOTE_BATCH,
            prefix,
            RING,
            DOORBELL_TTL_MS,
        ]
        moved = int(script(keys=[prefix + DELAYED_KEY], args=args))
        total += moved
    return total


def next_due(client: redis.Redis, prefix: str) -> float | None:
    """When the earliest parked message is due, or None if none is parked."""
    earliest = client.zrange(prefix + DELAYED_KEY, 0, 0, withscores=True)
    return float(earliest[0][1]) if earliest else None


class Promoter(threading.Thread):
    """A worker's promotion loop: due messages to their queues, every PROMOTE_INTERVAL seconds
    or as soon as the earliest parked message is due.

    Every worker runs one, so delayed messages move while any worker of the deployment is up, and
    the script makes any number of them safe to run at once.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        super().__init__(name="postroom-delay-promoter", daemon=True)
        self.client, self.prefix = client, prefix
        self._stopping = threading.Event()

    def run(self) -> None:
        pause = PROMOTE_INTERVAL
        while not self._stopping.wait(pause):
            pause = PROMOTE_INTERVAL
            try:
                promote(self.client, self.prefix)
                due = next_due(self.client, self.prefix)
            except Exception:
                logger.exception("promoting delayed messages failed; will try again")
                continue
            if due is not None:
                pause = min(PROMOTE_INTERVAL, max(PROMOTE_AT_LEAST, due - time()))

    def stop(self) -> None:
        """Stop after the promotion in progress, if any (it is one script: all or nothing)."""
        self._stopping.set()
        self.join(timeout=5)
        self.client.close()


# RabbitMQ


def level_for(remaining: float) -> int:
    """The delay level (ms) for a message due in ``remaining`` seconds: the largest not longer,
    else the smallest (a message is never delivered before it is due)."""
    fitting = [level for level in LEVELS if level <= remaining * 1000]
    return fitting[-1] if fitting else LEVELS[0]


def spread(delay: float) -> float:
    """What a message held by an open circuit breaker waits: ``delay``, plus up to a quarter
    more at random, so that a held backlog does not reach its queue all at once, ahead of
    every other message of the pool (the first to arrive is the probe)."""
    return delay * (1 + random.uniform(0, 0.25))


def _dead_lettering(queue_type: QueueType, **arguments: Any) -> dict[str, Any]:
    """A delay queue's arguments: its TTL and dead-letter target (``arguments``), at least once
    on a quorum queue (see the module docstring)."""
    if queue_type == QUORUM:
        arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return queue_arguments(queue_type, **arguments)


@cache
def delay_queue(destination: str, level: int, queue_type: QueueType) -> Queue:
    """The queue a message for ``destination`` waits ``level`` ms in, before the broker moves it
    there through the default exchange; built once (kombu declares an entity once per
    connection, and entities are costly to build)."""
    return Queue(
        delay_queue_name(destination, level),
        durable=True,
        queue_arguments=_dead_lettering(
            queue_type,
            **{
                "x-message-ttl": level,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": destination,
            },
        ),
    )


@cache
def slot_queue(destination: str, message_type: str, queue_type: QueueType) -> Queue:
    """Where a message of ``message_type`` its rate limit held waits for its slot, before the
    broker moves it to ``destination``: one queue per limit, whose messages each carry their own
    TTL (``expiration``). A per-message TTL expires from the head only, which is right here: a
    limit hands out its slots in order, so each message is due after those ahead of it (another
    limit's, in the same queue, would not be), and it arrives when due, with no hop through the
    levels (each a publish, up to 100 ms late)."""
    return Queue(
        slot_queue_name(destination, message_type),
        durable=True,
        queue_arguments=_dead_lettering(
            queue_type,
            **{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": destination},
        ),
    )


@cache
def delayed_event_queue(level: int, queue_type: QueueType) -> Queue:
    """The queue an event published with a delay waits ``level`` ms in, before the broker hands it
    to the events exchange under its own routing key (its event type)."""
    return Queue(
        delay_queue_name(EVENTS_EXCHANGE.name, level),
        DELAYED_EVENTS,
        durable=True,
        binding_arguments={"x-match": "all", LEVEL: str(level)},
        queue_arguments=_dead_lettering(
            queue_type,
            **{"x-message-ttl": level, "x-dead-letter-exchange": EVENTS_EXCHANGE.name},
        ),
    )


def route(
    is_redis: bool, destination: str, due: float, queue_type: QueueType, *, slot: str = ""
) -> dict[str, Any]:
    """Celery publish options sending a message for ``destination`` (a queue's name) toward it,
    due at ``due``: on Redis to the queue itself (the transport parks it), on RabbitMQ to the
    delay queue of its level, of the deployment's ``queue_type``, or, holding a rate-limit slot
    of its type ``slot``, to that limit's slot queue, with a TTL of its own."""
    if is_redis:
        return {"queue": Queue(destination), "exchange_type": "direct"}
    if slot:
        ttl = max(0.001, due - time())
        return {
            "queue": slot_queue(destination, slot, queue_type),
            "exchange_type": "direct",
            "expiration": ttl,
        }
    level = level_for(due - time())
    return {"queue": delay_queue(destination, level, queue_type), "exchange_type": "direct"}


def hold_in_broker(producer: Any, message: Any, destination: str, queue_type: QueueType) -> None:
    """Send a received ``message`` whose Celery ETA is still ahead (plain Celery's countdown) to
    the delay queue of ``destination``, the queue it came from, its ETA cleared and its due time
    kept; returns once the broker confirmed it, so the caller may then acknowledge the original.

    Celery would hold it in the worker until due; on quorum queues its prefetch is per consumer
    and cannot grow for it, so a one-process consumer would take nothing else meanwhile.
    """
    due = due_of(message.headers)
    assert due is not None
    headers = {**(message.headers or {}), "eta": None}
    hold(producer, message, destination, headers=headers, due=due, queue_type=queue_type)


def hold(
    producer: Any,
    message: Any,
    destination: str,
    *,
    headers: Mapping[str, Any],
    due: float,
    queue_type: QueueType,
) -> None:
    """Send a received ``message``, under ``headers``, to the delay queue of ``destination``
    (a queue's name) of its due time; returns once the broker confirmed it."""
    queue = delay_queue(destination, level_for(due - time()), queue_type)
    properties = message.properties or {}
    producer.publish(
        message.body,
        exchange="",
        routing_key=queue.name,
        declare=[queue],
        headers=with_due(headers, due),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        correlation_id=properties.get("correlation_id"),
        reply_to=properties.get("reply_to"),
        priority=properties.get("priority"),
        delivery_mode=2,
    )


def with_due(headers: Mapping[str, Any] | None, due: float) -> dict[str, Any]:
    """A message's headers for its next trip: its due time set, and the record RabbitMQ's
    dead-lettering appended (``x-death``, which grows with every hop) dropped."""
    kept = {
        k: v
        for k, v in (headers or {}).items()
        if k != "x-death" and not k.startswith(("x-first-death", "x-last-death"))
    }
    return {**kept, DUE: due}
