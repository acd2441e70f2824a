"""Test-only services, loaded by test workers through POSTROOM_IMPORTS.

They do nothing useful; they make behaviour observable: every run and every delivery is recorded
in the test's own Redis namespace, so a test can count what actually happened.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from collections.abc import Sequence
from typing import Any, Literal

from celery.signals import task_prerun

from postroom import (
    CircuitBreaker,
    Command,
    Event,
    HandlerContext,
    Query,
    RateLimit,
    Rejected,
    TransientError,
    handles,
    subscribes,
)
from postroom._celery import delays
from postroom.messages import CommandFailed
from postroom.outbox import Entry, Relay
from tasks.state import client, key

SERVICE = "probe"
POOLS = ("pool_a", "pool_b", "pool_c")
#: set in a worker's environment, it counts every delivery its tasks get (see count_deliveries)
COUNT_DELIVERIES = "PROBE_COUNT_DELIVERIES"


def _count_delivery(task_id: str, task: Any, **_: Any) -> None:
    """Counts each delivery of a message's attempt, so a test sees the repeats a broker made (the
    inbox absorbs them): a retry is another attempt, an early arrival sent back is not one."""
    if not delays.is_early(task.request.headers or {}):
        attempt = f"{task_id}|{task.request.retries}"
        client().hincrby(key(SERVICE, "deliveries"), attempt, 1)


if os.environ.get(COUNT_DELIVERIES):
    task_prerun.connect(_count_delivery, weak=False)


class Echo(Command, service=SERVICE):
    text: str


class Flaky(Command, service=SERVICE):
    key: str
    failures: int


class WhatTime(Command, service=SERVICE):
    """Replies with the time its handler ran, to tell when a scheduled command was delivered."""


class Refuse(Command, service=SERVICE):
    reason: str


class Crash(Command, service=SERVICE):
    key: str


class EmitProbe(Command, service=SERVICE):
    key: str


class Count(Command, service=SERVICE):
    """Adds one to its key's counter, in the same transaction as the inbox mark; fails
    transiently on its first ``failures`` runs (so it waits in backoff)."""

    key: str
    pause: float = 0.0
    failures: int = 0


class Linger(Command, service=SERVICE):
    """Records when each run begins; its first run then lasts ``seconds``, later ones end at once."""

    key: str
    seconds: float


class Explode(Command, service=SERVICE):
    """Kills the worker process running it, every time: a poison message."""

    key: str
    how: Literal["exit", "segfault", "sigkill"] = "exit"


#: a partitioned service: its workers run one message at a time, in order per key
ORDERED = "ordered"


class RecordInOrder(Command, service=ORDERED, partition_key="key"):
    """Records each run of (key, seq); fails transiently on its first ``failures`` runs."""

    key: str
    seq: int
    failures: int = 0


class Announce(Command, service=SERVICE):
    """Publishes ProbeHappened, adds one to its key's count (with the inbox mark), then:
    ``then="succeed"``, ``"reject"`` or ``"fail"`` (a bug); ``"die_before_commit"`` kills its
    worker process on the first run; ``"die_before_dispatch"`` lets the first run commit and
    kills the process before the outbox is dispatched."""

    key: str
    then: Literal["succeed", "reject", "fail", "die_before_commit", "die_before_dispatch"]


class ProbeHappened(Event, service=SERVICE):
    key: str
    fail_pool: str | None = None
    fail_times: int = 0
    hang_pool: str | None = None


class CallDownstream(Command, service=SERVICE):
    """Calls a downstream that does not answer (a transient error) while its ``down`` key is
    set; counts its runs while it is down and its effects (with the inbox mark) once it is up."""

    n: int


#: CallDownstream's: a short cool-down, so an outage of a few seconds sees several probes
DOWNSTREAM_BREAKER = CircuitBreaker(failures=3, cooldown=3.0)


@handles(CallDownstream, breaker=DOWNSTREAM_BREAKER)
def call_downstream(cmd: CallDownstream, ctx: HandlerContext) -> dict[str, int]:
    db = client()
    if db.exists(key(SERVICE, "downstream", "down")):
        db.incr(key(SERVICE, "downstream", "runs_while_down"))
        raise TransientError("the downstream does not answer")
    ctx.transaction().incr(key(SERVICE, "downstream", "done"))
    return {"n": cmd.n}


class GetReading(Query, service=SERVICE):
    """Reads a sensor through a downstream that does not answer while its ``readings:down`` key
    is set; each reading it gives is the next of its count, kept as the sensor's last one."""

    sensor: str


