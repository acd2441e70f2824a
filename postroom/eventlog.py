"""The event log: every published event, with its envelope and payload, kept for a retention period.

Queues forget a message once it is acknowledged, so a pool that joins later (or needs a rebuild)
has nothing to start from. The bus appends each event to this log before it publishes it; the
log can be shown, followed, and replayed into one pool's queue (see postroom.replay).

Storage sits behind ``EventStore`` so another store (a database table, Kafka) can be added;
``RedisStreamStore`` keeps the log in a Redis Stream, trimmed by age on every append.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import orjson
import redis

from postroom.headers import MESSAGE_ID, MESSAGE_TYPE, Envelope

#: default retention: 30 days (POSTROOM_EVENT_LOG_RETENTION)
DEFAULT_RETENTION = 30 * 86400
#: entries fetched per round trip when a read walks the log
PAGE = 500


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One event as it was published: its headers (the envelope, and signature) and payload."""

    position: str  # where it sits in the log; opaque, orders events by append time
    message_id: str
    message_type: str
    logged_at: datetime
    headers: dict[str, Any]
    payload: dict[str, Any]

    @property
    def envelope(self) -> Envelope:
        return Envelope.from_headers(self.headers)

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "message_type": self.message_type,
            "logged_at": self.logged_at.isoformat(),
            "position": self.position,
            "headers": self.headers,
            "payload": self.payload,
        }


@runtime_checkable
class EventStore(Protocol):
    """What the bus and ``postroom events`` need from a log store."""

    def append(self, headers: Mapping[str, Any], payload: Mapping[str, Any]) -> bool:
        """Keep one event; False if its message ID is already logged (a handler's re-run)."""
        ...

    def read(
        self,
        since: datetime | None = None,
        event_type: str | None = None,
        limit: int | None = None,
        *,
        until: str | None = None,
    ) -> Iterator[LoggedEvent]:
        """Events in log order, logged at or after ``since``, up to position ``until``."""
        ...

    def get(self, message_id: str) -> LoggedEvent | None:
        """The logged event with this message ID, if it is still kept."""
        ...

    def tail(self, n: int = 10, *, follow: bool = False) -> Iterator[LoggedEvent]:
        """The last ``n`` events, oldest first; with ``follow``, then each new one, forever."""
        ...

    def position(self) -> str:
        """The position of the newest event: everything appended later reads as after it."""
        ...


# Dedupe by message ID, append, trim by age: one round trip, and atomic, so two runs of one
# handler publishing the same event ID cannot both append it. MINID is computed from the
# server's clock, the clock the stream's IDs come from.
_APPEND = """
local existing = redis.call('GET', KEYS[2])
if existing then return {0, existing} end
local now = redis.call('TIME')
local minid = string.format('%.0f', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  - tonumber(ARGV[1]))
local id = redis.call('XADD', KEYS[1], 'MINID', ARGV[2], minid, '*',
  'message_id', ARGV[3], 'message_type', ARGV[4], 'headers', ARGV[5], 'payload', ARGV[6])
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return {1, id}
"""


