"""Turns plain handler functions into Celery tasks that decode, deduplicate, run, retry and reply.

The task is thin on purpose: it checks the envelope, validates the payload against the contract,
skips a message its owner has already handled, calls the function with a context, and turns the
outcome into a Reply. Business logic stays in the function, testable without a broker.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import celery
import kombu.exceptions
import redis.exceptions
from celery import shared_task
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from postroom import tracing
from postroom.bus import MessageBus
from postroom.errors import (
    AlreadyHandled,
    ContractError,
    FailedReply,
    InvalidMessage,
    Rejected,
    RejectedReply,
    TransientError,
)
from postroom.headers import Envelope, uuid7
from postroom.messages import (
    Command,
    CommandFailed,
    ErrorInfo,
    Event,
    Message,
    Query,
    Reply,
    upcast,
)
from postroom.registry import Handler, registry
from postroom.reliability import DeadLetter, Reliability, derived_id, reliability
from postroom.signing import signer
from postroom.topology import command_queue_name

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger(__name__)

#: failures worth retrying besides TransientError: the broker or a Redis store went away for a moment
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by max_retries (attempts = max_retries + 1)."""

    max_retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    retry_on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS

    def delay(self, retries_so_far: int) -> float:
        """Seconds before the next attempt: half fixed, half random, so retries do not stampede."""
        ceiling = min(self.backoff_max, self.backoff * 2.0**retries_so_far)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_policy(app: celery.Celery) -> RetryPolicy:
    policy = app.conf.get("postroom_retry_policy")
    return policy if isinstance(policy, RetryPolicy) else RetryPolicy()


class HandlerContext:
    """What a handler knows about the message it runs for, and how it speaks in return."""

    def __init__(
        self, envelope: Envelope, attempt: int, owner: str, bus: MessageBus, reliable: Reliability
    ) -> None:
        self.envelope = envelope
        self.attempt = attempt
        self.owner = owner
        self.bus = bus
        self._reliability = reliable
        self._published = 0
        self._transaction: Any = None
        #: what the owner's inbox knows this run by: the message ID, except for a forced replay
        self.inbox_id = envelope.message_id

    @property
    def message_id(self) -> str:
        return self.envelope.message_id

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlation_id

    @property
    def causation_id(self) -> str | None:
        return self.envelope.causation_id

    def publish(self, event: Event) -> str:
        """Publish an event caused by this message, in the same conversation.

        Its message ID derives from this message's ID and its rank among this run's events, so a
        second run of the handler publishes the same IDs and subscribers drop the repeats.
        """
        self._published += 1
        return self.bus.publish(
            event,
            correlation_id=self.correlation_id,
            causation_id=self.message_id,
            source=self.owner,
            message_id=derived_id(self.message_id, self._published),
        )

    def transaction(self) -> Any:
        """A Redis pipeline whose writes are committed together with this message's inbox mark.

        Queue the handler's writes on it (it is on the inbox's Redis: POSTROOM_STATE_URL) and the
        effect and the record that the message was handled land at once, or not at all; if a
        concurrent copy of the message committed first, not at all. Queue writes only: the
        pipeline is applied by postroom (as one script), never executed by the handler.
        """
        if self._transaction is None:
            self._transaction = self._reliability.client.pipeline(transaction=False)
        return self._transaction

    def restart(self, attempt: int) -> None:
        """Before running again in place: drop the failed run's queued writes; the events the next
        run publishes get the same IDs as the failed run's, so any already out are repeats."""
        if self._transaction is not None:
            self._transaction.reset()
            self._transaction = None
        self._published = 0
        self.attempt = attempt

    def commit(self, outcome: dict[str, Any]) -> None:
        pipe = self.transaction()
        inbox = self._reliability.inbox
        inbox.mark(pipe, self.owner, self.message_id, outcome)
        self._transaction = None
        if not inbox.commit(pipe, self.owner, self.inbox_id):
            raise AlreadyHandled(f"{self.inbox_id} was handled by {self.owner} meanwhile")


