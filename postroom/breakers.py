"""A circuit breaker per handler: a downstream that keeps failing is left alone for a while.

After ``failures`` consecutive failures of one handler (a transient error the Retry step sends
back, or an error it gives up on; a rejection is an answer, not a failure) its breaker opens:
the pool stops running that handler's messages and hands each one back to the broker, which
holds it until the cool-down ends (the same path as a scheduled message, postroom._celery.delays).
A held message is not run and spends no attempt, so an outage neither dead-letters it nor spins
it through its retries. Then one message runs as a probe (half-open): success closes the breaker
and the backlog drains, failure opens it for another cool-down. The pool's other handlers keep
running::

    closed ──failures in a row──> open ──cool-down──> half-open ──probe succeeds──> closed
                                   ^                      │
                                   └────probe fails───────┘

The state lives in the state Redis, keyed per handler (``<owner>:<message type>``) and changed
by one script at a time, so every worker of a pool sees the breaker open at once, and a lease
(a key with a TTL of one cool-down) lets exactly one probe run across all of them; a probe whose
worker died gives way to another once its lease expires. The harness keeps it in memory, on its
fake clock. The pipeline's step is postroom.pipeline.breaker.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal, Protocol

import redis

if TYPE_CHECKING:
    from postroom.registry import Handler

#: seconds a message waits, held, while another one probes the downstream (at most a cool-down)
PROBE_WAIT = 1.0
#: failures in a row that open a breaker declared with ``breaker=True`` and no setting
DEFAULT_FAILURES = 5
#: runs a window must have seen before its failure ratio can open a breaker
MIN_CALLS = 10

Change = Literal["", "opened", "reopened", "closed"]


@dataclass(frozen=True)
class CircuitBreaker:
    """A handler's breaker, as declared on ``@handles`` / ``@subscribes``: a field left None
    takes the setting's value (POSTROOM_BREAKER_FAILURES, _COOLDOWN, _RATIO, _WINDOW).

    It opens after ``failures`` failures in a row, or once a window of ``window`` seconds (a
    fixed one, started by its first run) has seen at least ``min_calls`` runs of which the
    share ``ratio`` or more failed; ``ratio`` 0 leaves the second rule out."""

    failures: int | None = None  # consecutive failures that open it
    cooldown: float | None = None  # seconds it stays open before a probe
    ratio: float | None = None  # failed share of a window's runs that opens it (0: never)
    window: float | None = None  # seconds of that window
    min_calls: int = MIN_CALLS  # runs a window needs before its ratio counts


@dataclass(frozen=True)
class Limits:
    failures: int
    cooldown: float
    ratio: float = 0.0
    window: float = 60.0
    min_calls: int = MIN_CALLS


@dataclass(frozen=True)
class Admission:
    """Whether a message may run now: as a probe of a half-open breaker, or held ``hold`` s
    (at most a cool-down, so a breaker opened by hand for longer and then closed lets its
    backlog in within one)."""

    hold: float | None = None
    probe: bool = False


@dataclass(frozen=True)
class State:
    """One breaker as shown by ``postroom breakers`` and the metrics."""

    name: str  # <owner>:<message type>
    failures: int
    open_until: float  # 0: closed

    def status(self, now: float) -> str:
        if not self.open_until:
            return "closed"
        return "open" if now < self.open_until else "half-open"


class BreakerStore(Protocol):
    """Where breaker state is kept: Redis for workers, memory for the harness."""

    def admit(self, name: str, now: float, limits: Limits) -> Admission: ...

    def record(
        self, name: str, ok: bool, probe: bool, now: float, limits: Limits
    ) -> tuple[Change, int]: ...

    def states(self) -> list[State]: ...

    def force(self, name: str, open_until: float) -> None: ...


def breaker_name(owner: str, message_type: str) -> str:
    return f"{owner}:{message_type}"


class MemoryBreakers:
    """Breaker state in this process (the harness's), with the same rules as Redis's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}
        self._probe_until: dict[str, float] = {}
        self._window: dict[str, tuple[float, int, int]] = {}  # start, runs, failures

    def admit(self, name: str, now: float, limits: Limits) -> Admission:
        with self._lock:
            until = self._open_until.get(name, 0.0)
            if not until:
                return Admission()
            if now < until:
                return Admission(hold=min(until - now, limits.cooldown))
            if self._probe_until.get(name, 0.0) > now:
                return Admission(hold=min(PROBE_WAIT, limits.cooldown))
            self._probe_until[name] = now + limits.cooldown
            return Admission(probe=True)

    def record(
        self, name: str, ok: bool, probe: bool, now: float, limits: Limits
    ) -> tuple[Change, int]:
        with self._lock:
            until = self._open_until.get(name, 0.0)
            failures = self._failures.get(name, 0)
            if probe and until:
                self._probe_until.pop(name, None)
                if ok:
                    self._open_until[name] = 0.0
                    self._failures[name] = 0
                    self._window.pop(name, None)
                    return "closed", failures
                self._open_until[name] = now + limits.cooldown
                return "reopened", failures
            if until:
                return "", failures  # a run begun before it opened
            failures = self._failures[name] = 0 if ok else failures + 1
            failed_share = self._count(name, ok, now, limits)
            if not ok and (failures >= limits.failures or failed_share is not None):
                self._open_until[name] = now + limits.cooldown
                self._window.pop(name, None)
                return "opened", failed_share or failures
            return "", failures

    def _count(self, name: str, ok: bool, now: float, limits: Limits) -> int | None:
        """Counts a run in its window; the window's failures if they now open the breaker."""
        if limits.ratio <= 0:
            return None
        start, runs, failed = self._window.get(name, (now, 0, 0))
        if now - start >= limits.window:
            start, runs, failed = now, 0, 0
        runs, failed = runs + 1, failed + (not ok)
        self._window[name] = (start, runs, failed)
        if runs >= limits.min_calls and failed >= limits.ratio * runs:
            return failed
        return None

    def states(self) -> list[State]:
        with self._lock:
            names = sorted({*self._failures, *self._open_until})
            return [State(n, self._failures.get(n, 0), self._open_until.get(n, 0.0)) for n in names]

    def force(self, name: str, open_until: float) -> None:
        with self._lock:
            self._open_until[name] = open_until
            self._failures[name] = 0
            self._probe_until.pop(name, None)
            self._window.pop(name, None)


