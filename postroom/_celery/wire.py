"""Celery task messages built and published in bulk, for senders that need many per second.

``app.send_task`` spends most of its time on things a batch does not need once per message:
signals, a safe repr of the arguments, building and copying kombu entities, and one broker round
trip each. Here a message is built straight in Celery's task protocol 2 (the same headers, body
and properties ``send_task`` writes; a test compares them field by field), and a batch goes out in
as few round trips as the broker allows: on Redis one pipelined ``LPUSH`` per queue per chunk, on
RabbitMQ publishes inside a transaction committed once per chunk, so a returned call means every
message is stored.

A single command on Redis (``bus.send``) goes out the same way, in one round trip with its
doorbell and the task-sent event Flower lists it by (``send_one``): ``send_task`` spent four times
as long on it, in two round trips and the machinery around them.
"""

from __future__ import annotations

import gc
import os
import uuid
from base64 import b64encode
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from time import monotonic, sleep, time
from typing import Any

import amqp
import celery
import orjson
from celery.events import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu import Producer, Queue
from kombu.common import declaration_cached, maybe_declare
from kombu.exceptions import OperationalError

from postroom._celery.delays import due_of, park
from postroom._celery.fetch import ring
from postroom.headers import Envelope

#: options Celery puts in every task body; postroom uses none of them
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: how long a kwargs repr may be in headers (Flower's "kwargs" column); Celery's default too
_REPR_MAX = 1024
#: messages per round trip (Redis) or per transaction (RabbitMQ)
CHUNK = 1000


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One Celery task message, transport-neutral: AMQP headers, properties and a JSON body."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes


def task_message(
    app: celery.Celery,
    name: str,
    task_id: str,
    kwargs: dict[str, Any],
    extra_headers: dict[str, Any],
    *,
    root_id: str,
    parent_id: str | None,
    argsrepr: str,
    ignore_result: bool = False,
    origin: str | None = None,
) -> TaskMessage:
    """What ``app.send_task(name, kwargs=kwargs, task_id=task_id, ...)`` would publish.

    ``origin`` names the sending process (``gen<pid>@<host>``); a batch computes it once.
    """
    kwargsrepr = repr(kwargs)
    if len(kwargsrepr) > _REPR_MAX:
        kwargsrepr = kwargsrepr[: _REPR_MAX - 3] + "..."
    headers = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": root_id,
        "parent_id": parent_id,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "origin": origin or anon_nodename(),
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        **extra_headers,
    }
    properties = {"correlation_id": task_id, "reply_to": app.thread_oid}
    body = orjson.dumps([[], kwargs, _EMBED])
    return TaskMessage(headers, properties, body)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch is built.

    A batch allocates a few dicts and strings per message and none of them form cycles, so
    reference counting frees them all; the collector would only walk the growing batch again and
    again (a quarter of the time on a 5,000-command batch). It is re-enabled on exit unless it was
    already off.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def event_message(
    app: celery.Celery,
    envelope: Envelope,
    payload: dict[str, Any],
    headers: dict[str, Any],
    origin: str | None = None,
) -> TaskMessage:
    """An event's task message, as the bus publishes it (and a replay re-sends it): its task ID is
    the event's message ID, its parent the message that caused it, and no result is kept."""
    return task_message(
        app,
        envelope.message_type,
        envelope.message_id,
        payload,
        headers,
        root_id=envelope.correlation_id,
        parent_id=envelope.causation_id,
        argsrepr=envelope.summary(),
        ignore_result=True,
        origin=origin,
    )


def publish_many(producer: Producer, messages: Sequence[tuple[Queue, TaskMessage]]) -> None:
    """Store every message in its queue; returns only once the broker holds them all.

    Each distinct queue is declared once first, so nothing is sent to a queue that does not exist
    yet (on RabbitMQ such a message would be dropped by the exchange).
    """
    if not messages:
        return
    channel = producer.channel
    for queue in {queue.name: queue for queue, _ in messages}.values():
        _declare(queue, channel)
    if producer.connection.transport.driver_type == "redis":
        _redis_publish(channel, messages)
    else:
        _amqp_publish(producer.connection.connection, messages)


