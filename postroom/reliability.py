"""What makes at-least-once delivery safe: an inbox per consumer, a poison counter, dead letters.

Delivery is at-least-once, so a consumer sees some messages twice. The inbox remembers, per service
or pool, which message IDs it has handled (and, for a command, the reply it gave), so a repeat is
acknowledged without running the handler again. A handler whose writes go to the same Redis can put
them in one MULTI/EXEC with the inbox mark (``ctx.transaction()``): then a crash between the two
cannot happen. Messages that cannot be handled (undecodable, unknown, invalid, failed for good, or
killing their worker again and again) are dead-lettered with the reason, never dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import redis
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from postroom.headers import uuid7

logger = get_logger(__name__)


def derived_id(parent: str, n: int) -> str:
    """The n-th message ID caused by ``parent``: the same on every run of the same handler.

    A handler that runs twice (its first run crashed after publishing) publishes the same event IDs
    again, so the subscribers' inboxes drop the repeats. The ID is a UUIDv7 whose time is the
    parent's (when the parent is a UUIDv7), so IDs still sort by time.
    """
    digest = int.from_bytes(hashlib.sha256(f"{parent}/{n}".encode()).digest()[:16], "big")
    parent_uuid = uuid.UUID(parent)
    millis = parent_uuid.int >> 80 if parent_uuid.version == 7 else time.time_ns() // 1_000_000
    value = (millis << 80) | (0x7 << 76) | (digest & ((1 << 76) - 1) & ~(0b11 << 62)) | (0b10 << 62)
    return str(uuid.UUID(int=value))


@dataclass(frozen=True)
class Reliability:
    """Where the inbox and the dead letters live (a Redis), and their limits."""

    redis_url: str
    namespace: str = "postroom"
    inbox_retention: int = 7 * 86400
    poison_after: int = 3

    @cached_property
    def client(self) -> redis.Redis:
        # redis-py notices a fork and reconnects, so one client per process is safe.
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    @cached_property
    def inbox(self) -> Inbox:
        # one per process: it holds the registered begin script, used once per message
        return Inbox(self)

    @property
    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self)


def reliability(app: Any) -> Reliability:
    """The app's inbox and dead-letter store; by default in the result backend's Redis."""
    configured = app.conf.get("postroom_reliability")
    if not isinstance(configured, Reliability):
        configured = app.conf.postroom_reliability = Reliability(redis_url=app.conf.result_backend)
    return configured


_BEGIN = """
if KEYS[1] ~= '' then
  local done = redis.call('GET', KEYS[1])
  if done then return {done, 0} end
end
local runs = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {false, runs}
"""


_COMMIT = """
if redis.call('EXISTS', ARGV[1]) == 1 then return 0 end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""


class Inbox:
    """Which message IDs an owner has handled, with the reply a command got."""

    def __init__(self, config: Reliability) -> None:
        self.config = config
        self.client = config.client

    def _key(self, kind: str, owner: str, message_id: str) -> str:
        return f"{self.config.namespace}:inbox:{kind}:{owner}:{message_id}"

    def begin(
        self, owner: str, message_id: str, *, dedupe: bool = True
    ) -> tuple[dict[str, Any] | None, int]:
        """One round trip before a run: what was recorded if the message was handled already
        (only when ``dedupe``), else the number of runs begun so far, this one included.

        Runs are counted so that runs that never end (each killed its worker) can be told apart.
        """
        done_key = self._key("done", owner, message_id) if dedupe else ""
        raw, runs = self._begin(
            keys=[done_key, self._key("runs", owner, message_id)],
            args=[self.config.inbox_retention],
        )
        return (None if raw is None else dict(json.loads(raw))), int(runs)

    def mark(self, pipe: Any, owner: str, message_id: str, outcome: dict[str, Any]) -> None:
        """Queue the mark on ``pipe``, which the caller executes (with the handler's writes)."""
        pipe.set(
            self._key("done", owner, message_id),
            json.dumps(outcome),
            ex=self.config.inbox_retention,
        )
        pipe.delete(self._key("runs", owner, message_id))

    def done_key(self, owner: str, message_id: str) -> str:
        return self._key("done", owner, message_id)

    def commit(self, pipe: Any, owner: str, message_id: str) -> bool:
        """Apply the writes queued on ``pipe`` (a handler's, and the mark) in one atomic step,
        unless the message is marked handled already; False then, and nothing is written.

        Two copies of a message can run at once (a duplicate send, a redelivery) and both pass
        ``begin``; this check, inside the same script as the writes, lets only one commit. One
        round trip, as a MULTI/EXEC would be, where WATCH would cost two more.
        """
        encode: Any = self.client.connection_pool.get_encoder().encode
        args: list[Any] = [self._key("done", owner, message_id)]
        for command, _options in pipe.command_stack:
            args.append(len(command))
            args.extend(encode(part) for part in command)
        pipe.reset()
        return bool(self._commit(args=args))

    @cached_property
    def _commit(self) -> Any:
        return self.client.register_script(_COMMIT)

    def outcome(self, owner: str, message_id: str) -> dict[str, Any] | None:
        """What ``owner`` recorded when it handled the message, if it has."""
        raw = self.client.get(self._key("done", owner, message_id))
        return None if raw is None else dict(json.loads(raw))

    def runs(self, owner: str, message_id: str) -> int:
        """Runs begun and not ended: a run in progress, or runs that died with their worker."""
        return int(self.client.get(self._key("runs", owner, message_id)) or 0)

    @cached_property
    def _begin(self) -> Any:
        return self.client.register_script(_BEGIN)

    def ended(self, owner: str, message_id: str) -> None:
        """The run came to an outcome (or a retry): it was not the message killing its worker."""
        self.client.delete(self._key("runs", owner, message_id))


