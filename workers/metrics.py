"""Prometheus metrics per message type and pool: ``postroom metrics``, one more supervised process.

Flower's /metrics counts Celery events by worker host and task name (``flower_events_total``,
``flower_task_runtime_seconds``). That is most of the raw material, but not what a team running
postroom asks: a rejection and a failure are both ``task-failed`` there, nothing says how many
messages wait in a queue or sit in the dead-letter store, and the pool hides in a task name
(``<event type>@<pool>``) or a host name (``<pool>@<host>``) that every query would have to split.
This exporter listens to the same event stream as Flower and asks the broker and the dead-letter
store at each scrape:

```
  workers ─────── task events ───────────────> handled / rejected / failed / retried, ┐
                                               duration (per message_type, pool)      │
  broker <─────── LLEN or passive declare ───> queue depth (per queue)                ├─> GET /metrics
  dead-letter store <── letters not seen yet > dead letters (per message_type,        │
                                               owner, reason)                         │
  state Redis <── circuit breakers ──────────> breaker open (per message_type, owner) │
              <── rate limits ───────────────> slot wait (per message_type, owner)    ┘
```

Counters start at zero when the exporter starts and count what it saw (Prometheus' ``rate()``
handles the restart). Gauges read the present state, so they are right from the first scrape.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import Celery
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from postroom.breakers import Breakers, breaker_name
from postroom.install import installation
from postroom.ratelimits import RateLimitStore, limit_name
from postroom.registry import registry
from postroom.reliability import DeadLetters, reliability
from postroom.settings import Settings
from workers.deployment import add_server_arguments, load_or_exit, overridden

logger = logging.getLogger("postroom.metrics")

LABELS = ("message_type", "pool")
#: handlers run from milliseconds to minutes (the heartbeat lets them outlast the visibility timeout)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: how many task IDs to remember between a task's arrival and its outcome
REMEMBERED_TASKS = 100_000
UNKNOWN = "unknown"
#: seconds to wait for the event stream before serving /metrics without it
STREAM_WAIT = 30.0


def labels_of(task_name: str, hostname: str) -> tuple[str, str]:
    """(message type, pool) of one delivery.

    A pool's delivery of an event is named ``<event type>@<pool>``; a command's task is named by
    its type alone, and its pool is the worker's, whose node name is ``<pool>@<host>``.
    """
    message_type, _, pool = task_name.partition("@")
    return message_type, pool or hostname.partition("@")[0]


class TaskMetrics:
    """Counts outcomes of deliveries from Celery's task events.

    Only ``task-received`` names the task; its outcome (``task-succeeded``, ``task-failed``,
    ``task-retried``) carries the task ID alone, so the labels are remembered by ID in between.
    A task whose outcome never comes (its worker was killed) is forgotten once
    ``REMEMBERED_TASKS`` newer ones arrived. An outcome of a task received before the exporter
    started is counted under message type ``unknown``.
    """

    def __init__(self, remembered: int = REMEMBERED_TASKS) -> None:
        self.handled = Counter(
            "postroom_messages_handled_total",
            "Deliveries handled to the end: the handler returned (or the inbox knew it done).",
            LABELS,
            registry=None,
        )
        self.rejected = Counter(
            "postroom_messages_rejected_total",
            "Commands refused: the handler raised Rejected or the payload was invalid; not retried.",
            LABELS,
            registry=None,
        )
        self.failed = Counter(
            "postroom_messages_failed_total",
            "Deliveries that failed for good (a bug, or retries ran out; each is dead-lettered), "
            "and queries their open breaker's fallback could not answer.",
            LABELS,
            registry=None,
        )
        self.retried = Counter(
            "postroom_messages_retried_total",
            "Transient failures sent back to the queue for a retry with backoff.",
            LABELS,
            registry=None,
        )
        self.duration = Histogram(
            "postroom_message_duration_seconds",
            "Run time of a handled delivery, as the worker measured it.",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.events = Counter(
            "postroom_exporter_events_total",
            "Celery events received (any kind, heartbeats too): flat while workers run means "
            "the exporter lost the event stream.",
            registry=None,
        )
        self.metrics = (
            self.handled, self.rejected, self.failed, self.retried, self.duration, self.events
        )  # fmt: skip
        self._remembered = remembered
        self._tasks: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def __call__(self, event: dict[str, Any]) -> None:
        """Celery's event receiver calls this, from its own thread, for every event."""
        self.events.inc()
        kind, task_id = event.get("type", ""), str(event.get("uuid", ""))
        if kind == "task-received":
            self._remember(
                task_id, labels_of(str(event.get("name", "")), str(event.get("hostname", "")))
            )
        elif kind == "task-succeeded":
            labels = self._recall(task_id, event, forget=True)
            self.handled.labels(*labels).inc()
            if isinstance(event.get("runtime"), int | float):
                self.duration.labels(*labels).observe(event["runtime"])
        elif kind == "task-failed":
            labels = self._recall(task_id, event, forget=True)
            # A rejection is an expected outcome that Celery records as a failure (see
            # postroom.errors.Unsuccessful); the event carries the exception's repr.
            expected = str(event.get("exception", "")).startswith("RejectedReply(")
            (self.rejected if expected else self.failed).labels(*labels).inc()
        elif kind == "task-retried":
            self.retried.labels(*self._recall(task_id, event, forget=False)).inc()

    def _remember(self, task_id: str, labels: tuple[str, str]) -> None:
        self._tasks[task_id] = labels
        self._tasks.move_to_end(task_id)
        while len(self._tasks) > self._remembered:
            self._tasks.popitem(last=False)

    def _recall(self, task_id: str, event: dict[str, Any], *, forget: bool) -> tuple[str, str]:
        labels = self._tasks.pop(task_id, None) if forget else self._tasks.get(task_id)
        return labels or labels_of(UNKNOWN, str(event.get("hostname", "")))