class MessageTask(celery.Task):  # type: ignore[misc]
    """What every postroom task shares: at-least-once settings, decoding, dedup, retries, DLQ."""

    acks_late = True
    reject_on_worker_lost = True

    @property
    def reliable(self) -> Reliability:
        return reliability(self.app)

    def decode(
        self, contract: type[Message], args: tuple[Any, ...], payload: dict[str, Any]
    ) -> tuple[Envelope, Message]:
        """Check the envelope and validate the payload again on receipt; InvalidMessage if not."""
        envelope = Envelope.from_headers(self.request.headers)
        if envelope.message_type != contract.__message_type__:
            raise InvalidMessage(
                f"header says {envelope.message_type!r} but the task handles "
                f"{contract.__message_type__!r}"
            )
        if args:
            raise InvalidMessage("a postroom message carries its fields as keyword arguments only")
        sign = signer(self.app)
        if sign is not None:
            sign.verify(envelope.message_type, payload, self.request.headers or {})
        try:
            return envelope, contract.model_validate(upcast(contract, envelope.version, payload))
        except ValidationError as exc:
            raise InvalidMessage(f"invalid {contract.__name__} payload: {exc}") from exc

    def context(self, envelope: Envelope, owner: str) -> HandlerContext:
        return HandlerContext(
            envelope, self.request.retries + 1, owner, MessageBus(self.app), self.reliable
        )

    def begin(self, owner: str, message_id: str, *, dedupe: bool) -> tuple[Any, int | None]:
        """(what was recorded if already handled, the run count if it marks a poison message)."""
        done, runs = self.reliable.inbox.begin(owner, message_id, dedupe=dedupe)
        return done, (runs if done is None and runs > self.reliable.poison_after else None)

    def should_retry(self, exc: BaseException) -> bool:
        policy = retry_policy(self.app)
        return isinstance(exc, policy.retry_on) and self.request.retries < policy.max_retries

    def retry_later(self, exc: BaseException, **options: Any) -> celery.exceptions.Retry:
        policy = retry_policy(self.app)
        return self.retry(
            exc=exc,
            countdown=policy.delay(self.request.retries),
            max_retries=policy.max_retries,
            **options,
        )

    def dead_letter(
        self,
        reason: str,
        exc: BaseException,
        *,
        queue: str,
        owner: str,
        payload: dict[str, Any],
        message: str | None = None,
    ) -> str:
        """Keep the message, its headers and why it could not be handled; it can be redriven."""
        headers = {k: v for k, v in (self.request.headers or {}).items() if k != "x-death"}
        letter = DeadLetter(
            reason=reason,
            error_type=type(exc).__name__,
            error_message=str(exc),
            queue=queue,
            owner=owner,
            task=self.request.task or self.name,
            task_id=self.request.id,
            headers=headers,
            kwargs=payload,
            traceback="".join(traceback.format_exception(exc)),
            attempts=self.request.retries + 1,
        )
        return self.reliable.dead_letters.add(letter)


