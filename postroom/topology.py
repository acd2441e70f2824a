"""Every exchange, queue and route, derived in one place from names; no queue name is a literal elsewhere.

```
 commands and queries (point-to-point; the pool's workers compete):

   bus.send(RegisterAsset) ──> ( commands.assets ) ──> pool "assets"

 events (one exchange, one durable queue per subscriber pool, bound under each event type it wants):

                                      ┌─ assets.AssetRegistered ─> ( events.search )        ─> pool "search"
   bus.publish(AssetRegistered) ──> [postroom.events] ─ assets.AssetRegistered ─> ( events.analytics ) ─> pool "analytics"
                                      └─ assets.AssetRegistered ─> ( events.notifications ) ─> pool "notifications"
```

The events exchange is ``direct`` and keyed by event type. On RabbitMQ that is one publish and the
broker copies it into every bound queue. On Redis, kombu's exchanges live in each process's memory
and a message restored after a crash is re-routed through its exchange and key (reaching every pool
again), so the publisher reads the bindings kombu keeps in Redis and puts one copy straight into
each bound queue instead: a restored copy then returns to its own queue only.

Every queue postroom declares is of one type, a deployment's choice (POSTROOM_QUEUE_TYPE): quorum
queues on RabbitMQ by default (replicated, and the durable type RabbitMQ 4 keeps), classic ones
for a broker without them. The functions take that type rather than read the settings, so one
process can hold two apps of different deployments; Redis ignores it (``CLASSIC`` there).
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from kombu import Exchange, Queue, binding

#: the types of queue postroom can declare on RabbitMQ
QueueType = Literal["quorum", "classic"]
QUORUM: QueueType = "quorum"
CLASSIC: QueueType = "classic"

COMMANDS_EXCHANGE = Exchange("postroom.commands", type="direct", durable=True)
EVENTS_EXCHANGE = Exchange("postroom.events", type="direct", durable=True)
_EVENT_QUEUE_PREFIX = "events."
#: where a message no service owns lands (Celery's default queue): every worker drains it and
#: dead-letters what it holds as "unknown" (see postroom.routing)
UNROUTED_QUEUE = "postroom.unrouted"
#: where RabbitMQ dead-letters a message delivered more often than the delivery limit: every
#: worker drains it and records each as a dead letter of its origin queue (see
#: postroom._celery.consumer)
GIVEN_UP_QUEUE = "postroom.given-up"


def queue_arguments(queue_type: QueueType, **arguments: Any) -> dict[str, Any]:
    """The declaration arguments of a postroom queue of ``queue_type``, plus ``arguments``.

    A classic queue is declared without ``x-queue-type``, as before quorum queues were the
    default, so a deployment that chooses classic keeps its existing queues equivalent.
    """
    return {"x-queue-type": QUORUM, **arguments} if queue_type == QUORUM else arguments


def backstop_arguments(queue_type: QueueType, delivery_limit: int) -> dict[str, Any]:
    """A consumed queue's broker-side poison backstop: on a quorum queue, a message delivered more
    than ``delivery_limit`` times is dead-lettered, at least once, to the given-up queue.

    None on a classic queue (which has no delivery limit) or with ``delivery_limit`` 0. At least
    once needs ``reject-publish`` overflow; with no length limit on these queues it never applies.
    """
    if queue_type != QUORUM or delivery_limit <= 0:
        return {}
    return {
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": GIVEN_UP_QUEUE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def given_up_queue(queue_type: QueueType) -> Queue:
    """The queue RabbitMQ dead-letters a message into when it gives up on it; no limit of its own."""
    return Queue(GIVEN_UP_QUEUE, durable=True, queue_arguments=queue_arguments(queue_type))


def command_queue_name(service: str) -> str:
    return f"commands.{service}"


@cache
def command_queue(service: str, queue_type: QueueType, *, delivery_limit: int) -> Queue:
    """The durable queue a service's pool consumes its commands and queries from.

    Built once per service: kombu entities are costly to build, and senders ask for one per message.
    """
    name = command_queue_name(service)
    return Queue(
        name,
        COMMANDS_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments=queue_arguments(
            queue_type, **backstop_arguments(queue_type, delivery_limit)
        ),
    )


def unrouted_queue(queue_type: QueueType) -> Queue:
    return Queue(UNROUTED_QUEUE, durable=True, queue_arguments=queue_arguments(queue_type))


@cache
def queue_named(name: str) -> Queue:
    """A queue addressed by its name alone, for a copy sent to exactly that queue (an event's copy
    for one pool on Redis); built once per name, not once per message."""
    return Queue(name)


def partition_queue_name(service: str, partition: int) -> str:
    return f"{command_queue_name(service)}.p{partition}"


@cache
def partition_queue(
    service: str, partition: int, queue_type: QueueType, *, delivery_limit: int
) -> Queue:
    """One of a service's partition queues: ordered messages of the keys that hash to it.

    Single-active-consumer on RabbitMQ (quorum and classic queues alike): however many workers
    subscribe, the broker delivers to one at a time (kombu's Redis transport ignores the
    argument; leases do the same job there).
    """
    name = partition_queue_name(service, partition)
    return Queue(
        name,
        COMMANDS_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments=queue_arguments(
            queue_type,
            **{"x-single-active-consumer": True},
            **backstop_arguments(queue_type, delivery_limit),
        ),
    )


def event_queue_name(pool: str) -> str:
    return _EVENT_QUEUE_PREFIX + pool


def pool_of_event_queue(queue_name: str) -> str | None:
    return queue_name.removeprefix(_EVENT_QUEUE_PREFIX) if is_event_queue(queue_name) else None


def is_event_queue(queue_name: str) -> bool:
    return queue_name.startswith(_EVENT_QUEUE_PREFIX)


def event_queue(
    pool: str, event_types: list[str], queue_type: QueueType, *, delivery_limit: int
) -> Queue:
    """A pool's durable queue, bound to the events exchange once per event type it subscribes to.

    Its retries never go through these bindings: they are sent to the queue by name (see
    postroom._celery.tasks), so a retry reaches this pool and no other.
    """
    return Queue(
        event_queue_name(pool),
        bindings=[binding(EVENTS_EXCHANGE, routing_key=t) for t in event_types],
        durable=True,
        queue_arguments=queue_arguments(
            queue_type, **backstop_arguments(queue_type, delivery_limit)
        ),
    )


def delay_queue_name(destination: str, level_ms: int) -> str:
    """Where a message for ``destination`` (a queue, or the events exchange) waits ``level_ms``
    before the broker moves it there (see postroom._celery.delays); nobody consumes it."""
    return f"postroom.delay.{level_ms}.{destination}"


def slot_queue_name(destination: str, message_type: str) -> str:
    """Where a message of ``message_type`` its rate limit held waits for its slot, before the
    broker moves it to ``destination`` (see postroom._celery.delays); nobody consumes it."""
    return f"postroom.delay.slots.{destination}.{message_type}"


def event_delivery_name(event_type: str, pool: str) -> str:
    """How one pool's delivery of an event is named in logs and Flower."""
    return f"{event_type}@{pool}"


