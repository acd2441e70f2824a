"""The MessageBus: send a command, ask a query, publish an event; and wait for replies without polling.

Commands and queries are sent by task name (Celery's task protocol: on RabbitMQ through
``send_task``, on Redis built and pushed in one round trip by postroom._celery.wire), so a sender
needs the contract classes and nothing else. The task id is the command's correlation ID: the reply lands in the result backend
under that key, where ``AsyncResult.get`` waits for it on Redis pub/sub.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from time import time
from typing import Any

import celery
from celery import current_app
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from celery.utils.nodenames import anon_nodename
from kombu import Producer, Queue

from postroom import tracing
from postroom._celery import delays
from postroom._celery.publishing import published
from postroom._celery.wire import (
    TaskMessage,
    bound_queues,
    event_message,
    gc_paused,
    publish_many,
    retried,
    send_one,
    task_message,
)
from postroom.errors import ReplyTimeout, Unsuccessful, WrongMessageKind
from postroom.eventlog import event_log
from postroom.headers import REPLY_TO, Envelope, uuid7
from postroom.install import installation
from postroom.messages import Command, ErrorInfo, Event, Query, Reply, reply_type
from postroom.partitions import partition_count, partition_of
from postroom.registry import registry
from postroom.schedules import due_time
from postroom.signing import SIGNATURE, Signer, signer
from postroom.topology import EVENTS_EXCHANGE, command_queue, partition_queue, queue_named
from postroom.webhooks import CALLBACK_URL, allowed

_SENDABLE = (Command, Query)


def route(app: celery.Celery, command: Command | Query) -> Queue:
    """The queue a command goes to: its service's, or the partition queue its key hashes to."""
    contract = type(command)
    key = contract.__partition_key__
    installed = installation(app)
    queue_type, limit = installed.queue_type, installed.delivery_limit
    if key is None:
        return command_queue(contract.__service__, queue_type, delivery_limit=limit)
    partition = partition_of(getattr(command, key), partition_count(app))
    return partition_queue(contract.__service__, partition, queue_type, delivery_limit=limit)


class PendingReply:
    """A command on its way: holds the key its reply will be stored under."""

    def __init__(self, app: celery.Celery, envelope: Envelope, queue: str) -> None:
        self._app = app
        self.envelope = envelope
        self.queue = queue

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlation_id

    @property
    def message_id(self) -> str:
        return self.envelope.message_id

    def reply(self, timeout: float | None = 30.0) -> Reply:
        """Wait for the reply; ReplyTimeout if none arrives within ``timeout`` seconds."""
        return _wait_for_reply(self._app, self.correlation_id, timeout, self.queue)

    def __repr__(self) -> str:
        return (
            f"<PendingReply {self.envelope.message_type} correlation_id={self.correlation_id} "
            f"queue={self.queue}>"
        )


