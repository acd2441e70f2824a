"""One benchmark run, inside a prepared environment (``python -m bench`` starts it; see there).

Every system does the same work on the same broker: enqueue N no-ops one call each, N more in bulk,
then a pool of 2 worker processes drains the 2N (each no-op increments one Redis counter, so the end
is visible), then sequential round trips, timed, then a few more with each process's Redis round
trips counted (bench.roundtrips). Then the same for a command that writes one PostgreSQL row and
publishes one event (postroom's ``bench_sql`` service, bare Celery's ``bench.bare_write``): a
backlog of N drained by 2 worker processes (the end seen by counting the rows), then sequential
round trips. Systems alternate within each round (A B C A' B' A B C A' B' ...), so machine drift
hits all alike.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select

from bench import PARTS, peers
from bench.roundtrips import roundtrips_per_message
from bench.services import (
    BENCH_POOLS,
    BENCH_SQL_AUDIT,
    BenchHappened,
    BenchNoop,
    BenchWrite,
    bench_metadata,
    bench_rows,
    done_counter,
)
from config import app, settings
from config.pools import Pool
from postroom import MessageBus
from postroom.topology import event_queue_name
from tasks.state import database
from workers.launcher import wait_until_ready, worker_argv


@dataclass(frozen=True)
class Size:
    n: int  # enqueued one by one, then as many in bulk; the drain takes both
    roundtrips: int
    events: int  # per fan-out measurement
    growth: tuple[int, int]  # backlogs drained by postroom, small and large


SIZES = {
    "tiny": Size(200, 50, 100, (200, 400)),
    "small": Size(5_000, 2_000, 2_000, (10_000, 40_000)),
    "full": Size(10_000, 2_000, 5_000, (10_000, 200_000)),
}
state = redis.Redis.from_url(settings.state, decode_responses=True)
#: round trips watched through Redis's MONITOR for the round-trip counts, after the timed ones
COUNTED_ROUNDTRIPS = 20


def counter(system: str) -> int:
    return int(state.get(":".join((settings.namespace, *done_counter(system)))) or 0)


class Watch(threading.Thread):
    """Polls a system's counter from before its workers start: when the first and the n-th
    increment happened, so worker start-up time is not counted in a drain."""

    def __init__(
        self,
        system: str,
        target: int,
        timeout: float = 3600,
        count: Callable[[str], int] = counter,
    ) -> None:
        super().__init__(daemon=True)
        self.count = count
        self.system, self.baseline, self.target = system, count(system), target
        self.first: float | None = None
        self.last: float | None = None
        self.deadline = time.monotonic() + timeout
        self.start()

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            done = self.count(self.system) - self.baseline
            now = time.monotonic()
            if done > 0 and self.first is None:
                self.first = now
            if done >= self.target:
                self.last = now
                return
            time.sleep(0.005)

    def seconds(self) -> float:
        """From the first to the n-th increment; TimeoutError if the n-th never came."""
        self.join()
        if self.first is None or self.last is None:
            done = self.count(self.system) - self.baseline
            raise TimeoutError(f"{self.system}: {done}/{self.target} done before the deadline")
        return max(self.last - self.first, 1e-9)


class Workers:
    def __init__(self, argv: list[str], ready: Callable[[], None] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        if ready:
            ready()

    def pause(self) -> None:
        """Freeze the whole pool (its own process group), so a figure taken meanwhile is the
        sender's alone, not shared with the pool's CPU on the same cores."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a frozen process would not act on SIGTERM
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def postroom_pool(name: str, queue: str, concurrency: int, module: str = "config") -> Workers:
    pool = Pool(name, (queue,), concurrency)
    argv = [*worker_argv(pool, settings, module), "-l", "WARNING"]
    return Workers(argv, lambda: wait_until_ready(app, [pool]))


def celery_worker_args(
    queue: str = "bench.bare", node: str = "bare", concurrency: int = 2, pool: str = "prefork"
) -> list[str]:
    """Bare Celery's worker, as the arguments after ``celery``."""
    return ["-A", "bench.peers:celery_app", "worker", "-Q", queue, "-c", str(concurrency),
            "-P", pool, "-n", f"{node}@%h", "--prefetch-multiplier", "1", "-E", "-l", "WARNING",
            "--without-gossip", "--without-mingle"]  # fmt: skip


def celery_pool(queue: str = "bench.bare", node: str = "bare") -> Workers:
    return Workers([sys.executable, "-m", "celery", *celery_worker_args(queue, node)])


