"""The assets service's PostgreSQL restarted under load, on both brokers: a clean restart (fast
shutdown, as a service manager or an upgrade does it) and a crash (immediate shutdown, replayed
from the write-ahead log at the next start), while 600 RegisterAsset are handled. Every lost
connection and refused connect is a transient error, retried: one row, one reply and one
delivery per subscriber pool per command, no dead letter, nothing left in an outbox.

The server is a private one of the test's own (tests/private_brokers.py), on its own port and
data directory: the machine's shared PostgreSQL is never restarted."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine

from config.pools import pool_named
from postroom import MessageBus
from postroom.reliability import reliability
from tests.private_brokers import PrivatePostgres, free_port
from tests.reliability.assets_checks import (
    SUBSCRIBERS,
    announced_once,
    asset_id,
    register,
    registered,
    rows,
)
from tests.support import BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]
PORT = free_port()
SETTINGS = {
    "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{PORT}/postgres",
    # a restart refuses connections for a moment: enough attempts, backing off up to a second
    "max_retries": "30",
    "retry_backoff": "0.2",
    "retry_backoff_max": "1",
    "outbox_grace": "1",
    "outbox_sweep": "0.5",
}
N = 600


@pytest.fixture(scope="module", autouse=True)
def postgres() -> Iterator[PrivatePostgres]:
    """Autouse, so it starts before the broker context, which migrates the service's schema."""
    with PrivatePostgres(PORT) as server:
        yield server


@pytest.fixture(scope="module")
def observer(postgres: PrivatePostgres) -> Iterator[Engine]:
    engine = create_engine(postgres.url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_workers(*(pool_named(name) for name in (*SUBSCRIBERS, "assets")))
    return MessageBus(broker.app, source="tests")


def test_a_restart_and_a_crash_of_the_database_under_load_are_retried_with_one_effect_each(
    broker: BrokerContext, bus: MessageBus, postgres: PrivatePostgres, observer: Engine
) -> None:
    before = registered(broker)
    run = uuid.uuid4().hex[:12]
    pending = register(bus, run, N)
    names = {p.message_id: f"crate {run} n{i}" for i, p in enumerate(pending)}
    ids = [asset_id(p) for p in pending]

    def stored() -> int:
        return len(rows(observer, broker, ids))

    wait_for(lambda: stored() >= N // 6, timeout=120, interval=0.02)
    postgres.restart()
    wait_for(lambda: stored() >= N // 2, timeout=120, interval=0.02)
    postgres.crash()
    postgres.start()
    assert stored() < N  # both happened while commands were still being handled

    try:
        wait_for(lambda: stored() == N, timeout=120)
    except AssertionError:
        found = rows(observer, broker, ids)
        lost = [p for p, i in zip(pending, ids, strict=True) if str(i) not in found]
        states = {broker.app.AsyncResult(p.correlation_id).state for p in lost}
        letters = len(reliability(broker.app).dead_letters)
        raise AssertionError(
            f"{len(lost)} of {N} commands have no row (states {states}, {letters} dead letters)"
        ) from None
    found = rows(observer, broker, ids)
    assert sorted(found.values()) == [1] * N  # one row per command
    replies = [p.reply(timeout=60) for p in pending]
    assert [r.status for r in replies] == ["succeeded"] * N
    assert [r.value["asset_id"] for r in replies] == [str(i) for i in ids]
    assert max(r.attempts for r in replies) > 1  # some handlings met the restarts and were retried
    announced_once(
        observer, broker, before, {str(asset_id(p)): names[p.message_id] for p in pending}
    )
    assert len(reliability(broker.app).dead_letters) == 0