class HandlerTask(MessageTask):
    """Base task of every command and query handler: runs the one owner and records its Reply."""

    throws = (RejectedReply,)  # an expected outcome: recorded as FAILURE, not logged as an error
    handler: Handler

    def handle(self, args: tuple[Any, ...], payload: dict[str, Any]) -> dict[str, Any]:
        owner, queue = self.handler.owner, command_queue_name(self.handler.owner)
        try:
            envelope, message = self.decode(self.handler.contract, args, payload)
        except InvalidMessage as exc:
            self.dead_letter("invalid", exc, queue=queue, owner=owner, payload=payload)
            raise RejectedReply(self._reply("rejected", None, error=_error(exc))) from exc
        is_command = isinstance(message, Command)  # queries change nothing: no inbox mark
        inbox = self.reliable.inbox
        done, poison_runs = self.begin(owner, envelope.message_id, dedupe=is_command)
        if done is not None:  # a redelivery or a duplicate: the reply it already got
            if done["status"] == "rejected":
                raise RejectedReply(done)
            return dict(done)
        if poison_runs is not None:
            self._give_up(envelope, payload, "poison", PoisonMessage(poison_runs), queue)
        ctx = self.context(envelope, owner)
        try:
            return self._handle_once(ctx, message, payload, queue=queue, is_command=is_command)
        except AlreadyHandled:  # a concurrent copy won: the reply it recorded
            inbox.ended(owner, envelope.message_id)
            done = inbox.outcome(owner, envelope.message_id) or {}
            if done.get("status") == "rejected":
                raise RejectedReply(done) from None
            return dict(done)

    def _handle_once(
        self,
        ctx: HandlerContext,
        message: Message,
        payload: dict[str, Any],
        *,
        queue: str,
        is_command: bool,
    ) -> dict[str, Any]:
        envelope = ctx.envelope
        owner, inbox = ctx.owner, self.reliable.inbox
        try:
            value = to_jsonable_python(self._run(message, ctx))
        except Rejected as exc:
            reply = self._reply(
                "rejected", envelope, error=ErrorInfo(type="Rejected", message=exc.reason)
            )
            self._settle(ctx, reply, is_command)
            raise RejectedReply(reply) from exc
        except PydanticSerializationError as exc:
            error = InvalidReply(f"the handler's return value is not JSON-serialisable: {exc}")
            self._give_up(envelope, payload, "failed", error, queue)
        except AlreadyHandled:
            raise
        except Exception as exc:
            if self.should_retry(exc):
                inbox.ended(owner, envelope.message_id)
                raise self.retry_later(exc) from exc
            self._give_up(envelope, payload, "failed", exc, queue)
        reply = self._reply("succeeded", envelope, value=value)
        self._settle(ctx, reply, is_command)
        return reply

    def _run(self, message: Message, ctx: HandlerContext) -> Any:
        """Call the handler. A partitioned message's transient failures are retried right here:
        sent back to its queue, it would be overtaken by the messages behind it."""
        if self.handler.contract.__partition_key__ is None:
            return self.handler.fn(message, ctx)
        policy = retry_policy(self.app)
        for retries in range(policy.max_retries):
            try:
                return self.handler.fn(message, ctx)
            except policy.retry_on as exc:
                logger.warning("%s failed (%r); retrying in place, in order", ctx.message_id, exc)
                time.sleep(policy.delay(retries))
                ctx.restart(attempt=retries + 2)
        return self.handler.fn(message, ctx)

    def _settle(self, ctx: HandlerContext, reply: dict[str, Any], is_command: bool) -> None:
        """A final reply: a command's is recorded with its writes; a query's run just ends."""
        if is_command:
            ctx.commit(reply)
        else:
            self.reliable.inbox.ended(ctx.owner, ctx.message_id)

    def _give_up(
        self,
        envelope: Envelope,
        payload: dict[str, Any],
        reason: str,
        exc: BaseException,
        queue: str,
    ) -> NoReturn:
        """Failed for good: dead-letter it, tell whoever cares (CommandFailed), reply failed."""
        self.reliable.inbox.ended(self.handler.owner, envelope.message_id)
        self.dead_letter(reason, exc, queue=queue, owner=self.handler.owner, payload=payload)
        reply = self._reply("failed", envelope, error=_error(exc))
        if issubclass(self.handler.contract, Command):
            MessageBus(self.app).publish(
                CommandFailed(
                    command_type=self.handler.contract.__message_type__,
                    error_type=type(exc).__name__,
                    error_message=str(exc),
                    attempts=self.request.retries + 1,
                ),
                correlation_id=envelope.correlation_id,
                causation_id=envelope.message_id,
                source=self.handler.owner,
                message_id=derived_id(envelope.message_id, 0),
            )
        raise FailedReply(reply) from exc

    def _reply(
        self,
        status: str,
        envelope: Envelope | None,
        *,
        value: Any = None,
        error: ErrorInfo | None = None,
    ) -> dict[str, Any]:
        return Reply(
            status=status,  # type: ignore[arg-type]
            value=value,
            error=error,
            correlation_id=envelope.correlation_id if envelope else self.request.id,
            message_id=uuid7(),
            causation_id=envelope.message_id if envelope else None,
            message_type=self.handler.contract.__message_type__,
            attempts=self.request.retries + 1,
        ).model_dump(mode="json")


class PoisonMessage(Exception):
    """The message was delivered again and again and never finished: it kills its worker."""

    def __init__(self, runs: int) -> None:
        super().__init__(
            f"{runs} deliveries never finished (the worker died each time); "
            "dead-lettered instead of delivered again"
        )


class InvalidReply(Exception):
    """The handler returned something that cannot travel as JSON."""


def _error(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(type=type(exc).__name__, message=str(exc))


def handles(contract: type[Message], *, service: str | None = None) -> Callable[[F], F]:
    """Make ``fn(message, ctx)`` the one handler of a command or query type, run as a Celery task.

    The task is named after the contract's type and consumed from ``commands.<service>``. The
    function is returned unchanged, so it can be called directly in unit tests.
    """
    if not (isinstance(contract, type) and issubclass(contract, Command | Query)):
        raise ContractError(
            f"@handles takes a Command or Query class, not {contract!r}; "
            "events get subscribers with @subscribes"
        )
    if service is not None and service != contract.__service__:
        raise ContractError(
            f"{contract.__name__} belongs to service {contract.__service__!r}, not {service!r}: "
            f"declare it with class {contract.__name__}({contract.kind.capitalize()}, "
            f"service={service!r})"
        )

    def decorate(fn: F) -> F:
        handler = Handler(contract, fn, contract.__service__)
        registry.add_owner(handler)
        register_task(
            contract.__message_type__, HandlerTask, fn.__module__, fn.__doc__, handler=handler
        )
        return fn

    return decorate


def register_task(
    name: str, base: type[MessageTask], module: str, doc: str | None, **attrs: Any
) -> None:
    """Register a Celery task (for every app, like shared_task) whose body is ``base.handle``."""

    def run(task: Any, /, *args: Any, **payload: Any) -> Any:
        # shadow: an event delivery's name, <type>@<pool> (see subscribers.EventRequest)
        request = task.request
        with tracing.handling(request.headers, request.shadow or request.task or name):
            return task.handle(args, payload)

    run.__module__, run.__doc__ = module, doc
    shared_task(name=name, bind=True, base=base, **attrs)(run)
