"""postroom on a three-node RabbitMQ cluster of the test's own (tests/private_brokers.py: own node
names, ports, epmd and Erlang cookie; every node stopped by the PIDs it started): given every
node's URL, ``;``-separated as Celery's convention has it, workers and senders connect to a node
that answers, however many of the others are down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from config.pools import Pool
from postroom import MessageBus
from tests.integration.services import Echo
from tests.private_brokers import PrivateRabbitMQCluster
from tests.support import broker_context

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateRabbitMQCluster]:
    with PrivateRabbitMQCluster(3) as nodes:
        yield nodes


def test_a_worker_and_a_sender_given_every_node_use_one_that_answers_when_the_first_is_down(
    cluster: PrivateRabbitMQCluster, tmp_path: Path
) -> None:
    cluster.nodes[0].kill()
    context = broker_context("rabbitmq", tmp_path, broker_url=cluster.url)
    try:
        context.start_worker(Pool("probe", ("commands.probe",), concurrency=1))
        bus = MessageBus(context.app, source="tests")
        replies = [bus.send(Echo(text=f"via a live node {n}")).reply(timeout=30) for n in range(5)]
        assert [r.status for r in replies] == ["succeeded"] * 5
        assert [r.value["text"] for r in replies] == [f"via a live node {n}" for n in range(5)]
    finally:
        context.close()
