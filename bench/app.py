"""The benchmark's Celery app: this deployment's (config), plus the ``bench_sql`` service's store.

The workers of the SQL benchmark run ``celery -A bench.app worker``: the ``bench_sql`` service keeps
its rows, inbox and outbox in the bench run's own PostgreSQL schema (POSTROOM_DATABASE_URL,
POSTROOM_DATABASE_SCHEMA), the same database and schema as the assets service's.
"""

from __future__ import annotations

from celery import Celery

import postroom
from config.celery import SERVICE_MODULES
from config.settings import settings
from tasks.state import database

app = Celery("postroom")
postroom.install(
    app,
    settings,
    imports=SERVICE_MODULES,
    stores={"assets": database(settings), "bench_sql": database(settings)},
)
