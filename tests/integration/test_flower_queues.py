"""Flower's Broker tab and ``/api/queues/length``: how many messages wait in each postroom queue.

Flower is started as a user starts it (``postroom flower``), before any worker: its first
inspection of the workers finds none, which used to print warnings on the terminal. One pool then
starts and Flower is asked to look again (the Workers page's refresh), so it knows a worker: Flower
alone would then list only that pool's queues. Commands wait in queues nobody consumes, among them
a partition queue and a priority message, which kombu keeps in a list of its own on Redis.
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from kombu import Queue

from config.pools import pool_named
from postroom import Command, MessageBus
from postroom.bus import route
from postroom.partitions import partition_count, partition_of
from postroom.topology import command_queue_name, partition_queue_name
from tasks.assets import RegisterAsset
from tasks.geofence import RecordPosition
from tests.integration.flower import Flower
from tests.support import BrokerContext, run_python, wait_for
from workers.flower import flower_broker, management_api
from workers.launcher import node_name

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

#: RabbitMQ's management API refreshes its queue counts every 5 s.
COUNTS_TIMEOUT = 30.0


class Unheard(Command, service="unheard"):
    """Sent to a queue outside the deployment's, so the depths checked here stay as counted."""

    n: int


@pytest.fixture(scope="module")
def flower(broker: BrokerContext) -> Iterator[Flower]:
    # Every queue exists on the broker, as after each pool has started once (RabbitMQ's
    # management API knows only declared queues).
    with broker.app.connection_for_write() as conn:
        for queue in broker.app.amqp.queues.values():
            queue.bind(conn.default_channel).declare()
    running = Flower(broker)
    try:
        wait_for(running.answers, timeout=60, interval=0.3)
        pool = pool_named("search")
        broker.start_worker(pool)
        # Flower's refresh waits its inspect timeout (1 s) for replies; a worker slowed by a loaded
        # machine answers the next one, as a user pressing Refresh again would see.
        wait_for(
            lambda: node_name(pool) in running.api("/api/workers?refresh=1"),
            timeout=30,
            interval=0.5,
        )
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def waiting(broker: BrokerContext, flower: Flower) -> Counter[str]:
    """Commands sent to queues no worker consumes: how many wait in each."""
    bus = MessageBus(broker.app, source="flower-test")
    sent: Counter[str] = Counter()
    for n in range(3):
        bus.send(RegisterAsset(name=f"Crate {n}"))
        sent[command_queue_name("assets")] += 1
    partitions = partition_count(broker.app)
    for _ in range(2):
        asset_id = uuid.uuid4()
        bus.send(RecordPosition(asset_id=asset_id, lat=52.5, lon=13.4, at=datetime.now(UTC)))
        sent[partition_queue_name("geofence", partition_of(asset_id, partitions))] += 1
    # A prioritised message: on Redis kombu keeps it in a list of its own beside the queue's.
    broker.app.send_task(
        "assets.RegisterAsset", queue=route(broker.app, RegisterAsset(name="Crate 3")), priority=6
    )
    sent[command_queue_name("assets")] += 1
    return sent


@pytest.fixture(scope="module")
def deployment_queues(broker: BrokerContext) -> list[str]:
    """The queues of the deployment Flower runs (``config`` with this context's imports), as a
    process of it lists them: this test process may have loaded other tests' services too."""
    listing = "import config; print(' '.join(config.app.amqp.queues))"
    return run_python(broker.env, "-c", listing).split()


def _depths(flower: Flower) -> dict[str, int]:
    """Each queue's depth, as far as it is known: RabbitMQ's management API has no count for a
    quorum queue until that queue's first statistics emission (every 5 s by default)."""
    queues = flower.api("/api/queues/length")["active_queues"]
    return {q["name"]: int(q["messages"]) for q in queues if "messages" in q}