#: GetReading's: a cool-down long enough that a test's asks all fall inside it
READING_BREAKER = CircuitBreaker(failures=3, cooldown=6.0)


def last_reading(query: GetReading, ctx: HandlerContext) -> dict[str, Any] | None:
    """GetReading's fallback: the sensor's last reading, shared by every worker (None if none)."""
    found = client().hget(key(SERVICE, "readings"), query.sensor)
    return None if found is None else dict(json.loads(found))


@handles(GetReading, breaker=READING_BREAKER, fallback=last_reading)
def get_reading(query: GetReading, ctx: HandlerContext) -> dict[str, Any]:
    db = client()
    if db.exists(key(SERVICE, "readings", "down")):
        db.incr(key(SERVICE, "readings", "runs_while_down"))
        raise TransientError("the sensor does not answer")
    reading = {"sensor": query.sensor, "n": db.incr(key(SERVICE, "readings", "count"))}
    db.hset(key(SERVICE, "readings"), query.sensor, json.dumps(reading))
    return reading


class DownstreamNoticed(Event, service=SERVICE):
    """Delivered to pool_a, whose handler calls the same downstream, behind a breaker too."""

    n: int


@subscribes(DownstreamNoticed, pool="pool_a", breaker=DOWNSTREAM_BREAKER)
def notice_downstream(event: DownstreamNoticed, ctx: HandlerContext) -> None:
    db = client()
    if db.exists(key(SERVICE, "downstream", "down")):
        db.incr(key(SERVICE, "downstream", "event_runs_while_down"))
        raise TransientError("the downstream does not answer")
    ctx.transaction().incr(key(SERVICE, "downstream", "events_done"))


@handles(Echo)
def echo(cmd: Echo, ctx: HandlerContext) -> dict[str, object]:
    return {"text": cmd.text, "envelope": ctx.envelope.to_headers(), "attempt": ctx.attempt}


class CallVendor(Command, service=SERVICE):
    """Calls a vendor API that allows VENDOR_LIMIT calls across the deployment: records when each
    run began (a list) and how often each ``n`` ran (a hash)."""

    n: int


VENDOR_LIMIT = RateLimit(50, per=1.0)


@handles(CallVendor, rate_limit=VENDOR_LIMIT)
def call_vendor(cmd: CallVendor, ctx: HandlerContext) -> dict[str, int]:
    db = client()
    db.rpush(key(SERVICE, "vendor", "runs"), repr(time.time()))
    db.hincrby(key(SERVICE, "vendor", "by_n"), str(cmd.n), 1)
    return {"n": cmd.n}


class CallOtherVendor(Command, service=SERVICE):
    """Calls another vendor, 5 calls a second, from the same queue as CallVendor."""

    n: int


@handles(CallOtherVendor, rate_limit="5/s")
def call_other_vendor(cmd: CallOtherVendor, ctx: HandlerContext) -> None:
    client().rpush(key(SERVICE, "other_vendor", "runs"), repr(time.time()))


@handles(Flaky)
def flaky(cmd: Flaky, ctx: HandlerContext) -> dict[str, int]:
    runs = client().incr(key(SERVICE, "flaky", cmd.key))
    if runs <= cmd.failures:
        raise TransientError(f"run {runs} fails on purpose")
    return {"runs": runs}


@handles(WhatTime)
def what_time(cmd: WhatTime, ctx: HandlerContext) -> dict[str, float]:
    return {"at": time.time()}


@handles(Refuse)
def refuse(cmd: Refuse, ctx: HandlerContext) -> None:
    client().incr(key(SERVICE, "refused", ctx.correlation_id))
    raise Rejected(cmd.reason)


@handles(Announce)
def announce(cmd: Announce, ctx: HandlerContext) -> dict[str, str]:
    ctx.publish(ProbeHappened(key=cmd.key))
    ctx.transaction().incr(key(SERVICE, "announced", cmd.key))
    if cmd.then == "reject":
        raise Rejected("changed my mind after publishing")
    if cmd.then == "fail":
        raise ValueError("a bug after publishing")
    if cmd.then == "die_before_commit" and _first_time(cmd.key):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"announced": cmd.key}


def _first_time(name: str) -> bool:
    return bool(client().set(key(SERVICE, "first", name), 1, nx=True))


_dispatch = Relay.dispatch


