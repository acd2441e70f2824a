"""What only the SQL store has to prove: its migrations, and a race or a lost connection at
commit time, on a real PostgreSQL (a schema of each test's own, dropped at the end)."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, event, func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import registry
from sqlalchemy.pool import NullPool

import tasks.state
from postroom.outbox import Entry
from postroom.retries import RetryPolicy
from postroom.stores.sql import VERSION_TABLE, SqlStore, inbox
from tests.stores.conftest import kv
from tests.support import DATABASE


@pytest.fixture
def store() -> Iterator[SqlStore]:
    store = SqlStore.from_url(
        DATABASE, f"s{uuid.uuid4().hex[:10]}", migrations=[tasks.state.MIGRATIONS]
    )
    yield store
    store.drop_schema()
    store.engine.dispose()


def _versions(store: SqlStore) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.scalars(text(f'SELECT version_num FROM "{store.schema}".{VERSION_TABLE}')))


def _tables(store: SqlStore) -> set[str]:
    query = "SELECT table_name FROM information_schema.tables WHERE table_schema = :schema"
    with store.engine.connect() as conn:
        return set(conn.scalars(text(query), {"schema": store.schema}))


def test_migrate_creates_the_schema_and_every_table_once_however_often_it_runs(
    store: SqlStore,
) -> None:
    migrations = [threading.Thread(target=store.migrate) for _ in range(3)]
    for thread in migrations:
        thread.start()
    for thread in migrations:
        thread.join(30)
    store.migrate()
    assert _versions(store) == {"postroom_0003", "assets_0001", "orders_0001"}
    assert _tables(store) == {
        VERSION_TABLE, "postroom_inbox", "postroom_outbox", "postroom_process", "assets", "orders",
        "asset_devices",
    }  # fmt: skip


def test_runs_counted_before_the_upgrade_to_one_row_per_message_keep_their_count(
    store: SqlStore,
) -> None:
    store.migrate("postroom_0001")
    runs = f'"{store.schema}".postroom_runs'
    with store.engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {runs} VALUES ('assets', 'm1', 2)"))
    store.migrate()
    assert store.runs("assets", "m1") == 2
    assert store.begin("assets", "m1") == (None, 3)
    assert "postroom_runs" not in _tables(store)


def test_a_handling_costs_postroom_three_statements_besides_the_handlers(store: SqlStore) -> None:
    store.migrate()
    kv.create(store.engine)
    statements: list[str] = []
    for engine in (store.engine.engine, store.autocommit.engine):  # what reaches the driver
        event.listen(engine, "checkout", _record(statements))
    message = str(uuid.uuid4())
    assert store.begin("assets", message) == (None, 1)
    session = store.transaction()
    session.execute(insert(kv).values(k=message, v="1"))  # the handler's
    entry = Entry(str(uuid.uuid4()), "event", "AssetRegistered", {}, None, message, "assets")
    assert store.settle(session, "assets", [message], {"status": "handled"}, [entry]) is True
    store.delivered("assets", [entry.message_id])
    # the run counted; the handler's row; the mark with the outbox row; its removal once sent
    assert [s.split()[0] for s in statements] == ["INSERT", "INSERT", "WITH", "DELETE"]
    assert store.outcome("assets", message) == {"status": "handled"}


def test_only_postroom_bookkeeping_skips_waiting_for_the_disk_and_the_handling_does_not(
    store: SqlStore,
) -> None:
    with store.autocommit.connect() as conn:  # a run's count, the removal of sent entries
        assert conn.scalar(text("SHOW synchronous_commit")) == "off"
    session = store.transaction()  # the handler's writes, the mark and the outbox rows
    assert session.scalar(text("SHOW synchronous_commit")) == "on"
    store.discard(session)
    with store.engine.connect() as conn:  # the service's own connections are left as they were
        assert conn.scalar(text("SHOW synchronous_commit")) == "on"


def _record(statements: list[str]) -> Callable[..., None]:
    """A pool checkout listener: every statement sent through the connection's cursors is
    recorded, whether SQLAlchemy or the store's own compiled statements sent it."""

    class Recording(psycopg.Cursor[Any]):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            statements.append(str(query))
            return super().execute(query, *args, **kwargs)

    def record(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.cursor_factory = Recording

    return record


def test_a_connection_that_died_in_the_pool_fails_one_call_as_transient_then_is_replaced(
    store: SqlStore,
) -> None:
    store.migrate()
    message = str(uuid.uuid4())
    assert store.begin("assets", message) == (None, 1)
    with store.autocommit.connect() as conn:  # the one pooled connection, idle between calls
        pid = conn.scalar(select(func.pg_backend_pid()))
    outsider = create_engine(DATABASE, poolclass=NullPool)
    with outsider.begin() as conn:  # as a restart of the database would
        conn.execute(select(func.pg_terminate_backend(pid)))
    outsider.dispose()
    with pytest.raises(RetryPolicy().retry_on):
        store.begin("assets", message)
    assert store.begin("assets", message) == (None, 2)  # the failed run never counted


def test_a_database_that_refuses_connections_is_a_transient_failure_at_every_step() -> None:
    """As while PostgreSQL restarts: every call the pipeline makes fails as a retryable error,
    so the message is retried rather than failed (or, worse, acknowledged unhandled)."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = SqlStore.from_url(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test", "nowhere")
    message = str(uuid.uuid4())
    transient = RetryPolicy().retry_on
    with pytest.raises(transient):
        down.begin("assets", message)
    with pytest.raises(transient):
        down.settle(None, "assets", [message], {"status": "handled"})
    with pytest.raises(transient):
        down.ended("assets", message)
    with pytest.raises(transient):
        down.delivered("assets", [message])


def test_the_handler_reads_its_own_writes_through_the_session(store: SqlStore) -> None:
    store.migrate()
    kv.create(store.engine)
    session = store.transaction()
    session.execute(insert(kv).values(k="a", v="1"))
    assert session.scalar(select(kv.c.v).where(kv.c.k == "a")) == "1"
    assert store.settle(session, "assets", [str(uuid.uuid4())], {"status": "handled"}) is True
    assert not session.in_transaction()  # closed by settle


def test_a_copy_that_marks_the_message_first_wins_even_mid_commit(store: SqlStore) -> None:
    store.migrate()
    message = str(uuid.uuid4())
    rival = store.transaction()  # a concurrent copy, its mark written, not committed yet
    rival.execute(insert(inbox).values(owner="assets", message_id=message, outcome={"n": 1}))
    results: list[bool] = []
    settling = threading.Thread(
        target=lambda: results.append(store.settle(None, "assets", [message], {"n": 2}))
    )
    settling.start()
    settling.join(0.5)
    assert settling.is_alive()  # waiting on the rival's row
    rival.commit()
    rival.close()
    settling.join(10)
    assert results == [False]
    assert store.outcome("assets", message) == {"n": 1}


class Pair:
    """A row of the test table, as a handler's ORM object."""

    def __init__(self, k: str, v: str) -> None:
        self.k, self.v = k, v


registry().map_imperatively(Pair, kv)


def test_a_handler_row_that_violates_a_constraint_fails_the_commit_and_marks_nothing(
    store: SqlStore,
) -> None:
    store.migrate()
    kv.create(store.engine)
    first = store.transaction()
    first.add(Pair("a", "1"))
    store.settle(first, "assets", [str(uuid.uuid4())], {})
    message = str(uuid.uuid4())
    second = store.transaction()
    second.add(Pair("a", "2"))  # flushed at commit, after the mark: no lost race, a real error
    with pytest.raises(IntegrityError):
        store.settle(second, "assets", [message], {})
    assert store.outcome("assets", message) is None


def test_a_connection_dropped_before_the_commit_is_a_transient_error(store: SqlStore) -> None:
    store.migrate()
    message = str(uuid.uuid4())
    session = store.transaction()
    pid = session.scalar(select(func.pg_backend_pid()))
    with store.engine.begin() as conn:  # the database drops the handler's connection
        conn.execute(select(func.pg_terminate_backend(pid)))
    with pytest.raises(RetryPolicy().retry_on):
        store.settle(session, "assets", [message], {"status": "handled"})
    assert store.outcome("assets", message) is None  # nothing committed; the retry will
    assert store.settle(None, "assets", [message], {"status": "handled"}) is True
