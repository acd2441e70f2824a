"""The pool side of events: ``@subscribes`` handlers, run once per pool that subscribes.

Every worker process of a pool consumes that pool's queue only, so it knows its pool from the queue
it was started on. An event is one message (one Celery task name, the event type) copied into each
bound pool queue; the worker renames its delivery ``<event type>@<pool>`` and gives it an ID of its
own, so Flower shows each pool's delivery as a separate task that can be followed by correlation ID.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import celery
from celery.worker.request import Request

from postroom.errors import AlreadyHandled, ContractError, InvalidMessage
from postroom.handlers import MessageTask, PoisonMessage, register_task
from postroom.headers import MESSAGE_ID, REPLAY
from postroom.messages import Event
from postroom.registry import Handler, registry
from postroom.topology import event_delivery_name, event_queue_name, pool_of_event_queue

F = TypeVar("F", bound=Callable[..., Any])


@cache
def worker_pool(app: celery.Celery) -> str | None:
    """The subscriber pool this worker serves, from the one events queue it consumes (if any)."""
    pools = [p for p in map(pool_of_event_queue, app.amqp.queues.consume_from) if p]
    if len(pools) > 1:
        raise ContractError(
            f"this worker consumes the queues of several subscriber pools ({', '.join(pools)}); "
            "a worker serves one pool, so it knows whose copy of an event it holds: start one "
            "worker per pool (postroom worker POOL)"
        )
    return pools[0] if pools else None


def delivery_id(message_id: str, pool: str) -> str:
    """A stable per-pool task ID: the same across retries and redeliveries of one pool's copy."""
    return str(uuid.uuid5(uuid.UUID(message_id), pool))


def replayed_id(message_id: str, replay: object) -> str:
    """What a pool's inbox knows a delivery by: its message ID, or for a forced replay's copy
    (``postroom.replay`` set, see postroom.replay) an ID of its own, new for each replay run, so
    the pool runs it again, yet the same across that copy's retries and redeliveries."""
    if replay is None:
        return message_id
    return str(uuid.uuid5(uuid.UUID(message_id), f"replay:{replay}"))


class EventRequest(Request):  # type: ignore[misc]
    """Names one pool's delivery of an event after the event and the pool, with its own task ID."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pool = worker_pool(self._app)
        message_id = self._request_dict.get(MESSAGE_ID)
        if pool is None or not isinstance(message_id, str):
            return  # decoded and refused in EventTask.handle, with the reason
        try:
            handled_as = replayed_id(message_id, self._request_dict.get(REPLAY))
            self.id = self._request_dict["id"] = delivery_id(handled_as, pool)
        except ValueError:
            return
        self.name = self._request_dict["shadow"] = event_delivery_name(self._type, pool)


class EventTask(MessageTask):
    """Base task of event deliveries: finds this pool's handler, runs it, retries inside the pool."""

    Request = "postroom.subscribers:EventRequest"
    ignore_result = True

    def handle(self, args: tuple[Any, ...], payload: dict[str, Any]) -> None:
        pool = worker_pool(self.app)
        handler = registry.subscriber(self.name, pool) if pool else None
        arrived_on = (self.request.delivery_info or {}).get("routing_key") or ""
        queue = event_queue_name(pool) if pool else arrived_on
        if pool is None or handler is None:
            stray = InvalidMessage(
                f"{self.name} reached a worker of pool {pool!r}, which does not subscribe to it"
            )
            self.dead_letter("unknown", stray, queue=queue, owner=pool or "", payload=payload)
            raise stray
        try:
            envelope, event = self.decode(handler.contract, args, payload)
        except InvalidMessage as exc:
            self.dead_letter("invalid", exc, queue=queue, owner=pool, payload=payload)
            raise
        inbox = self.reliable.inbox
        handled_as = replayed_id(envelope.message_id, (self.request.headers or {}).get(REPLAY))
        done, poison_runs = self.begin(pool, handled_as, dedupe=True)
        if done is not None:
            return  # this pool already handled this event: a redelivery or a duplicate
        if poison_runs is not None:
            poison = PoisonMessage(poison_runs)
            inbox.ended(pool, handled_as)
            self.dead_letter("poison", poison, queue=queue, owner=pool, payload=payload)
            raise poison
        ctx = self.context(envelope, pool)
        ctx.inbox_id = handled_as
        try:
            handler.fn(event, ctx)
        except AlreadyHandled:
            inbox.ended(pool, handled_as)
            return  # a concurrent copy of this pool's delivery committed first
        except Exception as exc:
            inbox.ended(pool, handled_as)
            if self.should_retry(exc):
                # Task.retry() would re-publish through the exchange and key the copy came in on,
                # broadcasting it to every pool again: send it back to this pool's queue alone.
                raise self.retry_later(
                    exc, queue=event_queue_name(pool), exchange_type="direct"
                ) from exc
            self.dead_letter("failed", exc, queue=queue, owner=pool, payload=payload)
            raise
        outcome = {"status": "handled", "attempts": ctx.attempt}
        if handled_as != envelope.message_id:  # a forced replay's ID, marked in one MULTI with
            # the event's own (ctx.commit), so neither this copy nor the event runs again
            inbox.mark(ctx.transaction(), pool, handled_as, outcome)
        try:
            ctx.commit(outcome)
        except AlreadyHandled:
            inbox.ended(pool, handled_as)


def subscribes(event: type[Event], *, pool: str) -> Callable[[F], F]:
    """Make ``fn(event, ctx)`` pool ``pool``'s handler of an event type; any number of pools may."""
    if not (isinstance(event, type) and issubclass(event, Event)):
        raise ContractError(
            f"@subscribes takes an Event class, not {event!r}; commands and queries have one "
            "owner, declared with @handles"
        )

    def decorate(fn: F) -> F:
        first = not registry.pools_subscribed(event.__message_type__)
        registry.add_subscriber(Handler(event, fn, pool))
        if first:  # one task per event type; each worker runs its own pool's handler
            register_task(
                event.__message_type__,
                EventTask,
                __name__,
                f"Delivers {event.__message_type__} to the @subscribes handler of this pool.",
            )
        return fn

    return decorate
