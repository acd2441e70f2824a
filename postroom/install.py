"""The one wiring call: ``postroom.install(app, settings)`` makes a Celery app a postroom app.

Everything at-least-once delivery rests on is set here and nowhere else: late acks, requeue on a
lost worker, prefetch 1, JSON only, durable queues, publisher confirms on RabbitMQ, one visibility
timeout for every process, queues and routes derived from the registry, the guarded consumer, the
partition leases, the heartbeat of the messages a worker holds (Redis), the stores and the
pipeline. The bus refuses an app without it (NotInstalled), rather than falling back to Celery's
defaults (amqp://localhost, no result backend).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import celery
from celery.signals import celeryd_after_setup

from postroom import telemetry
from postroom._celery import transport
from postroom._celery.bootsteps import (
    DelayPromotion,
    MessageHeartbeat,
    OutboxSweep,
    PartitionLeasing,
    consume_unrouted,
)
from postroom.breakers import Breakers, RedisBreakers
from postroom.errors import NotInstalled
from postroom.eventlog import RedisStreamStore
from postroom.outbox import Removals
from postroom.pipeline import Pipeline, Runtime, Step, default_steps
from postroom.ratelimits import RedisRateLimits
from postroom.registry import registry
from postroom.reliability import Reliability, redrive
from postroom.retries import RetryPolicy
from postroom.routing import Router
from postroom.settings import Settings
from postroom.signing import Signer
from postroom.stores import InboxStore
from postroom.topology import UNROUTED_QUEUE, QueueType, declared_queues

_CONF_KEY = "postroom"


@dataclass
class Installation:
    """What ``install`` put on an app: its settings, its stores, its pipeline."""

    app: celery.Celery
    settings: Settings
    steps: Sequence[Step] = ()
    #: owners (services, pools) whose inbox, outbox and writes live in a store of their own
    stores: Mapping[str, InboxStore] = field(default_factory=dict)
    reliability: Reliability = field(init=False)
    event_log: RedisStreamStore = field(init=False)
    signer: Signer | None = field(init=False)
    retry: RetryPolicy = field(init=False)
    #: the type of every queue this deployment declares (see postroom.topology)
    queue_type: QueueType = field(init=False)
    #: deliveries before RabbitMQ dead-letters a message to the given-up queue; 0: none
    delivery_limit: int = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.queue_type = s.declared_queue_type
        self.delivery_limit = s.declared_delivery_limit
        self.reliability = Reliability(
            redis_url=s.state,
            namespace=s.namespace,
            inbox_retention=s.inbox_retention,
            poison_after=s.poison_after,
        )
        self.event_log = RedisStreamStore(
            s.event_log, namespace=s.namespace, retention=s.event_log_retention
        )
        self.signer = Signer(s.signing_key_list) if s.signing_key_list else None
        self.retry = RetryPolicy(
            max_retries=s.max_retries, backoff=s.retry_backoff, backoff_max=s.retry_backoff_max
        )

    @cached_property
    def pipeline(self) -> Pipeline:
        return Pipeline(default_steps(self.steps))

    @cached_property
    def runtime(self) -> Runtime:
        from postroom.bus import MessageBus  # noqa: PLC0415 - the bus asks for the installation

        return Runtime(
            inbox=self.reliability.inbox,
            dead_letters=self.reliability.dead_letters,
            bus=MessageBus(self.app, source="handler"),
            retry=self.retry,
            poison_after=self.reliability.poison_after,
            signer=self.signer,
            stores=dict(self.stores),
            removals=Removals(),
            breakers=self.breakers,
            rate_limits=self.rate_limits,
            redrive=partial(redrive, self.app),
        )

    @cached_property
    def rate_limits(self) -> RedisRateLimits:
        """The handlers' rate limits, in the state Redis, shared by every worker."""
        return RedisRateLimits(self.reliability.client, self.settings.namespace)

    @cached_property
    def breakers(self) -> Breakers:
        """The handlers' circuit breakers, in the state Redis, shared by every worker."""
        s = self.settings
        return Breakers(
            RedisBreakers(self.reliability.client, s.namespace),
            failures=s.breaker_failures,
            cooldown=s.breaker_cooldown,
            ratio=s.breaker_ratio,
            window=s.breaker_window,
        )


