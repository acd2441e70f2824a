"""The peers postroom is measured against, doing the same work on the same broker.

Bare Celery runs with postroom's delivery and monitoring settings (late acks, JSON only, prefetch
1, the same transport options, task events for Flower) on kombu's stock transport; Dramatiq with
its defaults, plus publisher confirms on RabbitMQ (postroom and Celery always wait for them). Each no-op increments the same kind of Redis counter as postroom's, so a drain ends
visibly and every system pays for the same one write.

For the SQL benchmark, bare Celery's task does what postroom's ``bench_sql`` handler does without
the inbox and outbox: it inserts the same row into the same table with its own SQLAlchemy engine
(built as postroom's SqlStore builds its own: psycopg, connections checked before use, the pool
dropped in a forked child), commits, then publishes one plain message (``send_task``) to a queue
nobody consumes during the run, as postroom's event lands in a pool queue nobody consumes.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import redis
from celery import Celery
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import create_engine, insert

from bench.services import bench_rows, done_counter
from config.settings import settings
from postroom.install import delivery_settings, monitoring_settings

_state = redis.Redis.from_url(settings.state)


def _count(system: str) -> None:
    _state.incr(":".join((settings.namespace, *done_counter(system))))


celery_app = Celery("bare", broker=settings.broker_url, backend=settings.result_backend)
celery_app.conf.update(
    **delivery_settings(settings),
    **monitoring_settings(settings),
    task_default_queue="bench.bare",
    # the same queue type as postroom's (quorum on RabbitMQ by default), so both pay for it
    task_default_queue_type=settings.declared_queue_type,
    task_create_missing_queue_type=settings.declared_queue_type,
)


@celery_app.task(name="bench.bare_noop")
def bare_noop(n: int) -> None:
    _count("celery")


BARE_SQL_QUEUE = "bench.bare_sql"
BARE_EVENTS_QUEUE = "bench.bare_events"
_engine = create_engine(settings.database_url)  # as SqlStore.from_url builds postroom's
_database = _engine.execution_options(schema_translate_map={None: settings.database_schema or None})
os.register_at_fork(after_in_child=lambda: _engine.dispose(close=False))


@celery_app.task(name="bench.bare_write", bind=True, queue=BARE_SQL_QUEUE)
def bare_write(self: Any, n: int) -> None:
    with _database.begin() as conn:
        conn.execute(insert(bench_rows).values(system="celery", message_id=self.request.id, n=n))
    celery_app.send_task("bench.bare_row_written", (n,), queue=BARE_EVENTS_QUEUE)


if settings.broker_is_redis:
    dramatiq_broker: dramatiq.Broker = RedisBroker(
        url=settings.broker_url, namespace=f"{settings.namespace}-dramatiq"
    )
else:
    # publisher confirms, as postroom's and Celery's sends wait for: the same guarantee for all
    dramatiq_broker = RabbitmqBroker(url=settings.broker_url, confirm_delivery=True)
dramatiq.set_broker(dramatiq_broker)


@dramatiq.actor(queue_name="bench_dramatiq", max_retries=0)
def dramatiq_noop(n: int) -> None:
    _count("dramatiq")
