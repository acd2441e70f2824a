"""postroom's own message builder (``send_many``; ``bus.send`` on Redis) writes what Celery's
``send_task`` writes, on Redis and RabbitMQ, and announces it to Flower as Celery does.

No worker consumes ``commands.parked``: the messages are read back raw from the broker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from postroom import MessageBus
from postroom._celery.wire import CHUNK
from postroom.install import installation
from postroom.messages import Command
from postroom.topology import command_queue
from tests.support import BrokerContext, wait_for

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


def test_a_command_sent_alone_or_in_bulk_is_the_message_celery_would_send(
    conn: Connection, broker: BrokerContext
) -> None:
    """On Redis both are built by postroom (postroom._celery.wire); on RabbitMQ ``bus.send`` is
    Celery's ``send_task``. Either way a plain Celery worker, Flower and ``celery inspect`` read
    them as Celery's own."""
    bus = MessageBus(broker.app, source="tests")
    single = bus.send(Parked(n=1))
    bulk = bus.send_many([Parked(n=1)])[0]
    installed = installation(broker.app)
    celery = broker.app.send_task(
        Parked.__message_type__,
        kwargs={"n": 1},
        queue=command_queue(
            "parked", installed.queue_type, delivery_limit=installed.delivery_limit
        ),
    )
    first, second, reference = _take(conn), _take(conn), _take(conn)
    assert reference.headers["id"] == celery.id
    for message, pending in ((first, single), (second, bulk)):
        assert message.headers["id"] == pending.correlation_id
        assert message.headers["postroom.message_id"] == pending.message_id
        assert message.properties["correlation_id"] == pending.correlation_id
        celerys = {k for k in message.headers if not k.startswith("postroom.")}
        assert celerys == set(reference.headers)
        differing = {k for k in celerys if message.headers[k] != reference.headers[k]}
        assert differing <= _PER_MESSAGE | {"ignore_result"}
        # send_task leaves ignore_result unset (None) where the builder says False: both mean False
        assert not message.headers["ignore_result"]
        assert not reference.headers["ignore_result"]
        for prop in ("correlation_id", "reply_to", "delivery_mode", "priority"):
            assert (prop in message.properties) == (prop in reference.properties), prop
        assert message.properties["delivery_mode"] == reference.properties["delivery_mode"] == 2
        assert message.content_type == reference.content_type == "application/json"
        assert json.loads(message.body) == json.loads(reference.body)
        assert message.delivery_info["routing_key"] == reference.delivery_info["routing_key"]


def test_a_command_sent_alone_is_announced_to_flower_as_celery_announces_a_task(
    broker: BrokerContext,
) -> None:
    """The task-sent event ``bus.send`` publishes (on Redis in the command's own round trip) has
    every field of the one ``send_task`` publishes, read back through Celery's event receiver."""
    heard: dict[str, dict[str, Any]] = {}
    with broker.app.connection_for_read() as events:
        receiver = broker.app.events.Receiver(
            events, handlers={"task-sent": lambda event: heard.setdefault(event["uuid"], event)}
        )
        listening = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        listening.start()
        try:
            installed = installation(broker.app)
            queue = command_queue(
                "parked", installed.queue_type, delivery_limit=installed.delivery_limit
            )

            def celery_heard() -> bool:  # until the receiver listens, events go unheard
                task_id = broker.app.send_task(
                    Parked.__message_type__, kwargs={"n": 2}, queue=queue
                ).id
                time.sleep(0.2)
                return task_id in heard

            wait_for(celery_heard, timeout=30, interval=0)
            reference = broker.app.send_task(Parked.__message_type__, kwargs={"n": 3}, queue=queue)
            single = MessageBus(broker.app, source="tests").send(Parked(n=3))
            wait_for(lambda: {reference.id, single.correlation_id} <= set(heard), timeout=30)
        finally:
            receiver.should_stop = True
            listening.join(10)
    ours, celerys = heard[single.correlation_id], heard[reference.id]
    assert set(ours) == set(celerys)
    same = ("type", "name", "queue", "exchange", "routing_key", "retries", "eta", "expires")
    assert {k: ours[k] for k in same} == {k: celerys[k] for k in same}
    assert (ours["hostname"], ours["pid"]) == (celerys["hostname"], celerys["pid"])
    assert ours["kwargs"] == celerys["kwargs"] == repr({"n": 3})
    assert ours["root_id"] == single.correlation_id
    assert ours["parent_id"] is None
    assert ours["clock"] > celerys["clock"]  # this process's logical clock, moved forward


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