#: KEYS: the breaker's hash, its probe lease. ARGV: now, lease (ms), a token.
_ADMIT = """
local opened = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if opened == 0 then return {'run', ''} end
local now = tonumber(ARGV[1])
if now < opened then return {'hold', tostring(opened - now)} end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then return {'probe', ''} end
return {'wait', ''}
"""

#: KEYS: the hash, the lease, the index of names. ARGV: ok, probe, threshold, open until, name,
#: now, ratio, window, min calls. Returns the change and the failures that made it.
_RECORD = """
redis.call('SADD', KEYS[3], ARGV[5])
local opened = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
local ok = ARGV[1] == '1'
if ARGV[2] == '1' and opened > 0 then
  redis.call('DEL', KEYS[2])
  if ok then
    redis.call('HSET', KEYS[1], 'failures', 0, 'open_until', 0, 'runs', 0, 'failed', 0)
    return {'closed', failures}
  end
  redis.call('HSET', KEYS[1], 'open_until', ARGV[4])
  return {'reopened', failures}
end
if opened > 0 then return {'', failures} end
if ok then
  if failures > 0 then redis.call('HSET', KEYS[1], 'failures', 0) end
  failures = 0
else
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
end
local share = false
local ratio = tonumber(ARGV[7])
if ratio > 0 then
  local now = tonumber(ARGV[6])
  local start = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
  if now - start >= tonumber(ARGV[8]) then
    redis.call('HSET', KEYS[1], 'window_start', ARGV[6], 'runs', 0, 'failed', 0)
  end
  local runs = redis.call('HINCRBY', KEYS[1], 'runs', 1)
  local failed = redis.call('HINCRBY', KEYS[1], 'failed', ok and 0 or 1)
  if runs >= tonumber(ARGV[9]) and failed >= ratio * runs then share = failed end
end
if not ok and (failures >= tonumber(ARGV[3]) or share) then
  redis.call('HSET', KEYS[1], 'open_until', ARGV[4], 'window_start', 0, 'runs', 0, 'failed', 0)
  return {'opened', share or failures}
end
return {'', failures}
"""


