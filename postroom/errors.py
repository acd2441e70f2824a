"""One exception root, split by what the caller should do next.

Permanent errors (a rejection, an invalid or unknown message, a misuse of the API) are never retried;
transient ones are. Every message says what to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CircuitOpen",
    "CircuitOpenReply",
    "ConcurrentUpdate",
    "ConfigurationError",
    "ContractError",
    "DuplicateHandler",
    "FailedReply",
    "InvalidMessage",
    "InvalidSchedule",
    "NotInstalled",
    "PostroomError",
    "ProcessNotFound",
    "QueueTypeMismatch",
    "Rejected",
    "RejectedReply",
    "ReplyTimeout",
    "TransientError",
    "UnknownMessageType",
    "Unsuccessful",
    "WrongMessageKind",
]


class PostroomError(Exception):
    """Root of every error postroom raises on purpose."""


class ConfigurationError(PostroomError, ValueError):
    """A setting has a value it cannot take; the message names the variable and what it means."""


class QueueTypeMismatch(ConfigurationError):
    """RabbitMQ holds a queue under a postroom name with another type than the deployment's
    (POSTROOM_QUEUE_TYPE); the message names the queue and how to migrate it."""

    def __init__(self, message: str, queue: str) -> None:
        super().__init__(message)
        self.queue = queue


class ContractError(PostroomError, TypeError):
    """A message class is declared in a way the model does not allow."""


class DuplicateHandler(ContractError):
    """A command or query type got a second handler; each has exactly one owner."""


class WrongMessageKind(PostroomError, TypeError):
    """A message was handed to the wrong verb (an event to send(), a command to publish())."""


class InvalidSchedule(PostroomError, ValueError):
    """A message was sent with a delay or a not_before time it cannot be scheduled by."""


class InvalidMessage(PostroomError, ValueError):
    """A received message cannot be decoded: bad payload, missing or malformed headers."""


class UnknownMessageType(InvalidMessage):
    """A received message names a type this process has no contract for."""


class CallbackRefused(InvalidMessage):
    """A callback URL is not on POSTROOM_CALLBACK_ALLOW, or callbacks are off: nothing is sent."""


class Rejected(PostroomError):
    """Raised by a handler that refuses a command; never retried, the reply says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientError(PostroomError):
    """Raised by a handler for a failure worth retrying (with backoff) before giving up."""


class ConcurrentUpdate(TransientError):
    """Another message of the same process instance committed first: this run's writes are
    discarded and it runs again, at once, against the instance as that message left it."""


class ProcessNotFound(TransientError):
    """A message for a process instance that has not started (its starting message may still
    be on its way): retried with backoff, then dead-lettered."""


class CallbackFailed(TransientError):
    """A callback receiver answered other than 2xx, or could not be reached: retried, then kept."""


class CircuitOpen(PostroomError):
    """A handler's circuit breaker is open: its message was held, not run, or a query's
    fallback had no answer for it."""


class RateLimited(PostroomError):
    """A handler's rate limit had no slot free: its message was held until its slot, not run."""


class SendFailed(PostroomError, ConnectionError):
    """The broker could not be reached, or did not confirm a message, after every retry; it may
    or may not hold the message."""


class ReplyTimeout(PostroomError, TimeoutError):
    """No reply arrived in time; the command may still be queued or running."""


class Unsuccessful(PostroomError):
    """Carries a rejected or failed reply through Celery's FAILURE state.

    Recording the outcome as a task failure makes Flower show rejections and failures as such, while
    the reply itself (status, error, ids) travels intact as this exception's only argument, which
    the result backend stores as JSON.
    """

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply)
        self.reply = reply

    def __str__(self) -> str:
        error = self.reply.get("error") or {}
        return f"{self.reply.get('status')}: {error.get('type')}: {error.get('message')}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class RejectedReply(Unsuccessful):
    """The handler refused the command (or its payload was invalid): an expected outcome."""


class FailedReply(Unsuccessful):
    """The handler broke, or a transient failure outlived its retries."""


class CircuitOpenReply(FailedReply):
    """A query's breaker is open and its fallback had no answer: a failure its worker expects,
    so Celery logs it in a line, without a traceback."""


class AlreadyHandled(PostroomError):
    """Another run of the same message committed first; this run's writes were discarded.

    Raised inside a handling (never to a user's code path on purpose): two copies of one message
    can run at once, after a redelivery or a duplicate send, and both pass the inbox check.
    """


class OutOfLine(PostroomError):
    """A dead letter that cannot be redriven or purged now without breaking its key's order."""


class NoSuchLetter(PostroomError, LookupError):
    """No dead letter has that ID (it was redriven or purged already)."""


class NotInstalled(PostroomError, RuntimeError):
    """The Celery app was never given postroom.install(app, settings); nothing would be routed."""