class QueueDepths(Collector):
    """``postroom_queue_depth{queue}``: messages ready in each queue, asked at each scrape.

    On RabbitMQ, a passive ``queue_declare`` through kombu: the broker answers with the count of
    ready messages; a queue never declared (no pool of it has started yet) counts as empty. On
    Redis, a queue is a list: LLEN through the channel's client, which puts the namespace's key
    prefix in front. (kombu's passive declare would do on Redis too, but it checks that the queue
    exists with EXISTS, which kombu's key-prefixing client leaves unprefixed: under a namespace
    every queue looks absent.) postroom sends without priorities, so each queue is one list.
    Messages a worker holds unacknowledged are not counted on either broker.
    """

    NAME = "postroom_queue_depth"
    DOC = "Messages waiting in a queue (not counting those a worker holds unacknowledged)."

    def __init__(self, app: Celery, queues: Iterable[str]) -> None:
        self._app = app
        self._queues = sorted(queues)
        self._lock = threading.Lock()  # scrapes may come concurrently; one channel serves them
        self._connection: Any = None
        self._channel: Any = None

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.DOC, labels=["queue"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.DOC, labels=["queue"])
        with self._lock:
            try:
                depths = self._depths()
            except Exception as exc:  # the broker is away: this scrape goes without depths
                logger.warning("cannot read queue depths from the broker: %r", exc)
                self._disconnect()
                return []
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        return [family]

    def _depths(self) -> dict[str, int]:
        if self._channel is None:
            self._connection = self._app.connection_for_read()
            self._channel = self._connection.channel()
        if self._connection.transport.driver_type == "redis":
            with self._channel.client.pipeline(transaction=False) as pipe:
                for queue in self._queues:
                    pipe.llen(queue)
                return dict(zip(self._queues, map(int, pipe.execute()), strict=True))
        depths = {}
        for queue in self._queues:
            try:
                depths[queue] = int(self._channel.queue_declare(queue, passive=True).message_count)
            except self._connection.channel_errors:  # NOT_FOUND; py-amqp reopens the channel
                depths[queue] = 0
        return depths

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.collect()  # drop the sockets without talking to a broker that is away
        self._connection = self._channel = None