class RedisBreakers:
    """Breaker state in the state Redis, shared by every worker of the deployment."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self._prefix = f"{namespace}:breaker:"
        self._index = f"{namespace}:breakers"

    @cached_property
    def _admit(self) -> Callable[..., list[str]]:
        return self.client.register_script(_ADMIT)

    @cached_property
    def _record(self) -> Callable[..., list[str | int]]:
        return self.client.register_script(_RECORD)

    def _keys(self, name: str) -> list[str]:
        return [self._prefix + name, self._prefix + name + ":probe"]

    def admit(self, name: str, now: float, limits: Limits) -> Admission:
        lease_ms = max(1, int(limits.cooldown * 1000))
        verdict, hold = self._admit(
            keys=self._keys(name), args=[repr(now), lease_ms, uuid.uuid4().hex]
        )
        if verdict == "run":
            return Admission()
        if verdict == "probe":
            return Admission(probe=True)
        if verdict == "wait":
            return Admission(hold=min(PROBE_WAIT, limits.cooldown))
        return Admission(hold=min(float(hold), limits.cooldown))

    def record(
        self, name: str, ok: bool, probe: bool, now: float, limits: Limits
    ) -> tuple[Change, int]:
        change, failures = self._record(
            keys=[*self._keys(name), self._index],
            args=[
                int(ok),
                int(probe),
                limits.failures,
                repr(now + limits.cooldown),
                name,
                repr(now),
                repr(limits.ratio),
                repr(limits.window),
                limits.min_calls,
            ],
        )
        return str(change), int(failures)  # type: ignore[return-value]

    def states(self) -> list[State]:
        names = sorted(str(n) for n in self.client.smembers(self._index))
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(self._prefix + name, "failures", "open_until")
            found = pipe.execute()
        return [
            State(name, int(failures or 0), float(until or 0))
            for name, (failures, until) in zip(names, found, strict=True)
        ]

    def force(self, name: str, open_until: float) -> None:
        with self.client.pipeline() as pipe:
            pipe.sadd(self._index, name)
            pipe.hset(
                self._prefix + name,
                mapping={"failures": 0, "open_until": open_until, "window_start": 0, "runs": 0},
            )
            pipe.hset(self._prefix + name, "failed", 0)
            pipe.delete(self._prefix + name + ":probe")
            pipe.execute()


@dataclass(frozen=True)
class Breakers:
    """Where a runtime keeps its breakers, and the limits of a handler that declares none."""

    store: BreakerStore
    failures: int = 0  # 0: no breaker for a handler that does not declare one
    cooldown: float = 30.0
    ratio: float = 0.0
    window: float = 60.0

    def limits(self, handler: Handler | None) -> Limits | None:
        """The limits of ``handler``'s breaker, or None if it has none."""
        declared = None if handler is None else handler.breaker
        if handler is None or declared is False:
            return None
        if declared is None and self.failures <= 0 and self.ratio <= 0:
            return None
        if not isinstance(declared, CircuitBreaker):
            declared = CircuitBreaker()
        return Limits(
            failures=declared.failures or self.failures or DEFAULT_FAILURES,
            cooldown=self.cooldown if declared.cooldown is None else declared.cooldown,
            ratio=self.ratio if declared.ratio is None else declared.ratio,
            window=self.window if declared.window is None else declared.window,
            min_calls=declared.min_calls,
        )
