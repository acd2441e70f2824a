"""The broker-side poison backstop (RabbitMQ quorum queues): a message whose every delivery kills
its worker, which postroom's own count (POSTROOM_POISON_AFTER, set out of reach here) does not
stop, is given up by RabbitMQ after POSTROOM_DELIVERY_LIMIT redeliveries, dead-lettered into
postroom's given-up queue and recorded as a dead letter of its origin queue; redrive sends it back."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from config.pools import Pool
from postroom import Command, MessageBus
from postroom._celery.queue_types import queue_types_checked
from postroom.errors import QueueTypeMismatch
from postroom.reliability import DeadLetter, reliability
from postroom.topology import GIVEN_UP_QUEUE, command_queue
from tests.integration.services import Echo, Explode
from tests.reliability.test_dead_letters import letters_of, postroom
from tests.support import BrokerContext, broker_context, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]
LIMIT = 2


class Elsewhere(Command, service="elsewhere"):
    """A command of a service no postroom worker here consumes: another consumer takes it."""

    n: int


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerContext]:
    ctx = broker_context(
        "rabbitmq",
        tmp_path_factory.mktemp("delivery-limit"),
        poison_after="100",
        delivery_limit=str(LIMIT),
    )
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=1))
    return MessageBus(broker.app, source="tests")


def _given_up(broker: BrokerContext, message_id: str) -> list[DeadLetter]:
    return [
        letter
        for letter in letters_of(broker, message_id=message_id)
        if letter.reason == "delivery-limit"
    ]


def _runs(broker: BrokerContext, key: str) -> int:
    return int(broker.state().get(broker.key("probe", "exploded", key)) or 0)


def test_a_message_that_kills_every_worker_it_reaches_is_given_up_by_the_broker(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    pending = bus.send(Explode(key=key, how="sigkill"))
    wait_for(lambda: _given_up(broker, pending.message_id), timeout=180)
    [letter] = _given_up(broker, pending.message_id)
    assert (letter.queue, letter.error_type) == ("commands.probe", "DeliveryLimit")
    assert "'commands.probe' (delivery_limit)" in letter.error_message
    assert "x-death" not in letter.headers
    assert "x-first-death-queue" not in letter.headers
    assert _runs(broker, key) == LIMIT + 1  # the first delivery and LIMIT more, not 100
    [line] = [line for line in postroom(broker, "dlq", "list").splitlines() if letter.id in line]
    assert "delivery-limit" in line
    assert "commands.probe" in line
    # the worker keeps running and other messages flow
    assert bus.send(Echo(text="still here")).reply(timeout=60).status == "succeeded"


def test_redrive_sends_a_given_up_message_back_to_its_origin_queue(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    pending = bus.send(Explode(key=key, how="exit"))
    wait_for(lambda: _given_up(broker, pending.message_id), timeout=180)
    [letter] = _given_up(broker, pending.message_id)
    postroom(broker, "dlq", "redrive", letter.id)
    # back in commands.probe, it kills its worker LIMIT + 1 times more and is given up again
    wait_for(lambda: _runs(broker, key) == 2 * (LIMIT + 1), timeout=180)
    wait_for(lambda: len(_given_up(broker, pending.message_id)) == 1, timeout=60)
    [again] = _given_up(broker, pending.message_id)
    assert again.id != letter.id
    assert again.queue == "commands.probe"
    assert reliability(broker.app).dead_letters.get(letter.id) is None


def test_the_given_up_queue_is_drained(broker: BrokerContext, bus: MessageBus) -> None:
    with broker.app.connection_for_write() as connection:
        _name, messages, consumers = connection.default_channel.queue_declare(
            GIVEN_UP_QUEUE, passive=True
        )
    assert (messages, consumers) == (0, 1)


def test_a_queue_made_before_its_delivery_limit_is_refused_with_how_to_migrate_it(
    broker: BrokerContext,
) -> None:
    with broker.app.connection_for_write() as connection:
        command_queue("legacy", "quorum", delivery_limit=0)(connection.channel()).declare()
        limited = command_queue("legacy", "quorum", delivery_limit=LIMIT)
        with pytest.raises(QueueTypeMismatch) as refused, queue_types_checked():
            limited(connection.channel()).declare()
    assert refused.value.queue == "commands.legacy"
    assert "delete_queue commands.legacy" in str(refused.value)
    assert "POSTROOM_DELIVERY_LIMIT=0" in str(refused.value)


def test_a_scheduled_message_given_up_is_recorded_though_it_first_died_in_its_delay_queue(
    broker: BrokerContext, bus: MessageBus
) -> None:
    # its first death is its expiry in the delay queue, which RabbitMQ's x-first-death-* keep
    key = uuid.uuid4().hex
    pending = bus.send(Explode(key=key, how="exit"), delay=0.2)
    wait_for(lambda: _given_up(broker, pending.message_id), timeout=90)
    [letter] = _given_up(broker, pending.message_id)
    assert letter.queue == "commands.probe"
    assert "'commands.probe' (delivery_limit)" in letter.error_message
    assert _runs(broker, key) == LIMIT + 1


def _requeue_past_the_limit(broker: BrokerContext, queue: str) -> int:
    """Take and requeue what ``queue`` holds, as a consumer that is not postroom's and never
    acknowledges does, until RabbitMQ gives up on it; how many times it came back."""
    returned = 0
    with broker.app.connection_for_write() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(queue)) is not None:
            channel.basic_reject(message.delivery_info["delivery_tag"], requeue=True)
            returned += 1
            assert returned <= LIMIT + 1, "RabbitMQ kept redelivering past its delivery limit"
    return returned


def test_a_message_another_consumer_keeps_requeueing_is_given_up_and_recorded_by_postroom(
    broker: BrokerContext, bus: MessageBus
) -> None:
    pending = bus.send(Elsewhere(n=1))  # declares commands.elsewhere with the delivery limit
    assert _requeue_past_the_limit(broker, "commands.elsewhere") == LIMIT + 1
    # the probe pool's worker, which never consumes commands.elsewhere, drains the given-up queue
    wait_for(lambda: _given_up(broker, pending.message_id), timeout=30)
    [letter] = _given_up(broker, pending.message_id)
    assert (letter.queue, letter.task) == ("commands.elsewhere", "elsewhere.Elsewhere")


def _take_and_drop(broker: BrokerContext, queue: str) -> bool:
    """Take a message from ``queue`` without acknowledging it, then lose the connection, as a
    worker's main process killed with messages prefetched does; whether there was one."""
    connection = broker.app.connection_for_write()
    try:
        message = connection.default_channel.basic_get(queue)
        connection.connection.transport.sock.shutdown(socket.SHUT_RDWR)
    finally:
        connection.collect()  # no goodbye on a dead socket
    return message is not None