def broker_transport_options(settings: Settings) -> dict[str, object]:
    if settings.broker_is_redis:
        return {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,  # the interval alone sets the sweep period
            "global_keyprefix": f"{settings.namespace}:",
        }
    if not settings.broker_heartbeat:
        return {"confirm_publish": True}
    # A publish waits for its confirm with a blocking read, which AMQP heartbeats cannot cut
    # short: a node gone silent without closing its sockets held a sender, or a worker's whole
    # event loop (its own task events are confirmed too), forever. Reads and writes that wait
    # longer than the heartbeat fail as a lost connection instead, so they are retried on the
    # next broker URL.
    return {
        "confirm_publish": True,
        "read_timeout": settings.broker_heartbeat,
        "write_timeout": settings.broker_heartbeat,
    }


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
        # a failover takes longer than Celery's default policy (3 tries in 0.4 s): during a quorum
        # leader election RabbitMQ nacks publishes for a second or more
        "broker_heartbeat": settings.broker_heartbeat,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": settings.publish_retries,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        },
    }


def monitoring_settings(settings: Settings) -> dict[str, object]:
    """What Flower needs to show a command from the moment it is sent; bare Celery is benchmarked
    with them too, since a team watching Celery in Flower pays the same (one event per send)."""
    return {"task_send_sent_event": settings.task_sent_events, "worker_send_task_events": True}


def install(
    app: celery.Celery,
    settings: Settings | None = None,
    *,
    imports: Iterable[str] = (),
    steps: Sequence[Step] = (),
    stores: Mapping[str, InboxStore] | None = None,
) -> Installation:
    """Make ``app`` a postroom app; returns what was installed.

    ``imports`` are the modules holding your contracts and handlers (POSTROOM_IMPORTS adds
    more): they are imported first, since queues and routes derive from the handlers found.
    ``steps`` are your own pipeline steps, run around each handler call (outermost first).
    ``stores`` names the services or pools whose state, inbox and outbox live in a store of
    their own (``postroom.stores.sql.SqlStore``); the others keep theirs in Redis.
    """
    settings = settings if settings is not None else Settings()
    for module in [*imports, *settings.extra_imports]:
        importlib.import_module(module)
    installed = Installation(app, settings, tuple(steps), dict(stores or {}))
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        **delivery_settings(settings),
        **monitoring_settings(settings),
        broker_transport=transport.NAME if settings.broker_is_redis else None,
        result_extended=True,
        task_queues=declared_queues(
            [*registry.services(), *registry.reply_pools()],  # replies arrive on commands.<pool>
            registry.pools(),
            tuple(registry.partitioned_services()),
            settings.partitions,
            queue_type=installed.queue_type,
            delivery_limit=installed.delivery_limit,
        ),
        task_routes=(Router(app, installed.queue_type, installed.delivery_limit),),
        task_default_queue=UNROUTED_QUEUE,
        worker_consumer="postroom._celery.consumer:DeadLetteringConsumer",
        **{_CONF_KEY: installed},
    )
    app.steps["consumer"].add(PartitionLeasing)
    app.steps["consumer"].add(OutboxSweep)
    app.steps["consumer"].add(MessageHeartbeat)
    app.steps["consumer"].add(DelayPromotion)
    celeryd_after_setup.connect(consume_unrouted, weak=False, dispatch_uid="postroom.unrouted")
    telemetry.configure(settings)
    return installed


def installation(app: Any) -> Installation:
    """What ``install`` put on ``app``; NotInstalled, saying what to do, if it was never called."""
    found = app.conf.get(_CONF_KEY)
    if isinstance(found, Installation):
        return found
    raise NotInstalled(
        f"postroom is not installed on the Celery app {app.main or app!r}: call "
        "postroom.install(app, settings) where you create your Celery app, and import that "
        "module before sending (this repository's: `import config`), or pass the app to "
        "MessageBus(app)"
    )
