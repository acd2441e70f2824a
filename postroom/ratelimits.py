"""A rate limit per handler: at most ``limit`` runs every ``per`` seconds, across every worker.

A vendor API that allows 50 calls a second allows them to the whole deployment, not to each
process: the limit's state lives in the state Redis, keyed per handler (``<owner>:<message
type>``), and one script hands out its slots, ``per / limit`` seconds apart (a "next free slot"
scheduler, as GCRA, with no burst: runs are spaced evenly, as Celery's own ``rate_limit``
spaces a worker's). A message over the limit is not dropped, dead-lettered or run early:

- Its slot is **reserved**, and the message goes back to the broker until then (the path of a
  scheduled message, postroom._celery.delays), carrying the reservation in the
  ``x-postroom-slot`` header; back at its slot, it runs without asking again. Asking again on
  return would send a backlog to the back of the line over and over (a thundering herd of held
  messages, each held again); a reservation is spent once (the script removes it), so a
  redelivered copy asks anew instead of running in the same slot, and one whose message never
  comes back (its worker died while sending it) only wastes its own slot: the next free slot is
  never earlier than now, so nothing leaks past the slots already handed out. A held message
  takes the broker's slot path (postroom._celery.delays): on time, and on Redis to the head
  of its queue.
- The next slot, if it is less than one interval and ``WAIT_IN_PLACE`` away, is **waited for in
  place**: the broker's delay path is not that precise (the Redis promoter sleeps up to half a
  second when nothing else is parked; RabbitMQ's shortest delay level is 100 ms), so a trip
  through it would make the run later, not more exact. Only one slot lies that close, so at
  most one message per limit waits in a worker at a time, the pool's other messages go on; a
  longer wait in place would let a backlog hold every process of the pool (each waiting for
  the slot after the others'), and nothing would reach the broker.
- A **partitioned** message always waits in place for its slot: sent back to its queue it would
  lose its place in its partition. The wait is short: a partition has one message in flight, so
  at most one interval per busy partition of the handler.

Slots passed while their messages were late (queued behind a burst of new messages, or all
workers down) are lost, not made up for: the script also keeps when the latest run began, and a
run begins at least one interval after it (less ``AHEAD``, so that jitter costs nothing). A
message back late runs at once if that leaves room, else waits in place as a new message would
(less than one interval), else asks anew: waiting longer, a pool's processes would all end up
waiting in place, behind a queue of late returns. So a backlog whose slots passed never runs
all at once. A reservation is kept ``LATE`` seconds past its slot; one that an open breaker or
a retry sends back is dropped, and the message asks anew. The harness keeps the state in
memory, on its fake clock. The pipeline's step is postroom.pipeline.ratelimit.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import redis

from postroom.errors import ContractError

#: the header a held message carries its reservation in, outside the signed ``postroom.*`` envelope
RESERVATION = "x-postroom-slot"
#: a slot this close (seconds) is waited for in the worker rather than through the broker
WAIT_IN_PLACE = 0.1
#: seconds past its slot that a reservation is kept for its message
LATE = 60.0
#: seconds a run may begin ahead of even spacing, so that a broker's or a busy machine's jitter
#: neither delays the next run nor sends it back: a window of ``per`` seconds sees at most
#: ``limit`` + 1 runs begin (the + 1 at its two edges), and AHEAD's worth more (at 50 a second,
#: 2.5); at most one interval, so that a slow limit keeps its spacing
AHEAD = 0.05

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` runs of a handler every ``per`` seconds, across the deployment.

    A typed declaration, checked when the handler is declared (``RateLimit(50, per=1.0)``); a
    Celery-style string (``"50/s"``, ``"100/m"``, ``"1000/h"``) reads the same, for Celery users
    who know them (``RateLimit.parse``). Unlike Celery's ``rate_limit``, which each worker
    process enforces on its own, this one is shared by every worker of every machine."""

    limit: int
    per: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.limit, int) and self.limit > 0 and self.per > 0):
            raise ContractError(
                f"a rate limit is a number of runs > 0 per seconds > 0, not {self.limit!r} per "
                f"{self.per!r}: RateLimit(50, per=1.0), or '50/s'"
            )

    @property
    def interval(self) -> float:
        """Seconds between two slots."""
        return self.per / self.limit

    @classmethod
    def parse(cls, value: RateLimit | str) -> RateLimit:
        """A declaration as given to ``@handles(rate_limit=...)``: a RateLimit, or ``"50/s"``."""
        if isinstance(value, RateLimit):
            return value
        found = re.fullmatch(r"\s*(\d+)\s*/\s*([smh])\s*", str(value))
        if found is None:
            raise ContractError(
                f"cannot read the rate limit {value!r}: write '50/s', '100/m' or '1000/h', "
                "or RateLimit(50, per=1.0)"
            )
        return cls(int(found[1]), _UNITS[found[2]])


