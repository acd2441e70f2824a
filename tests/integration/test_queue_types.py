"""RabbitMQ queue types: postroom's queues are quorum queues unless POSTROOM_QUEUE_TYPE=classic,
and a queue that already exists with the other type stops a worker and a sender, saying how to
migrate it. The broker itself is asked what it holds (``rabbitmqctl list_queues``)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Queue

from config.pools import Pool
from postroom import MessageBus
from postroom.errors import QueueTypeMismatch
from tests.integration.services import Echo
from tests.support import BrokerContext, broker_context, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

IMPORTS = "tests.integration.services,tests.integration.ordering"
#: the command queue, an event pool's queue and a partitioned service's queue (its partition
#: queues are declared when the worker leases them)
POOL = Pool("probe", ("commands.probe", "events.pool_a", "commands.ordered"), concurrency=1)
PARTITIONS = [f"commands.ordered.p{p}" for p in range(2)]
POSTROOM_PREFIXES = ("commands.", "events.", "postroom.")


def _rabbitmqctl_json(vhost: str, *args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["rabbitmqctl", "-q", "-p", vhost, *args, "--formatter", "json"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def queues_on_broker(ctx: BrokerContext) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every postroom queue of the context's vhost: its type and arguments, as RabbitMQ has them."""
    assert ctx.vhost is not None
    rows = _rabbitmqctl_json(ctx.vhost, "list_queues", "name", "type", "arguments")
    return {
        row["name"]: (row["type"], {name: value for name, _kind, value in row["arguments"]})
        for row in rows
        if row["name"].startswith(POSTROOM_PREFIXES)
    }


def _context(tmp: Path, **overrides: str) -> Iterator[BrokerContext]:
    ctx = broker_context("rabbitmq", tmp, imports=IMPORTS, partitions="2", **overrides)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def quorum(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerContext]:
    yield from _context(tmp_path_factory.mktemp("quorum"))


@pytest.fixture(scope="module")
def classic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerContext]:
    yield from _context(tmp_path_factory.mktemp("classic"), queue_type="classic")


def _start_and_send_a_delayed_command(ctx: BrokerContext) -> dict[str, tuple[str, dict[str, Any]]]:
    """Start the pool, have a command go through a delay queue, wait for the partition queues;
    what the broker then holds."""
    ctx.start_worker(POOL)
    reply = MessageBus(ctx.app, source="tests").send(Echo(text="later"), delay=0.3).reply(30)
    assert reply.status == "succeeded"
    wait_for(lambda: set(PARTITIONS) <= set(queues_on_broker(ctx)), timeout=30)
    return queues_on_broker(ctx)


def test_every_queue_postroom_declares_on_rabbitmq_is_a_quorum_queue(
    quorum: BrokerContext,
) -> None:
    queues = _start_and_send_a_delayed_command(quorum)
    expected = {"commands.probe", "events.pool_a", "commands.ordered", "postroom.unrouted"}
    assert expected | set(PARTITIONS) <= set(queues)
    delay_queues = [name for name in queues if name.startswith("postroom.delay.")]
    assert delay_queues, queues
    for name, (kind, arguments) in queues.items():
        assert kind == "quorum", (name, kind)
        assert arguments["x-queue-type"] == "quorum", name
    for name in PARTITIONS:
        assert queues[name][1]["x-single-active-consumer"] is True
    for name in ("commands.probe", "events.pool_a", "commands.ordered", *PARTITIONS):
        assert queues[name][1]["x-delivery-limit"] == 20, name  # POSTROOM_DELIVERY_LIMIT
        assert queues[name][1]["x-dead-letter-routing-key"] == "postroom.given-up", name
    for name in delay_queues:
        arguments = queues[name][1]
        assert arguments["x-dead-letter-strategy"] == "at-least-once"
        assert arguments["x-overflow"] == "reject-publish"
        assert arguments["x-dead-letter-routing-key"] == "commands.probe"


def test_on_quorum_queues_each_consumer_of_a_one_process_worker_prefetches_one_message(
    quorum: BrokerContext,
) -> None:
    assert quorum.vhost is not None
    consumers = [
        row
        for row in _rabbitmqctl_json(quorum.vhost, "list_consumers", "queue_name", "prefetch_count")
        if row["queue_name"].startswith(POSTROOM_PREFIXES)
    ]
    assert {row["queue_name"] for row in consumers} >= {"commands.probe", "events.pool_a"}
    assert {row["prefetch_count"] for row in consumers} == {1}


def test_celery_declares_no_native_delayed_delivery_queues_on_quorum_queues(
    quorum: BrokerContext,
) -> None:
    assert quorum.vhost is not None
    names = [row["name"] for row in _rabbitmqctl_json(quorum.vhost, "list_queues", "name")]
    assert not [name for name in names if name.startswith("celery_delayed_")]


def test_postroom_queue_type_classic_declares_classic_queues(classic: BrokerContext) -> None:
    queues = _start_and_send_a_delayed_command(classic)
    assert any(name.startswith("postroom.delay.") for name in queues), queues
    for name, (kind, arguments) in queues.items():
        assert kind == "classic", (name, kind)
        assert "x-queue-type" not in arguments, name
        assert "x-dead-letter-strategy" not in arguments, name
        assert "x-delivery-limit" not in arguments, name
    assert "postroom.given-up" not in queues


@pytest.fixture
def classic_queue_beforehand(tmp_path: Path) -> Iterator[BrokerContext]:
    """A quorum deployment whose vhost already has a classic ``commands.probe`` (an older
    postroom declared it)."""
    for ctx in _context(tmp_path):
        with ctx.app.connection_for_write() as conn:
            Queue("commands.probe", durable=True)(conn.default_channel).declare()
        yield ctx


def test_a_worker_refuses_a_classic_queue_of_its_own_name_saying_how_to_migrate(
    classic_queue_beforehand: BrokerContext,
) -> None:
    worker = classic_queue_beforehand.spawn_worker(POOL)
    worker.proc.wait(timeout=90)
    output = worker.output()
    assert worker.proc.returncode != 0, output
    assert "QueueTypeMismatch" in output, output
    # RabbitMQ names the first argument that differs, a dead-letter one (the delivery limit's)
    assert "queue 'commands.probe'" in output
    assert "it is a classic queue, or a quorum queue made before" in output
    assert "delete_queue commands.probe" in output
    assert "POSTROOM_QUEUE_TYPE=classic" in output
    assert queues_on_broker(classic_queue_beforehand)["commands.probe"][0] == "classic"


def test_a_sender_refuses_a_classic_queue_of_its_destination_saying_how_to_migrate(
    classic_queue_beforehand: BrokerContext,
) -> None:
    with pytest.raises(QueueTypeMismatch) as refused:
        MessageBus(classic_queue_beforehand.app, source="tests").send(Echo(text="x"))
    assert refused.value.queue == "commands.probe"
    assert "cannot change in place" in str(refused.value)
    assert "POSTROOM_QUEUE_TYPE=classic" in str(refused.value)
