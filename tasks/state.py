"""Where the reference services keep their state: the assets service in PostgreSQL, the others in
a real Redis, each service under its own keys."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from postroom.stores.sql import SqlStore

if TYPE_CHECKING:
    from config.settings import Settings

#: the assets service's own revisions, run with postroom's (``postroom migrate``)
MIGRATIONS = Path(__file__).parent / "migrations"


def _settings() -> Settings:
    # Imported when first used, not at import: ``config`` imports the services, which import this.
    from config.settings import settings  # noqa: PLC0415

    return settings


@cache
def client() -> redis.Redis:
    """One client per process; redis-py's pool notices a fork and reconnects in the child."""
    return redis.Redis.from_url(_settings().state, decode_responses=True)


def key(service: str, *parts: str) -> str:
    return ":".join((_settings().namespace, service, *parts))


def database(settings: Settings | None = None) -> SqlStore:
    """The assets service's PostgreSQL (POSTROOM_DATABASE_URL, POSTROOM_DATABASE_SCHEMA): its
    rows, inbox and outbox. One store, so one connection pool, per process and database."""
    settings = settings or _settings()
    return _database(settings.database_url, settings.database_schema)


@cache
def _database(url: str, schema: str) -> SqlStore:
    return SqlStore.from_url(url, schema, migrations=[MIGRATIONS])