class DeadLetterCounts(Collector):
    """``postroom_dead_letters{message_type, owner, reason}``: letters in the store, at each scrape.

    A letter never changes once written, so each is read once (when first seen); a scrape then
    costs one read of the index. Letters redriven or purged drop out of the count.
    """

    NAME = "postroom_dead_letters"
    DOC = "Dead letters in the store, waiting to be looked at, redriven or purged."
    LABELS = ("message_type", "owner", "reason")

    def __init__(
        self, store: Callable[[], DeadLetters], known_types: Callable[[str], bool]
    ) -> None:
        self._store = store
        self._known_types = known_types
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, str, str]] = {}

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.DOC, labels=self.LABELS)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.DOC, labels=self.LABELS)
        with self._lock:
            try:
                counts = self._count()
            except redis.RedisError as exc:
                logger.warning("cannot read the dead-letter store: %r", exc)
                return []
        for labels, count in sorted(counts.items()):
            family.add_metric(list(labels), count)
        return [family]

    def _count(self) -> Tally[tuple[str, str, str]]:
        store = self._store()
        seen = {}
        for letter_id in store.ids():
            labels = self._seen.get(letter_id)
            if labels is None:
                letter = store.get(letter_id)
                if letter is None:
                    continue  # redriven or purged since the index was read
                labels = (self._message_type(letter.task), letter.owner, letter.reason)
            seen[letter_id] = labels
        self._seen = seen
        return Tally(seen.values())

    def _message_type(self, task: str) -> str:
        # A letter of reason "unknown" names whatever its sender wrote: one label value per
        # made-up name would grow without bound.
        message_type = task.partition("@")[0]
        return message_type if self._known_types(message_type) else UNKNOWN


class BreakerStates(Collector):
    """``postroom_breaker_open{message_type, owner}``: 1 while a handler's circuit breaker is
    open or half-open (its messages wait in the broker), 0 while it is closed; one series per
    handler that has a breaker, read from the state Redis at each scrape."""

    NAME = "postroom_breaker_open"
    DOC = "1 while a handler's circuit breaker is open or half-open, 0 while it is closed."
    LABELS = ("message_type", "owner")

    def __init__(self, breakers: Callable[[], Breakers]) -> None:
        self._breakers = breakers

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.DOC, labels=self.LABELS)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.DOC, labels=self.LABELS)
        breakers = self._breakers()
        guarded = sorted(
            (h.contract.__message_type__, h.owner)
            for h in registry.handlers()
            if breakers.limits(h) is not None
        )
        if not guarded:
            return [family]
        try:
            states = {s.name: s for s in breakers.store.states()}
        except redis.RedisError as exc:
            logger.warning("cannot read the circuit breakers: %r", exc)
            return []
        now = time.time()
        for message_type, owner in guarded:
            state = states.get(breaker_name(owner, message_type))
            is_open = state is not None and state.status(now) != "closed"
            family.add_metric([message_type, owner], float(is_open))
        return [family]


class RateLimitWaits(Collector):
    """``postroom_rate_limit_wait_seconds{message_type, owner}``: how long a message of a
    rate-limited handler arriving now would wait for its slot (0: under its limit), which is
    how much of a backlog its limit holds in the broker; one series per handler with a limit,
    read from the state Redis at each scrape."""

    NAME = "postroom_rate_limit_wait_seconds"
    DOC = "Seconds a message of a rate-limited handler arriving now would wait for its slot."
    LABELS = ("message_type", "owner")

    def __init__(self, limits: Callable[[], RateLimitStore]) -> None:
        self._limits = limits

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.DOC, labels=self.LABELS)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.DOC, labels=self.LABELS)
        limited = sorted(
            (h.contract.__message_type__, h.owner) for h in registry.handlers() if h.rate_limit
        )
        try:
            store, now = self._limits(), time.time()
            for message_type, owner in limited:
                wait = store.backlog(limit_name(owner, message_type), now)
                family.add_metric([message_type, owner], wait)
        except redis.RedisError as exc:
            logger.warning("cannot read the rate limits: %r", exc)
            return []
        return [family]