def dramatiq_pool() -> Workers:
    argv = [sys.executable, "-m", "dramatiq", "bench.peers", "--processes", "2", "--threads", "1",
            "--queues", "bench_dramatiq"]  # fmt: skip
    return Workers(argv)


@dataclass
class System:
    name: str
    send_one: Callable[[int], Any]
    send_bulk: Callable[[int], Any]
    pool: Callable[[], Workers]
    roundtrip: Callable[[], Any] | None


def systems() -> list[System]:
    bus = MessageBus(app, source="bench")

    def celery_bulk(n: int) -> None:
        with peers.celery_app.producer_or_acquire() as producer:
            for i in range(n):
                peers.bare_noop.apply_async((i,), producer=producer)

    return [
        System(
            "postroom",
            lambda i: bus.send(BenchNoop(n=i)),
            lambda n: bus.send_many([BenchNoop(n=i) for i in range(n)]),
            lambda: postroom_pool("bench", "commands.bench", 2),
            lambda: bus.send(BenchNoop(n=0)).reply(timeout=60),
        ),
        System(
            "celery",
            lambda i: peers.bare_noop.apply_async((i,)),
            celery_bulk,
            celery_pool,
            lambda: peers.bare_noop.apply_async((0,)).get(timeout=60),
        ),
        System(
            "dramatiq",
            peers.dramatiq_noop.send,
            lambda n: [peers.dramatiq_noop.send(i) for i in range(n)],
            dramatiq_pool,
            None,
        ),
    ]


def rows(system: str) -> int:
    """Rows a system has written to the SQL benchmark's table (committed ones)."""
    with database(settings).engine.connect() as conn:
        query = select(func.count()).select_from(bench_rows).where(bench_rows.c.system == system)
        return int(conn.scalar(query) or 0)


@dataclass
class SqlSystem:
    name: str
    send_backlog: Callable[[int], Any]
    pool: Callable[[], Workers]
    roundtrip: Callable[[], Any]


def sql_systems() -> list[SqlSystem]:
    """Write one row and publish one event: postroom through its SQL store (the row, inbox mark
    and outbox entry in one transaction, the event dispatched after commit), bare Celery through
    its own engine and a plain send_task after commit."""
    bus = MessageBus(app, source="bench")

    def celery_backlog(n: int) -> None:
        with peers.celery_app.producer_or_acquire() as producer:
            for i in range(n):
                peers.bare_write.apply_async((i,), producer=producer)

    return [
        SqlSystem(
            "postroom",
            lambda n: bus.send_many([BenchWrite(n=i) for i in range(n)]),
            lambda: postroom_pool("bench_sql", "commands.bench_sql", 2, module="bench.app"),
            lambda: bus.send(BenchWrite(n=0)).reply(timeout=60),
        ),
        SqlSystem(
            "celery",
            celery_backlog,
            lambda: celery_pool(peers.BARE_SQL_QUEUE, "baresql"),
            lambda: peers.bare_write.apply_async((0,)).get(timeout=60),
        ),
    ]


def prepare_sql() -> None:
    """The bench table in the run's own schema (with postroom's tables), and the queue of the pool
    subscribed to the benchmark's event, so each event leaves one copy on the broker as bare
    Celery's plain publish does (Celery declares its queue when it first publishes)."""
    store = database(settings)
    store.migrate()
    bench_metadata.create_all(store.engine)
    queue = app.amqp.queues[event_queue_name(BENCH_SQL_AUDIT)]
    with app.connection_for_write() as conn:
        queue.bind(conn.default_channel).declare()


def broker_memory() -> int:
    """Bytes the broker holds now: Redis used_memory, or RabbitMQ's memory for this vhost's queues."""
    if settings.broker_is_redis:
        with redis.Redis.from_url(settings.broker_url) as client:
            return int(client.info("memory")["used_memory"])
    vhost = settings.broker_url.rsplit("/", 1)[-1] or "/"
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "memory"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(x) for x in out.split() if x.isdigit())


def measure_round(system: System, n: int, roundtrips: int, results: dict[str, list[float]]) -> None:
    def record(metric: str, value: float) -> None:
        results.setdefault(f"{metric}|{system.name}", []).append(value)

    memory_before = broker_memory()
    started = time.perf_counter()
    for i in range(n):
        system.send_one(i)
    record("enqueue_per_s", n / (time.perf_counter() - started))
    started = time.perf_counter()
    system.send_bulk(n)
    record("bulk_enqueue_per_s", n / (time.perf_counter() - started))
    record("broker_bytes_per_message", (broker_memory() - memory_before) / (2 * n))
    watch = Watch(system.name, 2 * n)
    workers = system.pool()
    try:
        record("drain_per_s", (2 * n - 1) / watch.seconds())
        if system.roundtrip is not None:
            p50, p99 = latencies_ms(system.roundtrip, roundtrips)
            record("roundtrip_p50_ms", p50)
            record("roundtrip_p99_ms", p99)
            counted = roundtrips_per_message(
                settings.state, system.roundtrip, COUNTED_ROUNDTRIPS, workers.proc.pid
            )
            for role, trips in counted.items():
                record(f"roundtrip_redis_calls_{role}", trips)
    finally:
        workers.stop()


