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

from postroom.errors import ContractError, InvalidMessage
from postroom.handlers import MessageTask, PoisonMessage, register_task
from postroom.headers import PREFIX
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


class EventRequest(Request):  # type: ignore[misc]
    """Names one pool's delivery of an event after the event and the pool, with its own task ID."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pool = worker_pool(self._app)
        message_id = self._request_dict.get(PREFIX + "message_id")
        if pool is None or not isinstance(message_id, str):
            return  # decoded and refused in EventTask.handle, with the reason
        try:
            self.id = self._request_dict["id"] = delivery_id(message_id, pool)
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
        done, poison_runs = self.begin(pool, envelope.message_id, dedupe=True)
        if done is not None:
            return  # this pool already handled this event: a redelivery or a duplicate
        if poison_runs is not None:
            poison = PoisonMessage(poison_runs)
            inbox.ended(pool, envelope.message_id)
            self.dead_letter("poison", poison, queue=queue, owner=pool, payload=payload)
            raise poison
        ctx = self.context(envelope, pool)
        try:
            handler.fn(event, ctx)
        except Exception as exc:
            inbox.ended(pool, envelope.message_id)
            if self.should_retry(exc):
                # Task.retry() would re-publish through the exchange and key the copy came in on,
                # broadcasting it to every pool again: send it back to this pool's queue alone.
                raise self.retry_later(
                    exc, queue=event_queue_name(pool), exchange_type="direct"
                ) from exc
            self.dead_letter("failed", exc, queue=queue, owner=pool, payload=payload)
            raise
        ctx.commit({"status": "handled", "attempts": ctx.attempt})


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
