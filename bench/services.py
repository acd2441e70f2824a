"""Contracts and handlers for the soak run, loaded by its workers through POSTROOM_IMPORTS.

Each handler records its effect once per message ID in the same transaction as the inbox mark, so
the counts afterwards tell exactly what was lost (a missing ID) and what was doubled (a count of 2).
"""

from __future__ import annotations

from postroom import Command, Event, HandlerContext, handles, subscribes
from tasks.state import key

COMMAND_SERVICES = ("soak_a", "soak_b")
EVENT_POOLS = ("soak_x", "soak_y", "soak_z")


class SoakA(Command, service="soak_a"):
    n: int


class SoakB(Command, service="soak_b"):
    n: int


class SoakHappened(Event, service="soak"):
    n: int


def effects(owner: str) -> tuple[str, ...]:
    """Where an owner's effects are counted, below the namespace: one hash field per message ID."""
    return ("soak", "effects", owner)


@handles(SoakA)
def soak_a(cmd: SoakA, ctx: HandlerContext) -> None:
    ctx.transaction().hincrby(key(*effects("soak_a")), ctx.message_id, 1)


@handles(SoakB)
def soak_b(cmd: SoakB, ctx: HandlerContext) -> None:
    ctx.transaction().hincrby(key(*effects("soak_b")), ctx.message_id, 1)


def _record(pool: str, ctx: HandlerContext) -> None:
    ctx.transaction().hincrby(key(*effects(pool)), ctx.message_id, 1)


for _pool in EVENT_POOLS:
    subscribes(SoakHappened, pool=_pool)(lambda event, ctx, _pool=_pool: _record(_pool, ctx))


class BenchNoop(Command, service="bench"):
    """The benchmark's unit of work: a no-op that counts itself (idempotency on, like any command)."""

    n: int


class BenchHappened(Event, service="bench"):
    n: int


BENCH_POOLS = tuple(f"bench_{i}" for i in range(1, 7))


def done_counter(system: str) -> tuple[str, ...]:
    """The counter every system's no-op handler increments, so the end of a drain can be seen."""
    return ("bench", system, "done")


@handles(BenchNoop)
def bench_noop(cmd: BenchNoop, ctx: HandlerContext) -> None:
    ctx.transaction().incr(key(*done_counter("postroom")))


def _count_delivery(ctx: HandlerContext) -> None:
    ctx.transaction().incr(key(*done_counter("fanout")))


for _pool in BENCH_POOLS:
    subscribes(BenchHappened, pool=_pool)(lambda event, ctx: _count_delivery(ctx))
