"""The transactional outbox under crashes, on both brokers: the assets service (its rows, inbox and
outbox in PostgreSQL) registers assets while its workers are killed with -9 or lose their database
connections, and the subscriber pools (search, analytics, notifications; state in Redis) still see
each AssetRegistered exactly once. Nothing is left in an outbox at the end."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
import redis
from sqlalchemy import create_engine, text

from config.pools import pool_named
from postroom import MessageBus, PendingReply
from postroom.reliability import reliability
from postroom.topology import command_queue_name
from tasks.assets import RegisterAsset
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
    # dropped connections are transient failures: a command may be hit more than once in a row
    # (and more than Celery's own default limit of 3 retries: postroom keeps the budget)
    "max_retries": "10",
    "database_url": f"{DATABASE}?application_name={APPLICATION}",
}
ASSETS = pool_named("assets")
SUBSCRIBERS = ("search", "analytics", "notifications")
N = 1000
#: asset IDs derive from the command's message ID (tasks/assets.py)
ASSET_IDS = uuid.UUID("6d0f8a52-2f4e-4d8e-9b1c-3a7f0e6b5c21")

#: the test's own view of PostgreSQL: not named APPLICATION, so never one the test terminates
observer = create_engine(
    DATABASE, pool_pre_ping=True, connect_args={"application_name": "postroom-outbox-observer"}
)


@pytest.fixture(scope="module")
def assets_workers(broker: BrokerContext) -> list[WorkerProcess]:
    """The assets worker (its pool's processes; one worker per pool and host, as node names
    are per pool and RabbitMQ refuses a second one) and one worker per subscriber pool. The
    list holds the assets worker alive now."""
    for name in SUBSCRIBERS:
        broker.start_worker(pool_named(name))
    return [broker.start_worker(ASSETS)]


@pytest.fixture
def bus(broker: BrokerContext, assets_workers: list[WorkerProcess]) -> MessageBus:
    return MessageBus(broker.app, source="tests")


def asset_id(pending: PendingReply) -> uuid.UUID:
    return uuid.uuid5(ASSET_IDS, pending.message_id)


def rows(broker: BrokerContext, ids: Sequence[uuid.UUID]) -> dict[str, int]:
    """How many rows of the assets table each of ``ids`` has (absent: none)."""
    query = text(
        f'SELECT asset_id::text, count(*) FROM "{broker.settings.database_schema}".assets '
        "WHERE asset_id = ANY(:ids) GROUP BY asset_id"
    )
    with observer.connect() as conn:
        return {row[0]: row[1] for row in conn.execute(query, {"ids": list(ids)})}


def sql_outbox(broker: BrokerContext) -> int:
    query = f'SELECT count(*) FROM "{broker.settings.database_schema}".postroom_outbox'
    with observer.connect() as conn:
        return int(conn.scalar(text(query)) or 0)


def registered(broker: BrokerContext) -> int:
    return int(broker.state().hget(broker.key("analytics", "counts"), "assets_registered") or 0)


def register(bus: MessageBus, run: str, n: int) -> list[PendingReply]:
    return bus.send_many([RegisterAsset(name=f"crate {run} n{i}") for i in range(n)])


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
        return len(rows(broker, ids))

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

    if broker.kind == "redis":
        wait_for(lambda: stored() == N or _nothing_left(broker), timeout=180)
    else:
        wait_for(lambda: stored() == N, timeout=180)
    found = rows(broker, ids)
    lost = [p for p, i in zip(pending, ids, strict=True) if str(i) not in found]
    if broker.kind == "redis":
        # kombu's Redis consumer pops a message before it records it as unacknowledged: a worker
        # main process killed in between loses that one message, which never began a run (README,
        # Delivery guarantees). Everything else must be accounted for.
        assert len(lost) <= 1, f"{len(lost)} commands lost: {lost[:5]}"
        assert all(_runs(broker, p) == 0 for p in lost)
    else:
        assert lost == []
    kept = [p for p in pending if p not in lost]
    assert sorted(found.values()) == [1] * len(kept)  # one row per command

    replies = [p.reply(timeout=60) for p in kept]
    assert [r.status for r in replies] == ["succeeded"] * len(kept)  # one reply each
    assert [r.value["asset_id"] for r in replies] == [str(asset_id(p)) for p in kept]

    _announced_once(broker, before, {str(asset_id(p)): names[p.message_id] for p in kept})
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
        wait_for(lambda: len(rows(broker, ids)) == count, timeout=120, interval=0.05)
    except AssertionError:
        missing = count - len(rows(broker, ids))
        letters = reliability(broker.app).dead_letters
        raise AssertionError(
            f"{missing} of {count} commands have no row; dead letters: {len(letters)}"
        ) from None
    finally:
        done.set()
        killer.join()
    assert terminated > 0  # connections were ended under the workers' feet

    found = rows(broker, ids)
    assert sorted(found.values()) == [1] * count  # one row per command
    replies = [p.reply(timeout=60) for p in pending]
    assert [r.status for r in replies] == ["succeeded"] * count
    assert [r.value["asset_id"] for r in replies] == [str(i) for i in ids]
    _announced_once(broker, before, {str(asset_id(p)): names[p.message_id] for p in pending})
    assert len(reliability(broker.app).dead_letters) == 0


def _announced_once(broker: BrokerContext, before: int, names: dict[str, str]) -> None:
    """Each asset's AssetRegistered (``names``: asset ID to name) reached every subscriber pool
    once, and no outbox holds anything any more."""
    inbox = broker.app.conf.postroom.reliability.inbox

    def drained() -> bool:
        return (
            registered(broker) - before >= len(names)
            and sql_outbox(broker) == 0
            and inbox.pending() == 0
        )

    try:
        wait_for(drained, timeout=60)
    except AssertionError:
        raise AssertionError(
            f"analytics counted {registered(broker) - before} of {len(names)}; outboxes: "
            f"SQL {sql_outbox(broker)}, Redis {inbox.pending()}"
        ) from None
    time.sleep(3)  # a late second copy (a sweep of an entry already sent) would arrive by now
    assert registered(broker) - before == len(names)  # one delivery per pool per event
    assert sql_outbox(broker) == 0
    assert inbox.pending() == 0

    state = broker.state()
    ids = list(names)
    notes = [state.lrange(broker.key("notifications", "asset", i), 0, -1) for i in ids]
    assert [len(n) for n in notes] == [1] * len(ids)  # one notification per asset
    texts = [json.loads(n[0])["text"] for n in notes]
    assert texts == [f"Asset {names[i]!r} was registered" for i in ids]
    indexed = state.hmget(broker.key("search", "names"), ids)
    assert indexed == [names[i] for i in ids]  # each asset indexed under its name


def _runs(broker: BrokerContext, pending: PendingReply) -> int:
    query = text(
        f'SELECT coalesce(sum(runs), 0) FROM "{broker.settings.database_schema}".postroom_inbox '
        "WHERE owner = 'assets' AND message_id = :id AND outcome IS NULL"
    )
    with observer.connect() as conn:
        return int(conn.scalar(query, {"id": pending.message_id}) or 0)


def _nothing_left(broker: BrokerContext) -> bool:
    """No assets command queued or held unacknowledged on Redis, twice a second apart (one may
    be moving between the two)."""

    def empty() -> bool:
        if broker.queue_size(command_queue_name("assets")):
            return False
        with redis.Redis.from_url(broker.app.conf.broker_url) as client:
            return not client.hlen(f"{broker.namespace}:unacked")

    if not empty():
        return False
    time.sleep(1)
    return empty()


@pytest.fixture(scope="module", autouse=True)
def _observer() -> Iterator[None]:
    yield
    observer.dispose()
