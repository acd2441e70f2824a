"""The peers postroom is measured against, doing the same work on the same broker.

Bare Celery runs with postroom's delivery and monitoring settings (late acks, JSON only, prefetch
1, the same transport options, task events for Flower) on kombu's stock transport; Dramatiq with
its defaults. Each no-op increments the same kind of Redis counter as postroom's, so a drain ends
visibly and every system pays for the same one write.
"""

from __future__ import annotations

import dramatiq
import redis
from celery import Celery
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from bench.services import done_counter
from config.settings import settings
from postroom.install import delivery_settings, monitoring_settings

_state = redis.Redis.from_url(settings.state)


def _count(system: str) -> None:
    _state.incr(":".join((settings.namespace, *done_counter(system))))


celery_app = Celery("bare", broker=settings.broker_url, backend=settings.result_backend)
celery_app.conf.update(
    **delivery_settings(settings), **monitoring_settings(settings), task_default_queue="bench.bare"
)


@celery_app.task(name="bench.bare_noop")
def bare_noop(n: int) -> None:
    _count("celery")


if settings.broker_is_redis:
    dramatiq_broker: dramatiq.Broker = RedisBroker(
        url=settings.broker_url, namespace=f"{settings.namespace}-dramatiq"
    )
else:
    dramatiq_broker = RabbitmqBroker(url=settings.broker_url)
dramatiq.set_broker(dramatiq_broker)


@dramatiq.actor(queue_name="bench_dramatiq", max_retries=0)
def dramatiq_noop(n: int) -> None:
    _count("dramatiq")
