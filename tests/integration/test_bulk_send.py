"""send_many's own message builder writes what Celery's send_task writes, on Redis and RabbitMQ.

No worker consumes ``commands.parked``: the messages are read back raw from the broker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from postroom import MessageBus
from postroom._celery.wire import CHUNK
from postroom.install import installation
from postroom.messages import Command
from postroom.topology import command_queue
from tests.support import BrokerContext

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

#: what differs between any two messages: their identity, time and origin process
_PER_MESSAGE = {"id", "root_id", "argsrepr", "kwargsrepr", "origin"}


class Parked(Command, service="parked"):
    n: int


@pytest.fixture
def conn(broker: BrokerContext) -> Iterator[Connection]:
    with broker.app.connection_for_read() as conn:
        channel = conn.default_channel
        installed = installation(broker.app)
        queue = command_queue(
            "parked", installed.queue_type, delivery_limit=installed.delivery_limit
        )
        queue(channel).declare()
        channel.queue_purge("commands.parked")
        yield conn


def _take(conn: Connection) -> Any:
    message = conn.default_channel.basic_get("commands.parked", no_ack=True)
    assert message is not None, "the queue holds fewer messages than were sent"
    return message


def test_a_bulk_sent_command_is_the_same_message_as_one_sent_alone(
    conn: Connection, broker: BrokerContext
) -> None:
    bus = MessageBus(broker.app, source="tests")
    single = bus.send(Parked(n=1))
    bulk = bus.send_many([Parked(n=1)])[0]
    first, second = _take(conn), _take(conn)
    assert first.headers["id"] == single.correlation_id
    assert second.headers["id"] == bulk.correlation_id
    for message, pending in ((first, single), (second, bulk)):
        assert message.headers["postroom.message_id"] == pending.message_id
        assert message.properties["correlation_id"] == pending.correlation_id
    assert set(first.headers) == set(second.headers)
    differing = {k for k in first.headers if first.headers[k] != second.headers[k]}
    assert differing <= _PER_MESSAGE | {"postroom.message_id", "postroom.correlation_id",
                                        "postroom.created_at", "ignore_result"}  # fmt: skip
    # send_task leaves ignore_result unset (None) where the builder says False: both mean False
    assert not first.headers["ignore_result"]
    assert not second.headers["ignore_result"]
    for prop in ("correlation_id", "reply_to", "delivery_mode", "priority"):
        assert (prop in first.properties) == (prop in second.properties), prop
    assert first.properties["delivery_mode"] == second.properties["delivery_mode"] == 2
    assert first.content_type == second.content_type == "application/json"
    assert json.loads(first.body) == json.loads(second.body)
    assert first.delivery_info["routing_key"] == second.delivery_info["routing_key"]


def test_a_bulk_send_larger_than_one_round_trip_arrives_whole_and_in_order(
    conn: Connection, broker: BrokerContext
) -> None:
    n = CHUNK * 2 + 17
    pending = MessageBus(broker.app, source="tests").send_many([Parked(n=i) for i in range(n)])
    assert len(pending) == n
    received = []
    while (message := conn.default_channel.basic_get("commands.parked", no_ack=True)) is not None:
        received.append(json.loads(message.body)[1]["n"])
    assert received == list(range(n))


def test_an_empty_bulk_send_sends_nothing(conn: Connection, broker: BrokerContext) -> None:
    assert MessageBus(broker.app, source="tests").send_many([]) == []
    assert conn.default_channel.basic_get("commands.parked", no_ack=True) is None