def send_one(
    app: celery.Celery, producer: Producer, queue: Queue, message: TaskMessage, *, announce: bool
) -> None:
    """Store one command on Redis (``retried``); returns once Redis holds it.

    With ``announce``, the task-sent event ``send_task`` would publish (``task_send_sent_event``)
    goes in the same round trip, so Flower lists the command from the moment it is sent.
    """
    event = _sent_event(app, message, queue.name) if announce else None

    def push(producer: Producer) -> None:
        channel = producer.channel
        _declare(queue, channel)
        fanout = [] if event is None else [_redis_event(app, channel, event)]
        _redis_publish(channel, [(queue, message)], fanout)

    retried(app, producer, push)


def retried(app: celery.Celery, producer: Producer, publish: Callable[[Producer], None]) -> None:
    """``publish(producer)``, retried on a connection error as Celery retries a task's publish
    (``task_publish_retry_policy``, from POSTROOM_PUBLISH_RETRIES), reconnecting in between;
    kombu's OperationalError once the retries run out. A retried message may have been stored
    by the try that failed: delivery is at least once, and the inbox keeps its effect single.

    On Redis, kombu's retry makes a new channel, and a new channel to a server still down gives
    up after kombu's own connect timeout (about 6 s, whatever the policy says), out of the
    retries: so the whole retry is tried again until the policy's waits add up (about 15 s by
    default), as the setting promises. (Celery's own ``send_task`` keeps kombu's 6 s.)
    """
    policy = app.conf.task_publish_retry_policy
    patience = monotonic() + policy_waits(policy)
    while True:
        began = monotonic()
        try:
            producer.connection.ensure(producer, publish, **policy)(producer)
            return
        except OperationalError:
            left = patience - monotonic()
            if left < monotonic() - began:  # another round would overrun the policy's time
                raise
            sleep(min(policy["interval_max"], left))


def policy_waits(policy: dict[str, Any]) -> float:
    """Seconds a retry policy waits in all between its tries: 15 for postroom's default."""
    start, step, most = policy["interval_start"], policy["interval_step"], policy["interval_max"]
    return float(sum(min(start + step * n, most) for n in range(policy["max_retries"])))


def _declare(queue: Queue, channel: Any) -> None:
    """``maybe_declare``, minus the bound copy of ``queue`` it makes before finding it in the
    connection's cache and throws away: a sixth of a single send's time."""
    if not declaration_cached(queue, channel):
        maybe_declare(queue, channel)


def _sent_event(app: celery.Celery, message: TaskMessage, queue: str) -> dict[str, Any]:
    """Celery's task-sent event for ``message`` sent to ``queue`` by the default exchange: the
    fields ``send_task`` gives it, and those its event dispatcher adds."""
    headers = message.headers
    return Event(  # type: ignore[no-any-return]
        "task-sent",
        uuid=headers["id"],
        root_id=headers["root_id"],
        parent_id=headers["parent_id"],
        name=headers["task"],
        args=headers["argsrepr"],
        kwargs=headers["kwargsrepr"],
        retries=headers["retries"],
        eta=headers["eta"],
        expires=headers["expires"],
        queue=queue,
        exchange="",
        routing_key=queue,
        hostname=headers["origin"],
        utcoffset=utcoffset(),
        pid=os.getpid(),
        clock=app.clock.forward(),
    )


def _redis_event(
    app: celery.Celery, channel: Any, event: dict[str, Any]
) -> tuple[list[str], bytes]:
    """The channels and payload of a ``PUBLISH`` carrying ``event``, in the storage format kombu's
    fanout exchange writes for Celery's event dispatcher (transient, JSON, base64 body)."""
    exchange, routing_key = app.conf.event_exchange, event["type"].replace("-", ".")
    payload = {
        "body": b64encode(orjson.dumps(event)).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"hostname": event["hostname"]},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return channel._get_publish_topics(exchange, routing_key), orjson.dumps(payload)


