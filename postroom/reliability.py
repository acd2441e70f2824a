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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import redis

from postroom._celery.redispy import take_queued
from postroom.errors import ConcurrentUpdate
from postroom.headers import uuid7
from postroom.instances import Instance
from postroom.outbox import Entry
from postroom.parking import RedisLines
from postroom.stores.redis_instances import RedisInstances


def derived_id(parent: str, n: int | str) -> str:
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
    """The app's inbox and dead-letter store (postroom.install puts them there)."""
    from postroom.install import installation  # noqa: PLC0415 - install imports this module

    return installation(app).reliability


_BEGIN = """
if KEYS[1] ~= '' then
  local done = redis.call('GET', KEYS[1])
  if done then return {done, 0} end
end
local runs = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {false, runs}
"""


#: ARGV: the inbox mark's key, the number of guards, each guard's hash and the version it must
#: still be at (a process instance, postroom.stores.redis_instances), then the queued commands
_COMMIT = """
if redis.call('EXISTS', ARGV[1]) == 1 then return 0 end
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  if (redis.call('HGET', ARGV[i], 'version') or '0') ~= ARGV[i + 1] then return -1 end
  i = i + 2
end
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""


#: outbox entries due before ARGV[1], at most ARGV[3]: each re-scored to ARGV[2] (claimed)
_CLAIM = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local found = {}
for _, member in ipairs(members) do
  redis.call('ZADD', KEYS[1], ARGV[2], member)
  table.insert(found, member)
  table.insert(found, redis.call('HGET', KEYS[2], member) or '')
end
return found
"""


class Inbox:
    """Which message IDs an owner has handled, with the reply a command got."""

    def __init__(self, config: Reliability) -> None:
        self.config = config
        self.client = config.client
        self.processes = RedisInstances(self.client, config.namespace, config.inbox_retention)

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

    def transaction(self) -> Any:
        """A pipeline a handler queues its writes on; applied by ``settle``, never executed."""
        return self.client.pipeline(transaction=False)

    def settle(
        self,
        tx: Any,
        owner: str,
        message_ids: list[str],
        outcome: dict[str, Any],
        outbox: Sequence[Entry] = (),
        *,
        instances: Sequence[Instance] = (),
    ) -> bool:
        """Mark every ID handled, with the writes queued on ``tx`` (if any), the outbox
        entries and the process instances, in one atomic step."""
        tx = self.transaction() if tx is None else tx
        for entry in outbox:
            member = f"{owner}|{entry.message_id}"
            tx.hset(self._outbox, member, entry.to_json())
            tx.zadd(self._outbox_due, {member: entry.at})
        guards = [self.processes.write(tx, instance) for instance in instances]
        for message_id in message_ids:
            self.mark(tx, owner, message_id, outcome)
        return self.commit(tx, owner, message_ids[0], guards)

    def discard(self, tx: Any) -> None:
        if tx is not None:
            tx.reset()

    @property
    def _outbox(self) -> str:
        return f"{self.config.namespace}:outbox"

    @property
    def _outbox_due(self) -> str:
        return f"{self.config.namespace}:outbox:due"

    def delivered(self, owner: str, entry_ids: list[str]) -> None:
        members = [f"{owner}|{entry_id}" for entry_id in entry_ids]
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hdel(self._outbox, *members)
            pipe.zrem(self._outbox_due, *members)
            pipe.execute()

    def claim_stale(self, grace: float, limit: int) -> list[tuple[str, Entry]]:
        now = time.time()
        found = self._claim(keys=[self._outbox_due, self._outbox], args=[now - grace, now, limit])
        claimed = []
        for member, raw in zip(found[0::2], found[1::2], strict=True):
            if raw:  # delivered meanwhile: the hash entry is gone
                claimed.append((str(member).split("|", 1)[0], Entry.from_json(raw)))
        return claimed

    def pending(self) -> int:
        """Outbox entries not dispatched yet, of every owner."""
        return int(self.client.zcard(self._outbox_due))

    @cached_property
    def _claim(self) -> Any:
        return self.client.register_script(_CLAIM)

    def done_key(self, owner: str, message_id: str) -> str:
        return self._key("done", owner, message_id)

    def commit(
        self, pipe: Any, owner: str, message_id: str, guards: Sequence[tuple[str, str]] = ()
    ) -> bool:
        """Apply the writes queued on ``pipe`` (a handler's, and the mark) in one atomic step,
        unless the message is marked handled already; False then, and nothing is written.
        ``guards``: (hash, version) pairs of process instances that must still be at the
        version loaded; ConcurrentUpdate, and nothing is written, if one is not.

        Two copies of a message can run at once (a duplicate send, a redelivery) and both pass
        ``begin``; this check, inside the same script as the writes, lets only one commit. One
        round trip, as a MULTI/EXEC would be, where WATCH would cost two more.
        """
        args: list[Any] = [self._key("done", owner, message_id), len(guards)]
        for guard in guards:
            args.extend(guard)
        for command in take_queued(self.client, pipe):
            args.append(len(command))
            args.extend(command)
        won = int(self._commit(args=args))
        if won < 0:
            raise ConcurrentUpdate(
                f"a process instance of {owner} changed since {message_id} loaded it"
            )
        return bool(won)

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

    def instance(self, process: str, key: str) -> Instance | None:
        return self.processes.get(process, key)

    def instances(self, process: str, *, running: bool = True, limit: int = 100) -> list[Instance]:
        return self.processes.list(process, running=running, limit=limit)

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
    #: a partitioned command's key value: the letter heads that key's line, or waits in it
    #: (reason "parked"; see postroom.parking)
    partition: str | None = None

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


class DeadLetters(RedisLines):
    """The dead-letter store: one JSON record per letter, indexed by time, and the lines of
    partition keys whose messages wait behind one of them (postroom.parking)."""

    def __init__(self, config: Reliability) -> None:
        super().__init__(config.client, config.namespace)

    def add(self, letter: DeadLetter) -> str:
        if letter.partition is not None:
            return self.head(letter)
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
        """Every letter goes, and with them every line: the keys they held flow again."""
        ids = self.ids()
        for letter_id in ids:
            self.remove(letter_id)
        self.unpark_all()
        return len(ids)

    def __len__(self) -> int:
        return int(self.client.zcard(self._index))


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
