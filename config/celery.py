"""The Celery app of this deployment, so ``celery -A config worker ...`` works unchanged.

Every setting that at-least-once delivery depends on is here and nowhere else: late acks, requeue on
a lost worker, prefetch 1, JSON only, durable queues, publisher confirms on RabbitMQ, and one
visibility timeout shared by every process.
"""

from __future__ import annotations

import importlib

from celery import Celery
from kombu import Queue

from config.pools import POOLS
from config.settings import settings
from postroom.handlers import RetryPolicy
from postroom.registry import registry
from postroom.topology import command_queue, event_queue, pool_of_event_queue

#: modules whose handlers every worker loads: the reference services, then POSTROOM_IMPORTS
SERVICE_MODULES = [
    "tasks.assets",
    "tasks.search",
    "tasks.analytics",
    "tasks.notifications",
    *settings.extra_imports,
]
for _module in SERVICE_MODULES:  # the registry must be complete before the queues are derived
    importlib.import_module(_module)


def _queues() -> list[Queue]:
    queues: dict[str, Queue] = {}
    for name in (q for pool in POOLS for q in pool.queues):
        pool = pool_of_event_queue(name)
        if pool is not None:
            queues[name] = event_queue(pool, registry.subscriptions(pool))
        else:
            queues[name] = command_queue(name.removeprefix("commands."))
    return list(queues.values())


def _broker_transport_options() -> dict[str, object]:
    if settings.broker_is_redis:
        return {
            "visibility_timeout": settings.visibility_timeout,
            "global_keyprefix": f"{settings.namespace}:",
        }
    return {"confirm_publish": True}


app = Celery("postroom", broker=settings.broker_url, backend=settings.result_backend)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_track_started=True,
    task_send_sent_event=True,
    worker_send_task_events=True,
    result_extended=True,
    result_expires=settings.reply_ttl,
    task_queues=_queues(),
    broker_transport_options=_broker_transport_options(),
    broker_connection_retry_on_startup=True,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    postroom_retry_policy=RetryPolicy(
        max_retries=settings.max_retries,
        backoff=settings.retry_backoff,
        backoff_max=settings.retry_backoff_max,
    ),
)
app.set_default()