def bound_queues(producer: Producer, exchange: str, routing_key: str) -> list[str]:
    """The queues bound to ``exchange`` under ``routing_key``, from the table kombu's Redis
    transport keeps in Redis (its exchanges live in each process's memory otherwise)."""
    table = producer.channel.get_table(exchange)
    return [queue for key, _, queue in table if key == routing_key]


def _chunks(
    messages: Sequence[tuple[Queue, TaskMessage]],
) -> Iterable[Sequence[tuple[Queue, TaskMessage]]]:
    for start in range(0, len(messages), CHUNK):
        yield messages[start : start + CHUNK]


def _redis_publish(
    channel: Any,
    messages: Sequence[tuple[Queue, TaskMessage]],
    fanout: Sequence[tuple[list[str], bytes]] = (),
) -> None:
    """kombu's Redis storage format (what its ``basic_publish`` writes), pushed in pipelines.

    Every message gets its own delivery tag: kombu keys its unacked index by it, so a shared tag
    would let one in-flight copy hide another from the crash-recovery sweep. Each queue's doorbell
    is rung after its push, in the same pipeline, so idle consumers wake (postroom._celery.fetch).
    ``fanout`` (channels and a payload, Celery events) is published after the last chunk's pushes.
    """
    chunks = list(_chunks(messages))
    last = chunks[-1]
    with channel.conn_or_acquire() as client:
        for chunk in chunks:
            by_queue: dict[str, list[bytes]] = {}
            parked: list[tuple[str, TaskMessage, float]] = []
            for queue, message in chunk:
                due = due_of(message.headers)
                if due is not None and due > time():
                    parked.append((queue.name, message, due))
                else:
                    by_queue.setdefault(queue.name, []).append(_redis_payload(queue.name, message))
            with client.pipeline(transaction=False) as pipe:
                add = _adder(pipe)
                for name, message, due in parked:
                    park(add, name, name, _redis_message(name, message), due)
                for name, payloads in by_queue.items():
                    pipe.lpush(name, *payloads)  # LPUSH a b c, consumed from the tail: a, b, c
                    ring(add, name)
                if chunk is last:
                    for topics, payload in fanout:
                        for topic in topics:
                            pipe.publish(topic, payload)
                pipe.execute()


def _adder(pipe: Any) -> Any:
    """``pipe`` behind the ``add(command, *args)`` interface ring and park queue commands through."""
    return lambda command, *args: getattr(pipe, command)(*args)


def _redis_payload(queue: str, message: TaskMessage) -> bytes:
    return orjson.dumps(_redis_message(queue, message))


def _redis_message(queue: str, message: TaskMessage) -> dict[str, Any]:
    return {
        "body": b64encode(message.body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": message.headers,
        "properties": {
            **message.properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def _amqp_publish(
    connection: amqp.Connection, messages: Sequence[tuple[Queue, TaskMessage]]
) -> None:
    """Publishes on a channel of its own in transaction mode: ``tx_commit`` returns once RabbitMQ
    has enqueued (and, for these persistent messages on durable queues, stored) the whole chunk.

    The producer's own channel is in publisher-confirm mode, which waits for one confirm per
    message; a channel cannot be in both modes, hence a separate one. ``_basic_publish`` is
    py-amqp's plain publish, which the confirm mode otherwise wraps.
    """
    channel = connection.channel()
    try:
        channel.tx_select()
        for chunk in _chunks(messages):
            for queue, message in chunk:
                channel._basic_publish(
                    amqp.Message(
                        message.body,
                        content_type="application/json",
                        content_encoding="utf-8",
                        application_headers=message.headers,
                        delivery_mode=2,
                        priority=0,
                        **message.properties,
                    ),
                    exchange="",
                    routing_key=queue.name,
                )
            channel.tx_commit()
    finally:
        channel.close()