def test_queue_lengths_api_gives_each_postroom_queue_its_depth(
    deployment_queues: list[str], flower: Flower, waiting: Counter[str]
) -> None:
    assert {"commands.assets", "events.search", "postroom.unrouted"} <= set(deployment_queues)
    expected = {name: waiting[name] for name in deployment_queues}
    depths: dict[str, int] = {}

    def counted() -> bool:
        depths.update(_depths(flower))
        return {name: depths.get(name) for name in expected} == expected

    try:
        wait_for(counted, timeout=COUNTS_TIMEOUT, interval=1.0)
    except AssertionError:
        pytest.fail(f"Flower's queue lengths {depths} never matched {expected}")


def test_broker_page_lists_each_queue_with_its_messages(
    deployment_queues: list[str], flower: Flower, waiting: Counter[str]
) -> None:
    queue = command_queue_name("assets")
    row = re.compile(
        rf'<tr id="{re.escape(queue)}">\s*<td>{re.escape(queue)}</td>\s*<td[^>]*>(\d+)</td>'
    )
    page = ""

    def shown() -> bool:
        nonlocal page
        page = flower.get("/broker")  # an error status raises
        found = row.search(page)
        return found is not None and int(found.group(1)) == waiting[queue]

    wait_for(shown, timeout=COUNTS_TIMEOUT, interval=1.0)
    for name in deployment_queues:
        assert f'<tr id="{name}">' in page, name


def test_a_command_no_worker_has_received_is_listed_from_the_moment_it_is_sent(
    broker: BrokerContext, flower: Flower
) -> None:
    """POSTROOM_TASK_SENT_EVENTS (on by default): its task-sent event, which on Redis goes in
    the same round trip as the command."""
    pending = MessageBus(broker.app, source="flower-test").send(Unheard(n=9))
    info: dict[str, object] = {}

    def listed() -> bool:
        try:
            info.update(flower.api(f"/api/task/info/{pending.correlation_id}"))
        except urllib.error.HTTPError as unknown:
            if unknown.code != 404:
                raise
            return False
        return True

    wait_for(listed, timeout=30, interval=0.3)
    assert info["name"] == Unheard.__message_type__
    assert info["state"] == "PENDING"  # sent, not received: no worker consumes its queue
    assert info["root_id"] == pending.correlation_id
    assert info["kwargs"] == repr({"n": 9})


def test_queue_lengths_need_credentials(flower: Flower) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        flower.get("/api/queues/length", auth=None)
    assert refused.value.code == 401


def test_flower_started_before_any_worker_prints_no_inspect_warnings(flower: Flower) -> None:
    out = flower.output()
    assert "Visit me at" in out  # the log is Flower's
    assert "Inspect method" not in out
    assert "Traceback" not in out


def test_on_the_default_rabbitmq_vhost_flower_reads_that_vhost_only(
    broker: BrokerContext, caplog: pytest.LogCaptureFixture
) -> None:
    """Flower asked the management API for ``queues/`` (every vhost) instead of ``queues/%2F``."""
    if broker.kind != "rabbitmq":
        pytest.skip("vhosts are RabbitMQ's")
    elsewhere = Queue(f"flower-vhost-{uuid.uuid4().hex}", durable=False, auto_delete=True)
    with broker.app.connection_for_write() as conn:
        elsewhere.bind(conn.default_channel).declare()  # in this test's own vhost
        own = broker.settings.broker_url
        wait_for(lambda: _listed(own, elsewhere.name) == [elsewhere.name], timeout=COUNTS_TIMEOUT)
        with caplog.at_level("ERROR", logger="flower.utils.broker"):
            assert _listed("amqp://guest:guest@127.0.0.1:5672//", elsewhere.name) == []
        assert not caplog.records, caplog.text  # the management API answered


def _listed(broker_url: str, name: str) -> list[str]:
    """The queues of that name that Flower's client for ``broker_url`` finds."""
    client = flower_broker(broker_url, http_api=management_api(broker_url))
    return [q["name"] for q in asyncio.run(client.queues([name]))]