@dataclass
class DeadLetter:
    """A message that could not be handled, with everything needed to understand and redrive it."""

    reason: str
    error_type: str
    error_message: str
    queue: str
    exchange: str = ""
    owner: str = ""
    task: str = ""
    task_id: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] | None = None
    body: str | None = None  # the raw body, when it could not be decoded (base64 if not text)
    body_encoding: str = "text"
    content_type: str = ""
    content_encoding: str = ""
    traceback: str = ""
    attempts: int = 1
    at: float = field(default_factory=time.time)
    id: str = field(default_factory=uuid7)

    @classmethod
    def raw_body(cls, body: bytes | str) -> tuple[str, str]:
        if isinstance(body, str):
            return body, "text"
        try:
            return body.decode("utf-8"), "text"
        except UnicodeDecodeError:
            return base64.b64encode(body).decode(), "base64"

    def body_bytes(self) -> bytes:
        assert self.body is not None
        return base64.b64decode(self.body) if self.body_encoding == "base64" else self.body.encode()


class DeadLetters:
    """The dead-letter store: one JSON record per letter, indexed by time."""

    def __init__(self, config: Reliability) -> None:
        self.client = config.client
        self._index = f"{config.namespace}:dlq"
        self._prefix = f"{config.namespace}:dlq:letter:"

    def add(self, letter: DeadLetter) -> str:
        with self.client.pipeline() as pipe:
            pipe.set(self._prefix + letter.id, json.dumps(asdict(letter), default=str))
            pipe.zadd(self._index, {letter.id: letter.at})
            pipe.execute()
        return letter.id

    def get(self, letter_id: str) -> DeadLetter | None:
        raw = self.client.get(self._prefix + letter_id)
        return None if raw is None else DeadLetter(**json.loads(raw))

    def ids(self, limit: int | None = None) -> list[str]:
        found = self.client.zrange(self._index, 0, -1 if limit is None else limit - 1)
        return [str(letter_id) for letter_id in found]

    def remove(self, letter_id: str) -> bool:
        with self.client.pipeline() as pipe:
            pipe.delete(self._prefix + letter_id)
            pipe.zrem(self._index, letter_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def purge(self) -> int:
        ids = self.ids()
        for letter_id in ids:
            self.remove(letter_id)
        return len(ids)

    def __len__(self) -> int:
        return int(self.client.zcard(self._index))


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, but a message it cannot even turn into a task is dead-lettered first.

    Celery logs and drops a message it cannot decode (bad JSON, a refused content type such as
    pickle), one of no known format, or one naming an unknown task. postroom keeps each, with the
    reason, before Celery acknowledges it, so the worker keeps running and nothing is lost.
    """

    def _dead_letter_raw(self, message: Any, reason: str, exc: BaseException | None) -> None:
        try:
            headers = dict(message.headers or {})
            body, encoding = DeadLetter.raw_body(message.body)
            info = message.delivery_info or {}
            letter = DeadLetter(
                reason=reason,
                error_type=type(exc).__name__ if exc else "UnknownMessage",
                error_message=str(exc) if exc else "not a Celery task message",
                queue=info.get("routing_key") or "",
                exchange=info.get("exchange") or "",
                task=str(headers.get("task", "")),
                task_id=str(headers.get("id", "")),
                headers=headers,
                body=body,
                body_encoding=encoding,
                content_type=message.content_type or "",
                content_encoding=message.content_encoding or "",
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
                check_shape(message, self.app.conf.accept_content)
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


def redrive(app: Any, letter: DeadLetter) -> None:
    """Send a dead letter back to the queue it came from, with the same headers and message ID."""
    if letter.kwargs is not None:  # it was decoded: send it again as the task it was
        app.send_task(
            letter.task,
            kwargs=letter.kwargs,
            task_id=letter.task_id or None,
            headers=letter.headers,
            queue=letter.queue,
            exchange_type="direct",  # straight to the queue by name, like a retry
            declare=[],
        )
        return
    with app.producer_or_acquire() as producer:  # it never decoded: the same bytes again
        producer.publish(
            letter.body_bytes(),
            exchange=letter.exchange,
            routing_key=letter.queue,
            headers=letter.headers,
            content_type=letter.content_type,
            content_encoding=letter.content_encoding,
        )
