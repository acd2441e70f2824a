"""The reference services under postroom.testing: the assets service's state in a PostgreSQL
schema of this module's own, the others' in a Redis DB of the tests' own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

import tasks.state
from postroom.settings import Settings
from postroom.stores.sql import SqlStore
from postroom.testing import Harness
from tests.support import DATABASE

STATE = "redis://127.0.0.1:6379/13"


@pytest.fixture(scope="module")
def assets_schema() -> Iterator[str]:
    """A PostgreSQL schema for this module, migrated once, dropped at the end."""
    name = f"h{uuid.uuid4().hex[:10]}"
    store = tasks.state.database(Settings(database_url=DATABASE, database_schema=name))
    store.migrate()
    yield name
    store.drop_schema()
    store.engine.dispose()
    tasks.state._database.cache_clear()


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch, assets_schema: str) -> Iterator[Harness]:
    """A harness whose handlers keep their state under a namespace (and schema) of their own."""
    namespace = f"h{uuid.uuid4().hex[:10]}"
    settings = Settings(
        state_url=STATE, namespace=namespace, database_url=DATABASE, database_schema=assets_schema
    )
    monkeypatch.setattr(tasks.state, "_settings", lambda: settings)
    tasks.state.client.cache_clear()
    client = tasks.state.client()
    sql: SqlStore = tasks.state.database()
    yield Harness(state=client, stores={"assets": sql, "orders": sql, "fulfilment": sql})
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    tasks.state.client.cache_clear()
