"""The MessageBus: send a command, ask a query, publish an event; and wait for replies without polling.

Commands and queries are sent by task name (``send_task``), so a sender needs the contract classes and
nothing else. The task id is the command's correlation ID: the reply lands in the result backend
under that key, where ``AsyncResult.get`` waits for it on Redis pub/sub.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import celery
from celery import current_app
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu import Queue

from postroom.errors import ReplyTimeout, Unsuccessful, WrongMessageKind
from postroom.headers import Envelope, uuid7
from postroom.messages import Command, ErrorInfo, Event, Query, Reply
from postroom.signing import SIGNATURE, signer
from postroom.topology import EVENTS_EXCHANGE, command_queue, command_queue_name


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
        return self._app if self._app is not None else current_app

    def send(
        self,
        command: Command | Query,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> PendingReply:
        """Enqueue a command (or query) for the one service that owns it; returns at once.

        The correlation ID is the reply's key, so it must be new for each command. Reusing one on
        purpose (a client retrying the same request) returns the reply already stored for it.
        """
        pending, payload, headers = self._prepare(command, correlation_id, causation_id)
        self.app.send_task(
            pending.envelope.message_type,
            kwargs=payload,
            task_id=pending.correlation_id,
            headers=headers,
            queue=command_queue(type(command).__service__),
            root_id=pending.correlation_id,
            parent_id=causation_id,
            argsrepr=pending.envelope.summary(),
        )
        return pending

    def send_many(self, commands: Sequence[Command | Query]) -> list[PendingReply]:
        """Enqueue many commands at once: one producer, and on Redis pipelined (kombu batches).

        Each command is the same message ``send`` would make, with its own correlation ID.
        """
        prepared = [self._prepare(command, None, None) for command in commands]
        app = self.app
        with app.producer_or_acquire() as producer, producer.batch():
            for command, (pending, payload, headers) in zip(commands, prepared, strict=True):
                name = pending.envelope.message_type
                app.amqp.send_task_message(
                    producer,
                    name,
                    app.amqp.create_task_message(
                        pending.correlation_id, name, (), payload,
                        root_id=pending.correlation_id, argsrepr=pending.envelope.summary(),
                    ),
                    queue=command_queue(type(command).__service__),
                    headers=headers,
                )  # fmt: skip
        return [pending for pending, _, _ in prepared]

    def _prepare(
        self, command: Command | Query, correlation_id: str | None, causation_id: str | None
    ) -> tuple[PendingReply, dict[str, Any], dict[str, Any]]:
        if not isinstance(command, Command | Query):
            hint = (
                "events are broadcast: use bus.publish(event)"
                if isinstance(command, Event)
                else ("build a Command or Query contract first")
            )
            raise WrongMessageKind(f"bus.send() takes a Command or Query, not {command!r}: {hint}")
        contract = type(command)
        envelope = Envelope.new(
            contract.__message_type__,
            contract.__message_version__,
            source=self.source,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        payload = command.payload()
        pending = PendingReply(self.app, envelope, command_queue_name(contract.__service__))
        return pending, payload, self._headers(envelope, payload)

    def _headers(self, envelope: Envelope, payload: dict[str, Any]) -> dict[str, Any]:
        headers = envelope.to_headers()
        sign = signer(self.app)
        if sign is not None:
            headers[SIGNATURE] = sign.sign(envelope.message_type, payload, headers)
        return headers

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
    ) -> str:
        """Broadcast an event to every pool subscribed to its type; returns its message ID.

        The publisher never names a subscriber: the broker's bindings decide who gets a copy.
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
        app = self.app
        payload = event.payload()
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
        headers = self._headers(envelope, payload)
        with app.producer_or_acquire() as producer, producer.batch():
            if producer.connection.transport.driver_type == "redis":
                # One copy per bound pool queue, addressed to that queue alone (see topology).
                for row in producer.channel.get_table(EVENTS_EXCHANGE.name):
                    routing_key, _, queue = row
                    if routing_key == message_type:
                        app.amqp.send_task_message(
                            producer,
                            message_type,
                            message,
                            queue=Queue(queue),
                            declare=[],
                            headers=headers,
                        )
            else:
                app.amqp.send_task_message(
                    producer,
                    message_type,
                    message,
                    exchange=EVENTS_EXCHANGE.name,
                    routing_key=message_type,
                    declare=[EVENTS_EXCHANGE],
                    headers=headers,
                )
        return envelope.message_id


def _wait_for_reply(
    app: celery.Celery, correlation_id: str, timeout: float | None, queue: str | None
) -> Reply:
    result = AsyncResult(correlation_id, app=app)
    try:
        outcome = result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
    except CeleryTimeout:
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
