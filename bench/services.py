"""Contracts and handlers for the soak run and the benchmark, loaded by their workers through
POSTROOM_IMPORTS.

Each soak handler records its effect once per message ID in the same transaction as the inbox mark,
so the counts afterwards tell exactly what was lost (a missing ID) and what was doubled (a count of
2). The benchmark's ``bench_sql`` service keeps its state, inbox and outbox in PostgreSQL (its store
is given in bench/app.py, the app its workers run).
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, insert

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


#: The SQL benchmark's table, in the bench run's own schema (POSTROOM_DATABASE_SCHEMA; created by
#: bench.measure, dropped with the schema). Each system writes its own rows, so a drain's end is
#: seen by counting them.
bench_metadata = MetaData()
bench_rows = Table(
    "bench_rows",
    bench_metadata,
    Column("system", String(16), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("n", Integer, nullable=False),
    Column("written_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


class BenchWrite(Command, service="bench_sql"):
    """Write one row and announce it: the SQL benchmark's unit of work."""

    n: int


class BenchRowWritten(Event, service="bench_sql"):
    n: int


#: subscribes to BenchRowWritten so each publish makes one broker copy, as bare Celery's plain
#: publish does; no worker consumes it while the benchmark runs (bench.measure declares its queue)
BENCH_SQL_AUDIT = "bench_sql_audit"


@handles(BenchWrite)
def bench_write(cmd: BenchWrite, ctx: HandlerContext) -> None:
    """The row, the inbox mark and the outbox entry commit together; the event leaves after."""
    ctx.transaction().execute(
        insert(bench_rows).values(system="postroom", message_id=ctx.message_id, n=cmd.n)
    )
    ctx.publish(BenchRowWritten(n=cmd.n))


@subscribes(BenchRowWritten, pool=BENCH_SQL_AUDIT)
def bench_audit(event: BenchRowWritten, ctx: HandlerContext) -> None:
    """Never run by the benchmark: its pool only holds the copies."""
