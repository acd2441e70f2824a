"""The transactional outbox under crashes, on both brokers: the assets service (its rows, inbox and
outbox in PostgreSQL) registers assets while its workers are killed with -9 or lose their database
connections, and the subscriber pools (search, analytics, notifications; state in Redis) still see
each AssetRegistered exactly once. Nothing is left in an outbox at the end."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from config.pools import pool_named
from postroom import MessageBus
from postroom.reliability import reliability
from tests.reliability.assets_checks import (
    SUBSCRIBERS,
    announced_once,
    asset_id,
    register,
    registered,
    rows,
)
from tests.support import DATABASE, BrokerContext, WorkerProcess, children, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(360)]
#: the workers' PostgreSQL connections carry this name, so the test can end theirs and no others
APPLICATION = f"postroom-outbox-crashes-{uuid.uuid4().hex[:8]}"
SETTINGS = {
    # Redis gives back a dead worker's messages within the test (RabbitMQ does at once)
    "visibility_timeout": "5",
    "restore_interval": "1",
    # the sweep sends what a dead worker committed after one second, checking every half second
    "outbox_grace": "1",
    "outbox_sweep": "0.5",
    # dropped connections are transient failures: a command may be hit many times in a row (every
    # 0.05-0.3 s; on a loaded machine about half its attempts can be, so eleven in a row happen)
    # and more often than Celery's own default limit of 3 retries (postroom keeps the budget)
    "max_retries": "30",
    "database_url": f"{DATABASE}?application_name={APPLICATION}",
}
ASSETS = pool_named("assets")
N = 1000

#: the test's own view of PostgreSQL: not named APPLICATION, so never one the test terminates
observer = create_engine(
    DATABASE, pool_pre_ping=True, connect_args={"application_name": "postroom-outbox-observer"}
)


@pytest.fixture(scope="module")
def assets_workers(broker: BrokerContext) -> list[WorkerProcess]:
    """The assets worker (its pool's processes; one worker per pool and host, as node names
    are per pool and RabbitMQ refuses a second one) and one worker per subscriber pool. The
    list holds the assets worker alive now."""
    return broker.start_workers(*(pool_named(name) for name in SUBSCRIBERS), ASSETS)[-1:]


@pytest.fixture
def bus(broker: BrokerContext, assets_workers: list[WorkerProcess]) -> MessageBus:
    return MessageBus(broker.app, source="tests")


def test_1000_registrations_with_worker_children_and_a_worker_killed_commit_and_announce_once(
    broker: BrokerContext, bus: MessageBus, assets_workers: list[WorkerProcess]
) -> None:
    before = registered(broker)
    run = uuid.uuid4().hex[:12]
    pending = register(bus, run, N)
    names = {p.message_id: f"crate {run} n{i}" for i, p in enumerate(pending)}
    ids = [asset_id(p) for p in pending]
    shuffle = random.Random(run)

    def stored() -> int:
        return len(rows(observer, broker, ids))

    for threshold in sorted(shuffle.sample(range(50, 500), 4)):  # a child process mid-command
        wait_for(lambda t=threshold: stored() >= t, timeout=120, interval=0.02)
        worker = assets_workers[0]
        try:
            wait_for(lambda w=worker: len(children(w.proc.pid)) == ASSETS.concurrency, timeout=60)
        except AssertionError:
            listed = subprocess.run(
                ["ps", "--ppid", str(worker.proc.pid), "-o", "pid,stat,cmd"],
                capture_output=True, text=True, check=False,
            ).stdout  # fmt: skip
            raise AssertionError(f"worker {worker.proc.pid} children:\n{listed}") from None
        os.kill(shuffle.choice(children(worker.proc.pid)), signal.SIGKILL)
    wait_for(lambda: stored() >= shuffle.randint(550, 650), timeout=120, interval=0.02)
    doomed = assets_workers.pop()
    for pid in [doomed.proc.pid, *children(doomed.proc.pid)]:  # a whole worker, children with it
        os.kill(pid, signal.SIGKILL)
    doomed.proc.wait()
    time.sleep(1)
    assets_workers.append(broker.start_worker(ASSETS))

    try:  # on both brokers a hard kill loses nothing (on Redis: postroom's atomic fetch)
        wait_for(lambda: stored() == N, timeout=180)
    except AssertionError:
        found = rows(observer, broker, ids)
        lost = [p.message_id for p, i in zip(pending, ids, strict=True) if str(i) not in found]
        raise AssertionError(f"{len(lost)} commands have no row: {lost[:5]}") from None
    found = rows(observer, broker, ids)
    assert sorted(found.values()) == [1] * N  # one row per command

    replies = [p.reply(timeout=60) for p in pending]
    assert [r.status for r in replies] == ["succeeded"] * N  # one reply each
    assert [r.value["asset_id"] for r in replies] == [str(asset_id(p)) for p in pending]

    announced_once(
        observer, broker, before, {str(asset_id(p)): names[p.message_id] for p in pending}
    )
    assert len(reliability(broker.app).dead_letters) == 0


def test_dropped_database_connections_during_commits_are_retried_with_one_effect_each(
    broker: BrokerContext, bus: MessageBus
) -> None:
    before = registered(broker)
    run = uuid.uuid4().hex[:12]
    count = 200
    pending = register(bus, run, count)
    names = {p.message_id: f"crate {run} n{i}" for i, p in enumerate(pending)}
    ids = [asset_id(p) for p in pending]
    terminated = 0
    done = threading.Event()

    def terminate() -> None:
        """Ends every PostgreSQL connection of this module's workers, again and again."""
        nonlocal terminated
        query = text(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = 'test' AND application_name = :name AND pid <> pg_backend_pid()"
        )
        while not done.wait(random.uniform(0.05, 0.3)):
            with observer.connect() as conn:
                terminated += int(conn.scalar(query, {"name": APPLICATION}) or 0)

    killer = threading.Thread(target=terminate, name="terminate-connections", daemon=True)
    killer.start()
    try:
        wait_for(lambda: len(rows(observer, broker, ids)) == count, timeout=120, interval=0.05)
    except AssertionError:
        missing = count - len(rows(observer, broker, ids))
        letters = reliability(broker.app).dead_letters
        raise AssertionError(
            f"{missing} of {count} commands have no row; dead letters: {len(letters)}"
        ) from None
    finally:
        done.set()
        killer.join()
    assert terminated > 0  # connections were ended under the workers' feet

    found = rows(observer, broker, ids)
    assert sorted(found.values()) == [1] * count  # one row per command
    replies = [p.reply(timeout=60) for p in pending]
    assert [r.status for r in replies] == ["succeeded"] * count
    assert [r.value["asset_id"] for r in replies] == [str(i) for i in ids]
    announced_once(
        observer, broker, before, {str(asset_id(p)): names[p.message_id] for p in pending}
    )
    assert len(reliability(broker.app).dead_letters) == 0


@pytest.fixture(scope="module", autouse=True)
def _observer() -> Iterator[None]:
    yield
    observer.dispose()
