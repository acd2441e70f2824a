"""The Celery app of this deployment, so ``celery -A config worker ...`` works unchanged."""

from __future__ import annotations

from celery import Celery

import postroom
from config.settings import settings
from tasks.state import database

#: modules holding the reference services' contracts and handlers; POSTROOM_IMPORTS adds more
SERVICE_MODULES = [
    "tasks.assets",
    "tasks.search",
    "tasks.analytics",
    "tasks.notifications",
    "tasks.geofence",
    "tasks.orders",
    "tasks.payments",
    "tasks.vendors",
    "tasks.fulfilment",
    "postroom.webhook_handler",
]


def create_app(settings: postroom.Settings) -> Celery:
    """A Celery app of this deployment for these settings (tests make one per broker).

    The assets and orders services and the fulfilment process keep their state, inbox and
    outbox in PostgreSQL; the others in Redis.
    """
    app = Celery("postroom")
    sql = database(settings)
    stores = {"assets": sql, "orders": sql, "fulfilment": sql}
    postroom.install(app, settings, imports=SERVICE_MODULES, stores=stores)
    return app


app = create_app(settings)
app.set_default()