def test_a_message_held_by_a_consumer_whose_connection_dies_counts_a_delivery_too(
    broker: BrokerContext, bus: MessageBus
) -> None:
    # the reason to keep POSTROOM_DELIVERY_LIMIT high: an innocent message prefetched by a worker
    # whose main process keeps dying reaches the limit as surely as a poison one
    pending = bus.send(Elsewhere(n=2))
    for _ in range(LIMIT + 1):
        wait_for(lambda: _take_and_drop(broker, "commands.elsewhere"), timeout=10)
    wait_for(lambda: _given_up(broker, pending.message_id), timeout=30)
    [letter] = _given_up(broker, pending.message_id)
    assert letter.queue == "commands.elsewhere"


def test_a_given_up_message_waits_in_the_broker_while_the_dead_letters_cannot_be_stored(
    broker: BrokerContext, bus: MessageBus
) -> None:
    # the dead letters' index made unwritable (a string where a sorted set goes): every add fails
    store = reliability(broker.app).dead_letters
    index = broker.key("dlq")
    assert store.client.type(index) in {"zset", "none"}
    saved = store.client.dump(index)
    store.client.delete(index)
    store.client.set(index, "not a sorted set")
    worker = broker.workers[0]
    failures = "could not dead-letter a message given up in 'commands.elsewhere'"
    try:
        pending = bus.send(Elsewhere(n=3))
        _requeue_past_the_limit(broker, "commands.elsewhere")
        wait_for(lambda: failures in worker.output(), timeout=30)
        before = worker.output().count(failures)
        time.sleep(2)
        # held about POSTROOM_RETRY_BACKOFF_MAX (0.2 s here; the delay level below it, 100 ms,
        # at least) in the broker between tries; put straight back, it failed ~900 times in 2 s
        assert worker.output().count(failures) - before <= 25
    finally:
        store.client.delete(index)
        if saved is not None:
            store.client.restore(index, 0, saved)
    wait_for(lambda: _given_up(broker, pending.message_id), timeout=30)
    [letter] = _given_up(broker, pending.message_id)
    assert letter.queue == "commands.elsewhere"
    assert "x-postroom-given-up-in" not in letter.headers
    assert "x-death" not in letter.headers
