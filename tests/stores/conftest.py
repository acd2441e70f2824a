"""The three InboxStore implementations, each with a place for a handler's writes.

``Subject.write(tx, key, value)`` queues a handler's write on a store's transaction and
``Subject.read(key)`` reads what was committed: a Redis pipeline and key for the Redis and
in-memory stores, a Session and a row of a table of the test's own for the SQL store. Each store
lives in a namespace (Redis DB 13) or a PostgreSQL schema (database ``test``) of its own, removed
at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from sqlalchemy import Column, MetaData, String, Table, insert, select

from postroom.reliability import Reliability
from postroom.stores import InboxStore
from postroom.stores.memory import MemoryInbox
from postroom.stores.sql import SqlStore, inbox, outbox, process
from tests.support import DATABASE

REDIS = "redis://127.0.0.1:6379/13"
STORES = ["memory", "redis", "sql"]

#: where the SQL store's handler writes go, in the test schema
kv = Table(
    "contract_kv", MetaData(), Column("k", String(100), primary_key=True), Column("v", String(100))
)


@dataclass
class Subject:
    kind: str
    store: InboxStore
    write: Callable[[Any, str, str], None]
    read: Callable[[str], str | None]
    #: the same store as another process opens it (None: nothing outlives the process)
    reopen: Callable[[], InboxStore] | None


@pytest.fixture(scope="module")
def sql_store() -> Iterator[SqlStore]:
    store = SqlStore.from_url(DATABASE, f"s{uuid.uuid4().hex[:10]}")
    store.migrate()
    kv.create(store.engine)
    yield store
    store.drop_schema()
    store.engine.dispose()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    with redis.Redis.from_url(REDIS, decode_responses=True) as client:
        yield client


@pytest.fixture(params=STORES)
def subject(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Iterator[Subject]:
    namespace = f"c{uuid.uuid4().hex[:10]}"
    if request.param == "sql":
        store: SqlStore = request.getfixturevalue("sql_store")
        yield Subject("sql", store, _sql_write, _sql_read(store), lambda: _reopened(store))
        with store.engine.begin() as conn:
            for table in (inbox, outbox, process, kv):
                conn.execute(table.delete())
        return

    def write(tx: Any, key: str, value: str) -> None:
        tx.set(f"{namespace}:{key}", value)

    def read(key: str) -> str | None:
        return redis_client.get(f"{namespace}:{key}")  # type: ignore[no-any-return]

    if request.param == "redis":
        config = Reliability(redis_url=REDIS, namespace=namespace)
        yield Subject(
            "redis", config.inbox, write, read, lambda: Reliability(REDIS, namespace).inbox
        )
    else:
        yield Subject("memory", MemoryInbox(redis_client), write, read, None)
    keys = list(redis_client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


def _sql_write(tx: Any, key: str, value: str) -> None:
    tx.execute(insert(kv).values(k=key, v=value))


def _sql_read(store: SqlStore) -> Callable[[str], str | None]:
    def read(key: str) -> str | None:
        with store.engine.connect() as conn:
            return conn.scalar(select(kv.c.v).where(kv.c.k == key))

    return read


def _reopened(store: SqlStore) -> SqlStore:
    return SqlStore.from_url(store.engine.url.render_as_string(hide_password=False), store.schema)