class EventStream(threading.Thread):
    """Celery's event stream, consumed as Flower consumes it, reconnecting with backoff."""

    def __init__(self, app: Celery, on_event: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(name="celery-events", daemon=True)
        self._app = app
        self._on_event = on_event
        self._stopping = threading.Event()
        self._receiver: Any = None
        #: set while the receiver's queue is bound: events sent from then on are counted
        self.consuming = threading.Event()

    def run(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            try:
                with self._app.connection_for_read() as connection:
                    self._receiver = self._receiver_class()(
                        connection, handlers={"*": self._on_event}
                    )
                    delay = 1.0
                    # wakeup: every worker sends a heartbeat at once, so it is seen at once
                    self._receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception as exc:
                self.consuming.clear()
                if self._stopping.is_set():
                    break
                logger.warning("lost Celery's event stream (%r); again in %.0f s", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)

    def _receiver_class(self) -> type[Any]:
        consuming = self.consuming

        class Receiver(self._app.events.Receiver):  # type: ignore[misc,name-defined]
            def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
                super().on_consume_ready(*args, **kwargs)
                consuming.set()

        return Receiver

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.should_stop = True  # checked at least once a second
        self.join(timeout)


class Exporter:
    """Every postroom metric of one deployment, in a registry of their own."""

    def __init__(self, app: Celery) -> None:
        self.tasks = TaskMetrics()
        queues = [queue.name for queue in app.amqp.queues.values()]
        self.collectors: tuple[
            Counter | Histogram | QueueDepths | DeadLetterCounts | BreakerStates | RateLimitWaits,
            ...,
        ] = (
            *self.tasks.metrics,
            QueueDepths(app, queues),
            DeadLetterCounts(lambda: reliability(app).dead_letters, lambda t: t in app.tasks),
            BreakerStates(lambda: installation(app).breakers),
            RateLimitWaits(lambda: installation(app).rate_limits),
        )
        self.registry = CollectorRegistry()
        for collector in self.collectors:
            self.registry.register(collector)
        self.stream = EventStream(app, self.tasks)

    def metric_names(self) -> set[str]:
        """The name of every series exposed (``_total``, ``_bucket``, ...), found without a
        scrape, so a dashboard's queries can be checked against them with no broker."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        return {
            family.name + suffix
            for collector in self.collectors
            for family in collector.describe()
            for suffix in suffixes.get(family.type, ("",))
        }


def serve(app: Celery, settings: Settings) -> int:
    """Serve /metrics until SIGTERM or SIGINT; 1 if the address is taken.

    The HTTP server starts once the event stream is consumed (or after ``STREAM_WAIT`` seconds
    without a broker), so that a process that waits for /metrics to answer (``postroom up``, the
    tests) knows that what it sends from then on is counted.
    """
    disable_created_metrics()  # a *_created series per label set doubles the output for nothing
    exporter = Exporter(app)
    exporter.stream.start()
    if not exporter.stream.consuming.wait(STREAM_WAIT):
        logger.warning("no event stream after %.0f s; serving /metrics all the same", STREAM_WAIT)
    try:
        server, _ = start_http_server(
            settings.metrics_port, settings.metrics_address, registry=exporter.registry
        )
    except OSError as exc:
        print(
            f"postroom: cannot serve metrics on {settings.metrics_address}:"
            f"{settings.metrics_port}: {exc}",
            file=sys.stderr,
        )
        return 1
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    print(
        f"postroom: Prometheus metrics at http://{settings.metrics_address}:"
        f"{settings.metrics_port}/metrics",
        flush=True,
    )
    while not stopping.wait(1.0):
        pass
    exporter.stream.stop()
    server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``postroom metrics``: serve /metrics on --host:--port (POSTROOM_METRICS_ADDRESS, _PORT)."""
    parser = argparse.ArgumentParser(prog="postroom metrics", description=__doc__)
    add_server_arguments(parser, "POSTROOM_METRICS_ADDRESS", "POSTROOM_METRICS_PORT")
    args = parser.parse_args(argv)
    deployment = load_or_exit(args.app)  # loads every contract: the task names
    settings = overridden(deployment.settings, metrics_address=args.host, metrics_port=args.port)
    logging.basicConfig(
        level=settings.log_level, format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
    )
    return serve(deployment.app, settings)


if __name__ == "__main__":
    sys.exit(main())