def declared_queues(
    owners: list[str],
    pools: dict[str, list[str]],
    partitioned: tuple[str, ...] = (),
    partitions: int = 4,
    *,
    queue_type: QueueType,
    delivery_limit: int = 0,
) -> list[Queue]:
    """Every queue of a deployment: one per owning service, one per subscriber pool, and
    ``partitions`` more for each service in ``partitioned`` (see postroom.partitions).

    ``owners`` are the services that handle commands or queries; ``pools`` maps each subscriber pool
    to the event types it subscribes to. Which process consumes which queue is the pools' business.
    ``queue_type`` is the deployment's (see the module docstring); with a ``delivery_limit`` on
    quorum queues, the given-up queue too (see backstop_arguments).
    """
    limit = delivery_limit
    queues = [unrouted_queue(queue_type)]
    if backstop_arguments(queue_type, limit):
        queues.append(given_up_queue(queue_type))
    queues += [
        command_queue(service, queue_type, delivery_limit=limit) for service in sorted(set(owners))
    ]
    queues += [
        partition_queue(s, p, queue_type, delivery_limit=limit)
        for s in sorted(set(partitioned))
        for p in range(partitions)
    ]
    queues += [
        event_queue(pool, types, queue_type, delivery_limit=limit)
        for pool, types in sorted(pools.items())
    ]
    return queues
