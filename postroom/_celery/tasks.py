"""The Celery side of handling: one task base that runs the pipeline and speaks Celery's terms.

A task's body builds a Delivery from Celery's request, runs the pipeline, and turns the Outcome
into a task result: a reply returned (SUCCESS), a rejected or failed reply raised (FAILURE, so
Flower shows it as such, the reply intact), a retry through ``Task.retry`` (RETRY), its backoff held
by the broker (postroom._celery.delays). A message its open breaker or its rate limit held is sent
back through the broker the same way, as the same attempt, and acknowledged with no state
recorded (one its rate limit held carries its reservation back, postroom.ratelimits); a task
event of postroom's own, ``task-held``, tells Flower why (it shows the task as HELD, see
``held``).

Events: one task per event type; every worker process of a pool consumes that pool's queue only,
so it knows its pool from the queue it was started on. The worker renames its delivery
``<event type>@<pool>`` with an ID of its own, so Flower shows each pool's delivery as a task
that can be followed by correlation ID.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from functools import cache
from time import time
from typing import Any

import celery
from celery import shared_task
from celery.exceptions import Ignore, Retry
from celery.worker.request import Request
from kombu.exceptions import OperationalError

from postroom._celery import delays
from postroom.errors import (
    CircuitOpen,
    CircuitOpenReply,
    ContractError,
    FailedReply,
    RejectedReply,
)
from postroom.headers import MESSAGE_ID, REPLAY, REPLY_TO
from postroom.pipeline import Delivery, Kind, Outcome
from postroom.pipeline.steps import replayed_id
from postroom.ratelimits import RESERVATION
from postroom.registry import Handler, registry
from postroom.topology import (
    command_queue_name,
    event_delivery_name,
    event_queue_name,
    pool_of_event_queue,
)

logger = logging.getLogger("postroom.breakers")


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
        message_id = self._request_dict.get(MESSAGE_ID)
        if pool is None or not isinstance(message_id, str):
            return  # decoded and refused by the pipeline, with the reason
        try:
            handled_as = replayed_id(message_id, self._request_dict.get(REPLAY))
            self.id = self._request_dict["id"] = delivery_id(handled_as, pool)
        except ValueError:
            return
        self.name = self._request_dict["shadow"] = event_delivery_name(self._type, pool)


class PostroomTask(celery.Task):  # type: ignore[misc]
    """Base of every postroom task: at-least-once settings; the body runs the pipeline."""

    acks_late = True
    reject_on_worker_lost = True
    # postroom's Retry step keeps the budget (POSTROOM_MAX_RETRIES); Celery's own limit (3 by
    # default) would raise the error of a fourth retry instead of sending it, and lose the message
    max_retries = None
    # expected outcomes: recorded as FAILURE, logged without a traceback
    throws = (RejectedReply, CircuitOpenReply)
    kind: Kind
    handler: Handler | None = None  # commands and queries: the one owner's

    def delivery(self, args: tuple[Any, ...], payload: dict[str, Any]) -> Delivery:
        from postroom.install import installation  # noqa: PLC0415 - install imports this module

        request = self.request
        arrived_on = (request.delivery_info or {}).get("routing_key") or ""
        handler = self.handler
        if self.kind == "event":
            pool = worker_pool(self.app)
            handler = registry.subscriber(self.name, pool) if pool else None
            owner, queue = pool or "", event_queue_name(pool) if pool else arrived_on
        elif self.kind == "reply":  # a reply to a callback: its pool's @on_reply handler
            to = (request.headers or {}).get(REPLY_TO)
            owner = to if isinstance(to, str) else ""
            handler = registry.reply_handler(self.name, owner)
            queue = arrived_on or command_queue_name(owner)
        else:
            assert handler is not None
            owner = handler.owner
            queue = arrived_on or command_queue_name(owner)
        return Delivery(
            runtime=installation(self.app).runtime,
            handler=handler,
            kind=self.kind,
            owner=owner,
            queue=queue,
            name=request.shadow or request.task or self.name,
            task_id=request.id,
            headers=request.headers or {},
            args=args,
            body=payload,
            attempt=request.retries + 1,
            root_id=request.root_id,
            parent_id=request.parent_id,
        )

    def after_return(self, *args: Any) -> None:
        """Celery calls this once the result (the reply) is stored: what the run left for
        later runs now, off the reply's way."""
        for deferred in getattr(self.request, "postroom_after_reply", ()):
            deferred()

    def redelay(
        self,
        delivery: Delivery,
        due: float,
        retry: BaseException | None = None,
        *,
        held: bool = False,
        reservation: str = "",
    ) -> None:
        """Send this message back to its queue through the broker, due at ``due``: as a retry
        of ``retry`` (raises Celery's Retry), else as the same attempt, for a message that
        arrived early or that its open breaker or rate limit ``held`` (raises Ignore:
        acknowledged, no state recorded). A retry or a held message drops the rate-limit slot
        it carried, and a message its limit held carries its new ``reservation`` instead, due
        exactly then; a breaker's hold is spread a little (``delays.spread``). One that arrived
        early keeps its headers as they are."""
        from postroom.install import installation  # noqa: PLC0415 - install imports this module

        installed = installation(self.app)
        if held and not reservation:
            now = time()
            due = now + delays.spread(due - now)
        handler = delivery.handler
        limited = handler.contract.__message_type__ if reservation and handler else ""
        options = delays.route(
            installed.settings.broker_is_redis,
            delivery.queue,
            due,
            installed.queue_type,
            slot=limited,
        )
        headers = delays.with_due(self.request.headers, due)
        if held or retry is not None:
            headers.pop(RESERVATION, None)
            if reservation:
                headers[RESERVATION] = reservation
        if retry is not None:
            self.retry(exc=retry, countdown=0, headers=headers, **options)
        self.signature_from_request(self.request, headers=headers, **options).apply_async()
        raise Ignore()

    def held(self, outcome: Outcome, due: float) -> None:
        """Tell Flower this message was held by its open breaker, not run: Celery turns a task
        event of a type it does not know into the task's state (``task-held``: HELD), which
        outranks the received and started events of its later arrivals, until one of them ends
        (SUCCESS, FAILURE, RETRY). ``exception`` (the breaker, as a ``CircuitOpen``) and
        ``eta`` (the earliest it is back) are fields Flower's task page shows. Best effort: the
        message is safe in the broker whether or not the event goes out."""
        if not self.app.conf.worker_send_task_events:
            return
        try:
            self.send_event(
                "task-held",
                retry=False,
                exception=repr(outcome.error),
                eta=datetime.fromtimestamp(due, UTC).isoformat(),
            )
        except (OperationalError, OSError) as exc:
            logger.warning("could not tell Flower that %s is held (%r)", self.request.id, exc)

    def settle(self, delivery: Delivery, outcome: Outcome) -> Any:
        """The outcome in Celery's terms: a result, a FAILURE carrying the reply, or a retry."""
        if outcome.status == "held":  # not run (breaker open, or over its rate limit): later
            due = time() + outcome.delay
            try:
                self.redelay(delivery, due, held=True, reservation=outcome.reservation)
            except Ignore:  # sent back: its task-sent event is out, so HELD's fields last
                self.held(outcome, due)
                raise
        if outcome.status == "parked":  # kept behind its key's dead letter: its reply comes
            raise Ignore()  # when it runs, so nothing is recorded now; acknowledged
        if outcome.status == "retry":
            # Task.retry() counts the retry and tells Flower (RETRY); its countdown would hold the
            # message in this worker, so the broker holds it instead (postroom._celery.delays),
            # sent to this queue alone: an event's copy through the exchange would reach every
            # pool again. Celery logs ``when`` ("Retry in 0.4s").
            try:
                self.redelay(delivery, time() + outcome.delay, retry=outcome.error)
            except Retry as retry:
                retry.when = outcome.delay
                raise
        if delivery.one_way:
            if outcome.error is not None:
                raise outcome.error
            return None
        assert outcome.reply is not None
        if outcome.status == "rejected":
            raise RejectedReply(outcome.reply)
        if outcome.status == "failed":
            if isinstance(outcome.error, CircuitOpen):  # a query's fallback had no answer
                raise CircuitOpenReply(outcome.reply)
            raise FailedReply(outcome.reply) from outcome.error
        return outcome.reply


def register_task(name: str, kind: Kind, module: str, doc: str | None, **attrs: Any) -> None:
    """Register a Celery task named ``name`` for every app (like shared_task)."""

    def run(task: PostroomTask, /, *args: Any, **payload: Any) -> Any:
        from postroom.install import installation  # noqa: PLC0415 - install imports this module

        delivery = task.delivery(args, payload)
        if delays.is_early(task.request.headers):  # a delay longer than one RabbitMQ level
            task.redelay(delivery, delays.due_of(task.request.headers) or 0.0)
        task.request.postroom_after_reply = delivery.after_reply
        return task.settle(delivery, installation(task.app).pipeline(delivery))

    run.__module__, run.__doc__ = module, doc
    options: dict[str, Any] = {"kind": kind, **attrs}
    if kind == "event":
        options.update(Request="postroom._celery.tasks:EventRequest", ignore_result=True)
    elif kind == "reply":  # nobody waits for a reply's delivery: no result of its own
        options.update(ignore_result=True)
    shared_task(name=name, bind=True, base=PostroomTask, **options)(run)