class RedisStreamStore:
    """The log as one Redis Stream (``<namespace>:eventlog``), plus an index by message ID.

    Each append trims entries older than ``retention`` seconds (``XADD ... MINID``). Trimming is
    approximate by default (``~``): Redis then drops whole internal nodes only, which is cheap,
    so an entry may outlive its retention by up to a node's worth of events (100 by default).
    The index (one key per event, expiring with the retention) makes ``get`` one lookup and
    ``append`` idempotent per message ID. Needs Redis 6.2 or later (MINID).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "postroom",
        retention: float = DEFAULT_RETENTION,
        approximate: bool = True,
    ) -> None:
        if retention <= 0:
            raise ValueError(
                f"the event log's retention must be positive, not {retention!r}: set "
                "POSTROOM_EVENT_LOG_RETENTION to the number of seconds events are kept"
            )
        self.url = url
        self.retention = retention
        self.approximate = approximate
        self.stream = f"{namespace}:eventlog"
        self._index = f"{namespace}:eventlog:id:"

    @cached_property
    def client(self) -> redis.Redis:
        # redis-py notices a fork and reconnects, so one client per process is safe.
        return redis.Redis.from_url(self.url, decode_responses=True)

    @cached_property
    def _append(self) -> Any:
        return self.client.register_script(_APPEND)

    def append(self, headers: Mapping[str, Any], payload: Mapping[str, Any]) -> bool:
        message_id = str(headers[MESSAGE_ID])
        added, _ = self._append(
            keys=[self.stream, self._index + message_id],
            args=[
                max(1, int(self.retention * 1000)),
                "~" if self.approximate else "=",
                message_id,
                str(headers[MESSAGE_TYPE]),
                orjson.dumps(dict(headers)),
                orjson.dumps(dict(payload)),
            ],
        )
        return bool(added)

    def read(
        self,
        since: datetime | None = None,
        event_type: str | None = None,
        limit: int | None = None,
        *,
        until: str | None = None,
    ) -> Iterator[LoggedEvent]:
        start = f"{max(0, int(since.timestamp() * 1000))}-0" if since is not None else "-"
        end = until or "+"
        left = limit
        while left is None or left > 0:
            page = _entries(self.client.xrange(self.stream, start, end, count=PAGE))
            for entry_id, entry in page:
                if event_type is not None and entry["message_type"] != event_type:
                    continue
                yield _decode(entry_id, entry)
                if left is not None:
                    left -= 1
                    if left == 0:
                        return
            if len(page) < PAGE:
                return
            start = "(" + page[-1][0]  # exclusive: the next page starts after this entry

    def get(self, message_id: str) -> LoggedEvent | None:
        entry_id = self.client.get(self._index + message_id)
        if entry_id is None:
            return None
        found = _entries(self.client.xrange(self.stream, entry_id, entry_id))
        return _decode(*found[0]) if found else None

    def tail(
        self, n: int = 10, *, follow: bool = False, block: float = 1.0
    ) -> Iterator[LoggedEvent]:
        newest = _entries(self.client.xrevrange(self.stream, "+", "-", count=max(n, 1)))
        last = newest[0][0] if newest else "0-0"  # follow from here: nothing twice
        for entry_id, entry in reversed(newest[: max(n, 0)]):
            yield _decode(entry_id, entry)
        while follow:
            found: Any = self.client.xread({self.stream: last}, block=int(block * 1000))
            for _, entries in found or ():
                for entry_id, entry in _entries(entries):
                    last = entry_id
                    yield _decode(entry_id, entry)

    def position(self) -> str:
        newest = _entries(self.client.xrevrange(self.stream, "+", "-", count=1))
        return newest[0][0] if newest else "0-0"

    def __len__(self) -> int:
        return int(self.client.xlen(self.stream))

    def __repr__(self) -> str:
        return f"RedisStreamStore(stream={self.stream!r}, retention={self.retention}s)"


def _entries(found: Any) -> list[tuple[str, dict[str, str]]]:
    """Stream entries as (ID, fields), as this client (decode_responses) returns them."""
    return [(str(entry_id), dict(entry)) for entry_id, entry in found or ()]


def _decode(entry_id: str, entry: Mapping[str, str]) -> LoggedEvent:
    millis = int(entry_id.split("-", 1)[0])
    return LoggedEvent(
        position=entry_id,
        message_id=entry["message_id"],
        message_type=entry["message_type"],
        logged_at=datetime.fromtimestamp(millis / 1000, UTC),
        headers=dict(orjson.loads(entry["headers"])),
        payload=dict(orjson.loads(entry["payload"])),
    )


def event_log(app: Any) -> EventStore:
    """The app's event log (a Redis Stream unless ``install`` was given another EventStore)."""
    from postroom.install import installation  # noqa: PLC0415 - install imports this module

    return installation(app).event_log


def parse_since(text: str, now: float | None = None) -> datetime:
    """A point in time from ``2026-11-23T09:00:00+00:00`` (no zone: UTC) or an age: ``90s``,
    ``15m``, ``2h``, ``7d``. ValueError saying both forms otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text[:-1].isdigit() and text[-1:] in units:
        seconds = int(text[:-1]) * units[text[-1]]
        return datetime.fromtimestamp((time.time() if now is None else now) - seconds, UTC)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give an ISO 8601 time (2026-11-23T09:00:00+00:00; without "
            "a zone it is UTC) or an age such as 90s, 15m, 2h or 7d"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
