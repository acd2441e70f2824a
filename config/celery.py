"""The Celery app of this deployment, so ``celery -A config worker ...`` works unchanged.

Every setting that at-least-once delivery depends on is here and nowhere else: late acks, requeue on
a lost worker, prefetch 1, JSON only, durable queues, publisher confirms on RabbitMQ, and one
visibility timeout shared by every process.
"""

from __future__ import annotations

import importlib

from celery import Celery

import postroom.transport
from config import telemetry
from config.settings import Settings, settings
from postroom.eventlog import RedisStreamStore
from postroom.handlers import RetryPolicy
from postroom.partitions import PartitionLeasing
from postroom.registry import registry
from postroom.reliability import Reliability
from postroom.signing import Signer
from postroom.topology import declared_queues

#: modules holding the reference services' contracts and handlers; POSTROOM_IMPORTS adds more
SERVICE_MODULES = [
    "tasks.assets",
    "tasks.search",
    "tasks.analytics",
    "tasks.notifications",
    "tasks.geofence",
]


def broker_transport_options(settings: Settings) -> dict[str, object]:
    if settings.broker_is_redis:
        return {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,  # the interval alone sets the sweep period
            "global_keyprefix": f"{settings.namespace}:",
        }
    return {"confirm_publish": True}


def delivery_settings(settings: Settings) -> dict[str, object]:
    """The Celery settings at-least-once delivery rests on; bare Celery is benchmarked with them too."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "result_expires": settings.reply_ttl,
        # replies under the namespace too, so two deployments sharing a Redis never read each
        # other's reply for a reused correlation ID (an Idempotency-Key, say)
        "result_backend_transport_options": {"global_keyprefix": f"{settings.namespace}:"},
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
    }


def monitoring_settings() -> dict[str, object]:
    """What Flower needs to show a command from the moment it is sent; bare Celery is benchmarked
    with them too, since a team watching Celery in Flower pays the same (one event per send)."""
    return {"task_send_sent_event": True, "worker_send_task_events": True}


def create_app(settings: Settings) -> Celery:
    """A Celery app for these settings, with every handler loaded and every queue declared."""
    for module in [*SERVICE_MODULES, *settings.extra_imports]:
        importlib.import_module(module)  # the registry must be complete before queues are derived
    app = Celery("postroom", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        **delivery_settings(settings),
        **monitoring_settings(),
        broker_transport=postroom.transport.NAME if settings.broker_is_redis else None,
        result_extended=True,
        task_queues=declared_queues(
            registry.services(),
            registry.pools(),
            tuple(registry.partitioned_services()),
            settings.partitions,
        ),
        postroom_partitions=settings.partitions,
        postroom_partition_lease=settings.partition_lease,
        worker_consumer="postroom.reliability:DeadLetteringConsumer",
        postroom_reliability=Reliability(
            redis_url=settings.state,
            namespace=settings.namespace,
            inbox_retention=settings.inbox_retention,
            poison_after=settings.poison_after,
        ),
        postroom_event_log=RedisStreamStore(
            settings.event_log,
            namespace=settings.namespace,
            retention=settings.event_log_retention,
        ),
        postroom_signer=Signer(settings.signing_key_list) if settings.signing_key_list else None,
        postroom_retry_policy=RetryPolicy(
            max_retries=settings.max_retries,
            backoff=settings.retry_backoff,
            backoff_max=settings.retry_backoff_max,
        ),
    )
    app.steps["consumer"].add(PartitionLeasing)
    telemetry.configure(settings)
    return app


app = create_app(settings)
app.set_default()
