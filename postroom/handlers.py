"""Turns plain handler functions into Celery tasks that decode, run, retry and reply.

The task is thin on purpose: it checks the envelope, validates the payload against the contract,
calls the function with a context, and turns the outcome into a Reply. Business logic stays in the
function, testable without a broker.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import celery
import kombu.exceptions
import redis.exceptions
from celery import shared_task
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from postroom.bus import MessageBus
from postroom.errors import (
    ContractError,
    FailedReply,
    InvalidMessage,
    Rejected,
    RejectedReply,
    TransientError,
)
from postroom.headers import Envelope, uuid7
from postroom.messages import Command, ErrorInfo, Event, Message, Query, Reply
from postroom.registry import Handler, registry

F = TypeVar("F", bound=Callable[..., Any])

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


@dataclass(frozen=True)
class HandlerContext:
    """What a handler knows about the message it runs for, and how it speaks in return."""

    envelope: Envelope
    attempt: int
    owner: str
    bus: MessageBus

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
        """Publish an event caused by this message, in the same conversation."""
        return self.bus.publish(
            event,
            correlation_id=self.correlation_id,
            causation_id=self.message_id,
            source=self.owner,
        )


class MessageTask(celery.Task):  # type: ignore[misc]
    """What every postroom task shares: at-least-once settings, decoding and the retry decision."""

    acks_late = True
    reject_on_worker_lost = True

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
        try:
            return envelope, contract.model_validate(payload)
        except ValidationError as exc:
            raise InvalidMessage(f"invalid {contract.__name__} payload: {exc}") from exc

    def context(self, envelope: Envelope, owner: str) -> HandlerContext:
        return HandlerContext(envelope, self.request.retries + 1, owner, MessageBus(self.app))

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


class HandlerTask(MessageTask):
    """Base task of every command and query handler: runs the one owner and records its Reply."""

    throws = (RejectedReply,)  # an expected outcome: recorded as FAILURE, not logged as an error
    handler: Handler

    def handle(self, args: tuple[Any, ...], payload: dict[str, Any]) -> dict[str, Any]:
        attempt = self.request.retries + 1
        try:
            envelope, message = self.decode(self.handler.contract, args, payload)
        except InvalidMessage as exc:
            error = ErrorInfo(type=type(exc).__name__, message=str(exc))
            raise RejectedReply(self._reply("rejected", None, attempt, error=error)) from exc
        try:
            value = to_jsonable_python(
                self.handler.fn(message, self.context(envelope, self.handler.owner))
            )
        except Rejected as exc:
            error = ErrorInfo(type="Rejected", message=exc.reason)
            raise RejectedReply(self._reply("rejected", envelope, attempt, error=error)) from exc
        except PydanticSerializationError as exc:
            error = ErrorInfo(
                type="InvalidReply",
                message=f"the handler's return value is not JSON-serialisable: {exc}",
            )
            raise FailedReply(self._reply("failed", envelope, attempt, error=error)) from exc
        except Exception as exc:
            if self.should_retry(exc):
                raise self.retry_later(exc) from exc
            error = ErrorInfo(type=type(exc).__name__, message=str(exc))
            raise FailedReply(self._reply("failed", envelope, attempt, error=error)) from exc
        return self._reply("succeeded", envelope, attempt, value=value)

    def _reply(
        self,
        status: str,
        envelope: Envelope | None,
        attempt: int,
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
            attempts=attempt,
        ).model_dump(mode="json")


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

    def run(task: Any, *args: Any, **payload: Any) -> Any:
        return task.handle(args, payload)

    run.__module__, run.__doc__ = module, doc
    shared_task(name=name, bind=True, base=base, **attrs)(run)
