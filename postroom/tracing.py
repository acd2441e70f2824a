"""One trace per conversation: spans around every send, publish and handling, linked through headers.

postroom makes its own spans rather than relying on opentelemetry-instrumentation-celery: that
package traces through Celery's publish signals, which postroom's bulk and Redis fan-out paths do
not go through, and it cannot end the producer span of a task the sending process has no handler
for (a sender that only knows the contract). Here the sender injects the W3C ``traceparent``
into the message headers next to the envelope, and the worker continues the trace from it, so
a request, its command, the reply and every pool's delivery of every event share one trace.

Only the OpenTelemetry API is used here: without an SDK configured (see postroom/telemetry.py)
every span is a no-op costing next to nothing.

The same module puts the envelope's IDs on every log record written while a message is handled,
so structured logs and traces can be joined on ``correlation_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context, propagate, trace

from postroom.errors import InvalidMessage
from postroom.headers import Envelope

_tracer = trace.get_tracer("postroom")
#: the envelope of the message being handled in this thread, for log records
_current: ContextVar[Envelope | None] = ContextVar("postroom_envelope", default=None)


def _attributes(envelope: Envelope) -> dict[str, str]:
    return {
        "messaging.system": "postroom",
        "messaging.message.id": envelope.message_id,
        "messaging.message.conversation_id": envelope.correlation_id,
        "postroom.message_type": envelope.message_type,
        "postroom.causation_id": envelope.causation_id or "",
    }


def sent(envelope: Envelope, headers: MutableMapping[str, Any], operation: str) -> None:
    """Record a send or publish as a span and put its context into ``headers`` for the consumer."""
    with _tracer.start_as_current_span(
        f"{operation} {envelope.message_type}",
        kind=trace.SpanKind.PRODUCER,
        attributes=_attributes(envelope),
    ):
        propagate.inject(headers)


@contextmanager
def handling(headers: dict[str, Any] | None, task: str) -> Iterator[None]:
    """The span of one handling: a child of the span that sent the message.

    A message without a valid envelope still gets a span (named after the task), so its refusal
    shows up in the trace of whoever sent it.
    """
    headers = headers or {}
    envelope = _envelope(headers)
    token = context.attach(propagate.extract(headers))
    attributes = _attributes(envelope) if envelope else {"messaging.system": "postroom"}
    try:
        with _tracer.start_as_current_span(
            f"handle {task}",
            kind=trace.SpanKind.CONSUMER,
            attributes={**attributes, "postroom.task": task},
        ):
            yield
    finally:
        context.detach(token)


def carried(deferred: Callable[[], None]) -> Callable[[], None]:
    """``deferred``, bound to the trace context current now: work a handling leaves for after its
    reply (the outbox's dispatch) runs once the handling's span has ended, and its spans must
    still be children of that handling, in the conversation's one trace."""
    captured = context.get_current()

    def run() -> None:
        token = context.attach(captured)
        try:
            deferred()
        finally:
            context.detach(token)

    return run


@contextmanager
def serving(method: str, headers: dict[str, Any]) -> Iterator[trace.Span]:
    """The server span of an HTTP request that sends messages: the root of their trace, or a
    child of the caller's if it sent a ``traceparent``. Name it once the route is known."""
    token = context.attach(propagate.extract(headers))
    try:
        with _tracer.start_as_current_span(method, kind=trace.SpanKind.SERVER) as span:
            yield span
    finally:
        context.detach(token)


def _envelope(headers: dict[str, Any]) -> Envelope | None:
    try:
        return Envelope.from_headers(headers)
    except InvalidMessage:
        return None


def log_context_start(task: Any = None, **_: Any) -> None:
    """task_prerun receiver: log records from here on carry this message's IDs.

    A signal rather than the span's scope, because Celery logs a task's outcome ("succeeded
    in 0.01s") after the task body returned, and that line should carry the IDs too.
    """
    headers = getattr(getattr(task, "request", None), "headers", None) or {}
    _current.set(_envelope(headers))


def log_context_end(**_: Any) -> None:
    """task_postrun receiver."""
    _current.set(None)


class EnvelopeFilter(logging.Filter):
    """Adds message_id, correlation_id and causation_id (empty outside a handling) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        envelope = _current.get()
        record.message_id = envelope.message_id if envelope else ""
        record.correlation_id = envelope.correlation_id if envelope else ""
        record.causation_id = (envelope.causation_id or "") if envelope else ""
        record.message_type = envelope.message_type if envelope else ""
        return True