class MessageBus:
    """Sends commands and queries to their owner and publishes events; bound to one Celery app.

    Without an app it uses Celery's current app, which is the deployment's app once its config
    module is imported (``import config``).
    """

    def __init__(self, app: celery.Celery | None = None, *, source: str = "client") -> None:
        self._app = app
        self.source = source

    @property
    def app(self) -> celery.Celery:
        """The bound app, or Celery's current one; NotInstalled unless postroom is installed on
        it, so a forgotten ``import config`` fails here instead of sending to Celery's defaults."""
        app = self._app if self._app is not None else current_app
        installation(app)
        return app

    def send(
        self,
        command: Command | Query,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        message_id: str | None = None,
        delay: float | None = None,
        not_before: datetime | None = None,
        reply_to: str | None = None,
        callback_url: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> PendingReply:
        """Enqueue a command (or query) for the one service that owns it; returns at once.

        The correlation ID is the reply's key, so it must be new for each command. Reusing one on
        purpose (a client retrying the same request) returns the reply already stored for it.
        A caller-chosen ``message_id`` (say, derived from an HTTP Idempotency-Key) makes a resend
        the same message: the owner runs it once, and without a correlation ID of its own the
        reply is stored under the message ID, so the resend finds it.

        ``delay`` (seconds) or ``not_before`` (a timezone-aware datetime) schedules it: the broker
        keeps it until then, no worker holds it (InvalidSchedule for a negative delay, a naive
        datetime, or both given).

        ``reply_to`` (a pool name) also delivers the reply, as a message, to that pool's
        ``@on_reply`` handler (see postroom.pipeline.callback); ContractError at once if this
        process knows no such handler. The result backend stores the reply all the same.

        ``callback_url`` has a command's reply POSTed there, signed, once it is settled
        (postroom.webhooks); CallbackRefused unless it is on POSTROOM_CALLBACK_ALLOW.

        ``headers``: postroom headers of its own besides the envelope, signed with it (a process
        instance's address, ``postroom.process``, which its reply carries back).
        """
        _check_sendable(command)
        if reply_to is not None:
            registry.check_reply_to(type(command), reply_to)
        due = due_time(delay, not_before)
        app = self.app
        extra: dict[str, str] = dict(headers or {})
        if callback_url is not None:
            if not isinstance(command, Command):
                raise WrongMessageKind("a callback carries a command's reply: ask queries")
            extra[CALLBACK_URL] = allowed(callback_url, installation(app).settings)
        pending, payload, headers, queue = self._prepare(
            app,
            command,
            correlation_id,
            causation_id,
            signer(app),
            message_id=message_id,
            reply_to=reply_to,
            extra=extra,
        )
        options: dict[str, Any] = {"queue": queue}
        if due is not None:
            headers = delays.with_due(headers, due)
            options = delays.route(_is_redis(app), queue.name, due, installation(app).queue_type)
        what = f"command {pending.message_id}"
        with published(what, _retries(app)):  # the queue is declared, then the message sent
            if _is_redis(app):
                message = _command_message(app, pending, payload, headers, causation_id)
                announce = installation(app).settings.task_sent_events
                with app.producer_or_acquire() as producer:
                    send_one(app, producer, options["queue"], message, announce=announce)
            else:  # RabbitMQ's publisher confirm is the wait; Celery's send costs little beside it
                app.send_task(
                    pending.envelope.message_type,
                    kwargs=payload,
                    task_id=pending.correlation_id,
                    headers=headers,
                    root_id=pending.correlation_id,
                    parent_id=causation_id,
                    argsrepr=pending.envelope.summary(),
                    **options,
                )
        return pending

    def send_many(self, commands: Sequence[Command | Query]) -> list[PendingReply]:
        """Enqueue many commands in a few broker round trips; returns once the broker holds them all.

        Each command is the same message ``send`` would make, with its own correlation ID. Unlike
        ``send``, no task-sent event goes to Flower per command: Flower lists them when a worker
        receives them.
        """
        for command in commands:
            _check_sendable(command)
        with gc_paused():
            app = self.app
            sign = signer(app)
            prepared = [self._prepare(app, command, None, None, sign) for command in commands]
            origin = anon_nodename()
            messages = [
                (queue, _command_message(app, pending, payload, headers, None, origin=origin))
                for pending, payload, headers, queue in prepared
            ]
            what = f"{len(messages)} commands (send_many)"
            with published(what, None), app.producer_or_acquire() as producer:
                publish_many(producer, messages)
        return [pending for pending, _, _, _ in prepared]

    def _prepare(
        self,
        app: celery.Celery,
        command: Command | Query,
        correlation_id: str | None,
        causation_id: str | None,
        sign: Signer | None,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[PendingReply, dict[str, Any], dict[str, Any], Queue]:
        contract = type(command)
        envelope = Envelope.new(
            contract.__message_type__,
            contract.__message_version__,
            source=self.source,
            correlation_id=correlation_id,
            causation_id=causation_id,
            message_id=message_id,
        )
        payload = command.payload()
        queue = route(app, command)
        pending = PendingReply(app, envelope, queue.name)
        extra = {**(extra or {}), **({REPLY_TO: reply_to} if reply_to else {})}
        return pending, payload, _headers(envelope, payload, sign, extra=extra), queue

    def send_reply(
        self,
        reply: Reply,
        *,
        pool: str,
        message_id: str,
        source: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Deliver ``reply`` as a message to ``pool``'s ``@on_reply`` handler, on its
        ``commands.<pool>`` queue: what a worker does once it has answered a command or query
        sent with ``reply_to`` (postroom.pipeline.callback). Its envelope carries the answered
        message's correlation ID, and its message ID as the causation ID; ``headers`` those of
        the answered message's own that the reply carries back (postroom.processes)."""
        app = self.app
        envelope = Envelope.new(
            reply_type(reply.message_type or ""),
            1,
            source=source,
            correlation_id=reply.correlation_id,
            causation_id=reply.causation_id,
            message_id=message_id,
        )
        payload = reply.model_dump(mode="json")
        headers = _headers(
            envelope, payload, signer(app), extra={**(headers or {}), REPLY_TO: pool}
        )
        installed = installation(app)
        queue = command_queue(pool, installed.queue_type, delivery_limit=installed.delivery_limit)
        with published(f"reply {message_id}", _retries(app)):
            app.send_task(
                envelope.message_type,
                kwargs=payload,
                task_id=message_id,
                headers=headers,
                root_id=envelope.correlation_id,
                parent_id=envelope.causation_id,
                argsrepr=envelope.summary(),
                queue=queue,
            )

    def ask(self, query: Query, *, timeout: float | None = 30.0) -> Reply:
        """Send a query and wait for its reply."""
        if not isinstance(query, Query):
            raise WrongMessageKind(
                f"bus.ask() takes a Query, not {query!r}: send commands with bus.send()"
            )
        return self.send(query).reply(timeout=timeout)

    def reply_for(self, correlation_id: str, *, timeout: float | None = 30.0) -> Reply:
        """The reply stored under a correlation ID, from any process that shares the result backend."""
        return _wait_for_reply(self.app, correlation_id, timeout, queue=None)

    def publish(
        self,
        event: Event,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        source: str | None = None,
        message_id: str | None = None,
        delay: float | None = None,
        not_before: datetime | None = None,
    ) -> str:
        """Broadcast an event to every pool subscribed to its type; returns its message ID.

        The publisher never names a subscriber: the broker's bindings decide who gets a copy.
        ``delay`` or ``not_before`` schedules it, as for ``send``; it is logged at once.

        The event is appended to the event log first, then published. The log and the broker are
        two stores with no transaction across them, so one of them can hold an event the other
        lacks; this order makes it the log: a failed publish leaves a logged event no pool got
        (the caller sees the error, and a handler's retry publishes the same ID again, which the
        log keeps once), while the other order could deliver an event that a replay or a newly
        bootstrapped pool would never see. Bootstrapping relies on this order (postroom.replay).
        """
        if not isinstance(event, Event):
            raise WrongMessageKind(
                f"bus.publish() takes an Event, not {event!r}: commands go to their one owner "
                "with bus.send(command)"
            )
        contract = type(event)
        message_type = contract.__message_type__
        envelope = Envelope.new(
            message_type,
            contract.__message_version__,
            source=source or self.source,
            correlation_id=correlation_id,
            causation_id=causation_id,
            message_id=message_id,
        )
        due = due_time(delay, not_before)
        app = self.app
        payload = event.payload()
        headers = _headers(envelope, payload, signer(app), "publish")
        event_log(app).append(headers, payload)
        if due is not None:
            headers = delays.with_due(headers, due)
        what = f"event {envelope.message_id}"
        with published(what, _retries(app)), app.producer_or_acquire() as producer:
            if producer.connection.transport.driver_type == "redis":
                message = event_message(app, envelope, payload, headers)

                def copies(producer: Producer) -> None:
                    # One per bound pool queue, addressed to that queue alone (see topology).
                    bound = bound_queues(producer, EVENTS_EXCHANGE.name, message_type)
                    publish_many(producer, [(queue_named(queue), message) for queue in bound])

                retried(app, producer, copies)
            else:
                message = app.amqp.create_task_message(
                    envelope.message_id,
                    message_type,
                    (),
                    payload,
                    root_id=envelope.correlation_id,
                    parent_id=causation_id,
                    ignore_result=True,
                    argsrepr=envelope.summary(),
                )
                exchange, declare = EVENTS_EXCHANGE, [EVENTS_EXCHANGE]
                if due is not None:
                    level = delays.level_for(due - time())
                    exchange, headers[delays.LEVEL] = delays.DELAYED_EVENTS, str(level)
                    queue_type = installation(app).queue_type
                    declare += [
                        delays.DELAYED_EVENTS,
                        delays.delayed_event_queue(level, queue_type),
                    ]
                app.amqp.send_task_message(
                    producer,
                    message_type,
                    message,
                    exchange=exchange.name,
                    routing_key=message_type,
                    declare=declare,
                    headers=headers,
                )
        return envelope.message_id


def _retries(app: celery.Celery) -> int:
    return installation(app).settings.publish_retries


def _is_redis(app: celery.Celery) -> bool:
    return installation(app).settings.broker_is_redis


def _command_message(
    app: celery.Celery,
    pending: PendingReply,
    payload: dict[str, Any],
    headers: dict[str, Any],
    causation_id: str | None,
    *,
    origin: str | None = None,
) -> TaskMessage:
    """A command's task message as ``send`` and ``send_many`` build it: its task ID and root are
    the correlation ID, its parent the message that caused it."""
    return task_message(
        app,
        pending.envelope.message_type,
        pending.correlation_id,
        payload,
        headers,
        root_id=pending.correlation_id,
        parent_id=causation_id,
        argsrepr=pending.envelope.summary(),
        origin=origin,
    )


def _check_sendable(command: object) -> None:
    if not isinstance(command, _SENDABLE):
        hint = (
            "events are broadcast: use bus.publish(event)"
            if isinstance(command, Event)
            else "build a Command or Query contract first"
        )
        raise WrongMessageKind(f"bus.send() takes a Command or Query, not {command!r}: {hint}")


def _headers(
    envelope: Envelope,
    payload: dict[str, Any],
    sign: Signer | None,
    operation: str = "send",
    *,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    headers = envelope.to_headers()
    headers.update(extra or {})
    if sign is not None:
        headers[SIGNATURE] = sign.sign(envelope.message_type, payload, headers)
    tracing.sent(envelope, headers, operation)  # after signing: traceparent is not signed
    return headers


def _wait_for_reply(
    app: celery.Celery, correlation_id: str, timeout: float | None, queue: str | None
) -> Reply:
    result = AsyncResult(correlation_id, app=app)
    try:
        outcome = result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
    except CeleryTimeout:
        # stop listening for it now, not whenever the result object is collected: a
        # long-running sender (an HTTP API) would pile up subscriptions otherwise
        app.backend.remove_pending_result(result)
        where = f"on queue {queue}" if queue else "from any pool"
        raise ReplyTimeout(
            f"no reply for correlation ID {correlation_id} within {timeout}s {where}. The command "
            "may still be queued: check that the pool consuming it is running (postroom up), then "
            f"fetch the reply later with bus.reply_for({correlation_id!r})"
        ) from None
    if result.state == "SUCCESS":
        return Reply.model_validate(outcome)
    if isinstance(outcome, Unsuccessful):
        return Reply.model_validate(outcome.reply)
    return Reply(
        status="failed",
        error=ErrorInfo(type=type(outcome).__name__, message=str(outcome)),
        correlation_id=correlation_id,
        message_id=uuid7(),
    )