def latencies_ms(roundtrip: Callable[[], Any], count: int) -> tuple[float, float]:
    """p50 and p99 of ``count`` sequential round trips, in milliseconds."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        roundtrip()
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[
        min(len(latencies) - 1, int(len(latencies) * 0.99))
    ]


def measure_sql_round(
    system: SqlSystem, n: int, roundtrips: int, results: dict[str, list[float]]
) -> None:
    """A backlog of ``n`` row-writing commands drained, then sequential round trips."""

    def record(metric: str, value: float) -> None:
        results.setdefault(f"{metric}|{system.name}", []).append(value)

    system.send_backlog(n)
    watch = Watch(system.name, n, count=rows)
    workers = system.pool()
    try:
        record("sql_drain_per_s", (n - 1) / watch.seconds())
        p50, p99 = latencies_ms(system.roundtrip, roundtrips)
        record("sql_roundtrip_p50_ms", p50)
        record("sql_roundtrip_p99_ms", p99)
    finally:
        workers.stop()


def measure_fanout(events: int, results: dict[str, list[float]]) -> None:
    """What one publish costs the publisher with 1, 3 and 6 pools subscribed, and the deliveries
    per second of the copies they then drain.

    The pools are frozen while the publisher is timed: on 2 shared cores their consuming would
    otherwise slow the publisher in proportion to their number, and its figure would measure
    that, not what a publish costs (the 2026-11-24 run's 5x from 1 to 6 pools was mostly this).
    """
    bus = MessageBus(app, source="bench")
    pools: list[Workers] = []
    try:
        for k in (1, 3, 6):
            pools += [postroom_pool(p, f"events.{p}", 1) for p in BENCH_POOLS[len(pools) : k]]
            watch = Watch("fanout", k * events)
            for workers in pools:
                workers.pause()
            started = time.monotonic()
            for i in range(events):
                bus.publish(BenchHappened(n=i))
            publish_seconds = time.monotonic() - started
            resumed = time.monotonic()
            for workers in pools:
                workers.resume()
            watch.seconds()
            assert watch.last is not None
            delivered = k * events / (watch.last - resumed)
            results.setdefault(f"fanout_deliveries_per_s|{k} pools", []).append(delivered)
            results.setdefault(f"publish_us_per_event|{k} pools", []).append(
                publish_seconds / events * 1e6
            )
    finally:
        for workers in pools:
            workers.stop()


def measure_growth(sizes: tuple[int, int], results: dict[str, list[float]]) -> None:
    """Drain rate with a small and a large backlog, postroom only."""
    bus = MessageBus(app, source="bench")
    for size in sizes:
        for start in range(0, size, 5000):
            bus.send_many([BenchNoop(n=i) for i in range(start, min(size, start + 5000))])
        watch = Watch("postroom", size)
        workers = postroom_pool("bench", "commands.bench", 2)
        try:
            seconds = watch.seconds()
        finally:
            workers.stop()
        results.setdefault(f"drain_per_s_with_backlog|{size}", []).append((size - 1) / seconds)


def main() -> None:
    size, rounds, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    parts = sys.argv[4].split(",") if len(sys.argv) > 4 else PARTS
    chosen = SIZES[size]
    results: dict[str, list[float]] = {}
    if "sql" in parts:
        prepare_sql()
    for _ in range(rounds):
        if "commands" in parts:
            for system in systems():  # A B C, A B C, ...
                measure_round(system, chosen.n, chosen.roundtrips, results)
        if "sql" in parts:
            for sql_system in sql_systems():  # then A' B' (Dramatiq has no SQL peer)
                measure_sql_round(sql_system, chosen.n, chosen.roundtrips, results)
    if "fanout" in parts:
        measure_fanout(chosen.events, results)
    if "growth" in parts:
        measure_growth(chosen.growth, results)
    summary = {
        key: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
        for key, v in results.items()
    }
    out.write_text(json.dumps({"size": size, "rounds": rounds, "results": summary}, indent=2))


if __name__ == "__main__":
    main()