def _dispatch_or_die(self: Relay, store: Any, owner: str, entries: Sequence[Entry]) -> None:
    """Fault injection for the outbox tests: an Announce(then="die_before_dispatch") kills its
    worker process once, after its handling committed and before its outbox is dispatched."""
    doomed = [e for e in entries if e.payload.get("key", "").startswith("die_before_dispatch")]
    if doomed and _first_time(f"dispatch:{doomed[0].payload['key']}"):
        os.kill(os.getpid(), signal.SIGKILL)
    _dispatch(self, store, owner, entries)


Relay.dispatch = _dispatch_or_die  # type: ignore[method-assign]


@handles(RecordInOrder)
def record_in_order(cmd: RecordInOrder, ctx: HandlerContext) -> dict[str, int]:
    db = client()
    runs = db.hincrby(key(ORDERED, cmd.key, "runs"), str(cmd.seq), 1)
    db.rpush(key(ORDERED, cmd.key, "log"), f"{cmd.seq}:{runs}")
    if runs <= cmd.failures:
        raise TransientError(f"seq {cmd.seq} run {runs} fails on purpose")
    return {"seq": cmd.seq, "runs": runs}


@handles(Crash)
def crash(cmd: Crash, ctx: HandlerContext) -> None:
    client().incr(key(SERVICE, "crashed", cmd.key))
    raise ValueError("a bug in the handler")


@handles(EmitProbe)
def emit_probe(cmd: EmitProbe, ctx: HandlerContext) -> str:
    return ctx.publish(ProbeHappened(key=cmd.key))


@handles(Count)
def count(cmd: Count, ctx: HandlerContext) -> dict[str, str]:
    time.sleep(cmd.pause)
    if cmd.failures and client().incr(key(SERVICE, "count-runs", cmd.key)) <= cmd.failures:
        raise TransientError(f"run of {cmd.key} fails on purpose")
    ctx.transaction().incr(key(SERVICE, "count", cmd.key))
    return {"counted": cmd.key}


@handles(Linger)
def linger(cmd: Linger, ctx: HandlerContext) -> dict[str, int]:
    runs = client().rpush(key(SERVICE, "lingered", cmd.key), time.time())
    if runs == 1:
        time.sleep(cmd.seconds)
    return {"runs": runs}


@handles(Explode)
def explode(cmd: Explode, ctx: HandlerContext) -> None:
    client().incr(key(SERVICE, "exploded", cmd.key))
    if cmd.how == "segfault":
        ctypes.string_at(0)
    elif cmd.how == "sigkill":  # as the kernel's OOM killer ends a process that blew its memory
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


@subscribes(CommandFailed, pool="pool_a")
def record_fault(event: CommandFailed, ctx: HandlerContext) -> None:
    fault = {
        "correlation_id": ctx.correlation_id,
        "causation_id": ctx.causation_id,
        **event.payload(),
    }
    ctx.transaction().rpush(key(SERVICE, "faults"), json.dumps(fault))


def _record(pool: str, event: ProbeHappened, ctx: HandlerContext) -> None:
    db = client()
    runs = db.hincrby(key(SERVICE, event.key, "runs"), pool, 1)
    if event.hang_pool == pool and db.set(
        key(SERVICE, event.key, "hung", pool), os.getpid(), nx=True
    ):
        time.sleep(120)  # the test kills this process meanwhile
    if event.fail_pool == pool and runs <= event.fail_times:
        raise TransientError(f"{pool} run {runs} fails on purpose")
    delivery = {
        "message_id": ctx.message_id,
        "correlation_id": ctx.correlation_id,
        "causation_id": ctx.causation_id,
        "attempt": ctx.attempt,
        "at": time.time(),
    }
    ctx.transaction().rpush(key(SERVICE, event.key, "done", pool), json.dumps(delivery))


for _pool in POOLS:
    subscribes(ProbeHappened, pool=_pool)(
        lambda event, ctx, _pool=_pool: _record(_pool, event, ctx)
    )


# Event log and replay (tests/integration/test_event_log.py).
#: a pool that exists in code only until `postroom events replay --pool pool_new` declares its queue
NEW_POOL = "pool_new"


class ProbeLogged(Event, service=SERVICE):
    """An event no pool subscribes to: logged all the same, and never replayed into a pool."""

    key: str


subscribes(ProbeHappened, pool=NEW_POOL)(lambda event, ctx: _record(NEW_POOL, event, ctx))
