"""Celery's consumer, guarded: a message it cannot even turn into a task is dead-lettered first."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from time import time
from typing import Any

from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from postroom._celery import delays
from postroom._celery.queue_types import queue_types_checked
from postroom.errors import InvalidMessage
from postroom.headers import MESSAGE_ID, VERSION
from postroom.install import installation
from postroom.messages import upcast
from postroom.registry import registry
from postroom.reliability import DeadLetter, DeadLetters, reliability
from postroom.topology import GIVEN_UP_QUEUE

logger = get_logger(__name__)


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, but a message it cannot even turn into a task is dead-lettered first.

    Celery logs and drops a message it cannot decode (bad JSON, a refused content type such as
    pickle), one of no known format, or one naming an unknown task. postroom keeps each, with the
    reason, before Celery acknowledges it, so the worker keeps running and nothing is lost.
    A queue RabbitMQ holds with another type than the deployment's stops the worker with a
    QueueTypeMismatch saying how to migrate it (at start, or when a partition queue is leased).
    On RabbitMQ a plain Celery ETA still ahead goes to postroom's delay queues, not the timer.
    """

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        """Celery's consumer steps without its native delayed delivery, which Celery switches on
        when it sees a quorum queue: it serves topic and fanout exchanges only, so for
        postroom's direct exchanges it would declare 28 idle quorum queues and warn about each
        queue; postroom's own delay queues (postroom._celery.delays) hold what waits."""

        default_steps = [
            step
            for step in Consumer.Blueprint.default_steps
            if not step.endswith(":DelayedDelivery")
        ]

    def start(self) -> None:
        with queue_types_checked():
            super().start()

    def _dead_letter_raw(self, message: Any, reason: str, exc: BaseException | None) -> None:
        try:
            info = message.delivery_info or {}
            letter = raw_letter(
                message,
                reason=reason,
                error_type=type(exc).__name__ if exc else "UnknownMessage",
                error_message=str(exc) if exc else "not a Celery task message",
                queue=info.get("routing_key") or "",
                headers=dict(message.headers or {}),
            )
            reliability(self.app).dead_letters.add(letter)
        except Exception:
            logger.exception(
                "could not dead-letter a %s message; Celery's log has its body", reason
            )

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler, behind a check that the message is a well-formed protocol-2 task.

        Celery assumes the shape of what it receives: a body that is not ``[args, kwargs, embed]``
        or a header of the wrong type raises inside its consumer, which stops the worker, or
        inside the pool, where no dead letter is written. Such a message is dead-lettered here.
        """
        on_task_received = super().create_task_handler(*args, **kwargs)

        def guarded(message: Any) -> Any:
            error: BaseException
            try:
                if (message.delivery_info or {}).get("routing_key") == GIVEN_UP_QUEUE:
                    dead_letters = reliability(self.app).dead_letters
                    return record_given_up(dead_letters, message, hold=self._hold_given_up)
                check_shape(message, self.app.conf.accept_content)
                if self._held_in_broker(message):
                    return None
                return on_task_received(message)
            except MalformedMessage as exc:
                reason, error = exc.reason, exc
            except self.connection_errors:
                raise  # the broker's trouble, not the message's: Celery reconnects
            except Exception as exc:  # the last line: whatever Celery chokes on, never stop
                reason, error = "invalid", exc
            self._dead_letter_raw(message, reason, error)
            message.reject_log_error(logger, self.connection_errors)
            return None

        return guarded

    def _held_in_broker(self, message: Any) -> bool:
        """On RabbitMQ, whether ``message`` had a Celery ETA still ahead and was moved to its
        queue's delay queue (then acknowledged) instead of being held here until due; Redis's
        transport parks such a message before any worker sees it."""
        headers = message.headers or {}
        if not headers.get("eta") or not delays.is_early(headers):
            return False  # postroom's own early arrivals go back from the task (see tasks.py)
        installed = installation(self.app)
        if installed.settings.broker_is_redis:
            return False
        tag = message.delivery_info.get("consumer_tag")
        queues = {t: q for q, t in self.task_consumer._active_tags.items()}
        if tag not in queues:
            return False
        with self.app.producer_or_acquire() as producer:
            delays.hold_in_broker(producer, message, queues[tag], installed.queue_type)
        message.ack()
        return True

    def _hold_given_up(self, message: Any, headers: dict[str, Any]) -> None:
        """Send a given-up message that could not be recorded to the given-up queue's delay queue,
        under ``headers``, for POSTROOM_RETRY_BACKOFF_MAX; returns once the broker confirmed it."""
        installed = installation(self.app)
        with self.app.producer_or_acquire() as producer:
            delays.hold(
                producer,
                message,
                GIVEN_UP_QUEUE,
                headers=headers,
                due=time() + installed.retry.backoff_max,
                queue_type=installed.queue_type,
            )

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._dead_letter_raw(message, "undecodable", exc)
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter_raw(message, "unknown", None)
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter_raw(message, "unknown", exc)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        # Celery sends refused content types (pickle, anything not JSON) here too.
        reason = "undecodable" if isinstance(exc, ContentDisallowed) else "invalid"
        self._dead_letter_raw(message, reason, exc)
        super().on_invalid_task(body, message, exc)


#: the queue a given-up message died in, while it waits for the dead letters' store (see
#: record_given_up)
GIVEN_UP_IN = "x-postroom-given-up-in"

#: what RabbitMQ adds to a message it dead-letters (and a quorum queue to one it redelivers)
_BROKER_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


def raw_letter(
    message: Any, *, reason: str, error_type: str, error_message: str, queue: str, headers: Any
) -> DeadLetter:
    """The dead letter of a message as it came off the wire, under ``headers``."""
    body, encoding = DeadLetter.raw_body(message.body)
    return DeadLetter(
        reason=reason,
        error_type=error_type,
        error_message=error_message,
        queue=queue,
        exchange=(message.delivery_info or {}).get("exchange") or "",
        task=str(headers.get("task", "")),
        task_id=str(headers.get("id", "")),
        headers=headers,
        body=body,
        body_encoding=encoding,
        content_type=message.content_type or "",
        content_encoding=message.content_encoding or "",
    )


def in_line(letter: DeadLetter, body: Any) -> DeadLetter:
    """A partitioned command the broker gave up on heads its key's line, as one the pipeline
    gave up on does (postroom.parking), when its payload validates (else its key is not known
    for sure, and it stays a letter on its own)."""
    handler = registry.owner_of(letter.task)
    field = None if handler is None else handler.contract.__partition_key__
    if handler is None or field is None or MESSAGE_ID not in letter.headers:
        return letter
    contract = handler.contract
    try:
        _, kwargs, _ = json.loads(body)  # Celery's message protocol 2: [args, kwargs, embed]
        version = int(letter.headers.get(VERSION, contract.__message_version__))
        message = contract.model_validate(upcast(contract, version, dict(kwargs)))
    except (ValueError, TypeError, InvalidMessage):  # pydantic's ValidationError is a ValueError
        return letter
    return replace(letter, owner=handler.owner, partition=str(getattr(message, field)))


def last_death(headers: Mapping[str, Any]) -> tuple[str, str]:
    """The queue a dead-lettered message died in last, and why (RabbitMQ's reason).

    Not its first death (``x-first-death-*``, set once and never changed): a message that waited
    in a delay queue died there first, of its TTL, on its way to the queue that gave up on it.
    RabbitMQ 3.13 and later say it in ``x-last-death-*``; before, the first entry of ``x-death``
    (most recent first) does.
    """
    if headers.get("x-last-death-reason"):
        return str(headers.get("x-last-death-queue") or ""), str(headers["x-last-death-reason"])
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return str(deaths[0].get("queue") or ""), str(deaths[0].get("reason") or "")
    return str(headers.get("x-first-death-queue") or ""), str(
        headers.get("x-first-death-reason") or ""
    )


def record_given_up(
    dead_letters: DeadLetters, message: Any, *, hold: Callable[[Any, dict[str, Any]], None]
) -> None:
    """Dead-letter a message RabbitMQ gave up on (its delivery limit), as one of the queue it
    died in last (see last_death), then acknowledge it. If the dead letter cannot be stored, the
    message waits in the broker and comes back (``hold(message, headers)``, then acknowledged),
    naming its origin in a header of its own since its next death there is its TTL's; if even
    that fails, it is put back at once.

    A message rejected without requeue reaches the given-up queue too (the queue's dead-letter
    exchange takes every death): postroom rejects what it has dead-lettered itself, and another
    consumer's reject dropped the message before the backstop, so it is acknowledged unrecorded.
    """
    headers = dict(message.headers or {})
    if GIVEN_UP_IN in headers:  # back from waiting for the dead letters' store
        origin, why = str(headers.pop(GIVEN_UP_IN)), "delivery_limit"
        headers.pop(delays.DUE, None)
    else:
        origin, why = last_death(headers)
    if why != "delivery_limit":
        logger.debug("dropping a message %s in %r, as before its dead-letter exchange", why, origin)
        message.ack()
        return
    for name in list(headers):  # the broker's bookkeeping: a redriven copy starts afresh
        if name in _BROKER_DEATH_HEADERS:
            del headers[name]
    letter = in_line(
        raw_letter(
            message,
            reason="delivery-limit",
            error_type="DeliveryLimit",
            error_message=f"RabbitMQ gave up on it in {origin!r} ({why}): delivered more often "
            "than its delivery limit (POSTROOM_DELIVERY_LIMIT)",
            queue=origin,
            headers=headers,
        ),
        message.body,
    )
    try:
        dead_letters.add(letter)
    except Exception:
        logger.exception("could not dead-letter a message given up in %r; it waits", origin)
        try:
            hold(message, {**headers, GIVEN_UP_IN: origin})
        except Exception:
            logger.exception("could not hold a message given up in %r; put back", origin)
            message.requeue()
            return
    message.ack()


class MalformedMessage(ValueError):
    """A message Celery would choke on: not a well-formed protocol-2 task."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.reason = reason


_EMBED_LISTS = ("callbacks", "errbacks", "chain")


def check_shape(message: Any, accept: Any) -> None:
    """MalformedMessage unless the message is a task Celery can take (decode errors are its own)."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return  # Celery's own on_unknown_message / protocol-1 path
    _check_headers(headers)
    if message.content_type not in {"application/json", *(accept or ())}:
        raise MalformedMessage("undecodable", f"content type {message.content_type!r} is refused")
    try:
        body = message.decode()
    except Exception:
        return  # Celery dead-letters it as undecodable (on_decode_error)
    if isinstance(body, dict) and ("args" in body or "kwargs" in body):
        return  # a hybrid protocol-1 body: Celery checks it
    _check_body(body)


def _check_headers(headers: dict[str, Any]) -> None:
    if not isinstance(headers["task"], str):
        raise MalformedMessage("unknown", f"the task header is not a string: {headers['task']!r}")
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        raise MalformedMessage("invalid", f"the id header is not a string: {headers.get('id')!r}")
    retries = headers.get("retries", 0)
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
        raise MalformedMessage("invalid", f"the retries header is not an integer: {retries!r}")
    limit = headers.get("timelimit")
    if limit is not None and not (
        isinstance(limit, list | tuple)
        and len(limit) == 2
        and all(v is None or isinstance(v, int | float) for v in limit)
    ):
        raise MalformedMessage("invalid", f"the timelimit header is not [soft, hard]: {limit!r}")


def _check_body(body: Any) -> None:
    if not (isinstance(body, list | tuple) and len(body) == 3):
        raise MalformedMessage("invalid", "the body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        raise MalformedMessage("invalid", f"args is not a list: {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise MalformedMessage("invalid", f"kwargs is not a mapping: {type(kwargs).__name__}")
    if embed is None:
        return
    if not isinstance(embed, dict):
        raise MalformedMessage("invalid", f"embed is not a mapping: {type(embed).__name__}")
    for key in _EMBED_LISTS:
        if embed.get(key) is not None and not isinstance(embed[key], list):
            raise MalformedMessage("invalid", f"embed {key} is not a list")
    if embed.get("chord") is not None and not isinstance(embed["chord"], dict):
        raise MalformedMessage("invalid", "embed chord is not a mapping")