@dataclass(frozen=True)
class Slot:
    """What a message gets from its limit: run after ``wait`` seconds (0: now), in place, or,
    with a ``token``, be held that long in the broker and run on its return."""

    wait: float = 0.0
    token: str = ""


class RateLimitStore(Protocol):
    """Where rate limits are kept: Redis for workers, memory for the harness."""

    def take(
        self, name: str, now: float, interval: float, carried: str, in_place: float
    ) -> Slot: ...

    def backlog(self, name: str, now: float) -> float:
        """Seconds until a limit's next free slot: what a message arriving now would wait."""
        ...


def limit_name(owner: str, message_type: str) -> str:
    return f"{owner}:{message_type}"


class MemoryRateLimits:
    """Rate limits in this process (the harness's), with the same rules as Redis's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}  # the next free slot
        self._ran: dict[str, float] = {}  # one interval after the latest run
        self._reserved: dict[str, dict[str, float]] = {}

    def take(self, name: str, now: float, interval: float, carried: str, in_place: float) -> Slot:
        with self._lock:
            reserved = self._reserved.setdefault(name, {})
            for token in [t for t, slot in reserved.items() if slot < now - LATE]:
                del reserved[token]
            ran = self._ran.get(name, 0.0)
            earliest = ran - min(AHEAD, interval)
            if carried and reserved.pop(carried, None) is not None:
                at = max(now, earliest)
                if at - now <= in_place:
                    self._ran[name] = max(ran, at) + interval
                    return Slot(at - now)
            slot = max(now, self._next.get(name, 0.0), earliest)
            self._next[name] = slot + interval
            if slot - now <= in_place:
                self._ran[name] = max(ran, slot) + interval
                return Slot(slot - now)
            token = uuid.uuid4().hex
            reserved[token] = slot
            return Slot(slot - now, token)

    def backlog(self, name: str, now: float) -> float:
        with self._lock:
            return max(0.0, self._next.get(name, 0.0) - now)


#: KEYS: the limit's hash (``next``: the next free slot; ``ran``: one interval after the latest
#: run), its reservations (a sorted set by slot). ARGV: interval, the carried reservation (or
#: ''), a new token, the longest wait in place, LATE, AHEAD. Returns the wait and the token ('' to
#: run, after the wait, in place). The time is the server's, so that workers on machines whose
#: clocks differ share one schedule.
_TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local interval, in_place, late = tonumber(ARGV[1]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - late)
local state = redis.call('HMGET', KEYS[1], 'next', 'ran')
local nxt, ran = tonumber(state[1] or '0'), tonumber(state[2] or '0')
local earliest = ran - tonumber(ARGV[6])
local function runs(at, after)
  ran = math.max(ran, at) + interval
  redis.call('HSET', KEYS[1], 'next', string.format('%.6f', after), 'ran', string.format('%.6f', ran))
  redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(after, ran) - now) * 1000) + 1000)
  return {string.format('%.6f', at - now), ''}
end
if ARGV[2] ~= '' and redis.call('ZREM', KEYS[2], ARGV[2]) == 1 then
  local at = math.max(now, earliest)
  if at - now <= in_place then return runs(at, nxt) end
end
local slot = math.max(now, nxt, earliest)
if slot - now <= in_place then return runs(slot, slot + interval) end
redis.call('HSET', KEYS[1], 'next', string.format('%.6f', slot + interval))
redis.call('PEXPIRE', KEYS[1], math.ceil((slot + interval - now) * 1000) + 1000)
redis.call('ZADD', KEYS[2], string.format('%.6f', slot), ARGV[3])
redis.call('PEXPIRE', KEYS[2], math.ceil((slot - now + late) * 1000) + 1000)
return {string.format('%.6f', slot - now), ARGV[3]}
"""


class RedisRateLimits:
    """Rate limits in the state Redis, shared by every worker of the deployment."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self._prefix = f"{namespace}:ratelimit:"

    @cached_property
    def _take(self) -> Callable[..., list[str]]:
        return self.client.register_script(_TAKE)

    def take(self, name: str, now: float, interval: float, carried: str, in_place: float) -> Slot:
        """``now`` is not used: the script reads the server's clock."""
        key = self._prefix + name
        wait, token = self._take(
            keys=[key, key + ":held"],
            args=[
                repr(interval),
                carried,
                uuid.uuid4().hex,
                repr(min(in_place, 1e9)),
                repr(LATE),
                repr(min(AHEAD, interval)),
            ],
        )
        return Slot(float(wait), str(token))

    def backlog(self, name: str, now: float) -> float:
        """``now`` is not used: the server's clock is."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hget(self._prefix + name, "next")
            (seconds, micros), next_free = pipe.execute()
        return max(0.0, float(next_free or 0) - float(seconds) - float(micros) / 1e6)
