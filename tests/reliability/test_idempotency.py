"""At-least-once delivery, at-most-once effect: a repeated message is acknowledged, not re-run."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.headers import Envelope
from tests.integration.services import POOLS, Count, Echo, ProbeHappened
from tests.support import BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_workers(
        Pool("probe", ("commands.probe",), concurrency=1),
        *(Pool(pool, ("events." + pool,), concurrency=1) for pool in POOLS),
    )
    return MessageBus(broker.app, source="tests")


def deliver(broker: BrokerContext, envelope: Envelope, payload: dict[str, object]) -> None:
    """Put one copy of exactly this message (same task ID, same headers) on the queue."""
    broker.app.send_task(
        envelope.message_type,
        kwargs=payload,
        task_id=envelope.correlation_id,
        headers=envelope.to_headers(),
        queue="commands.probe",
    )


def drained(bus: MessageBus) -> None:
    """Everything sent before has been handled: the queue is FIFO and the pool has one process."""
    assert bus.send(Echo(text="after")).reply(timeout=30).ok


def test_a_duplicated_command_runs_once_and_both_deliveries_get_the_same_reply(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    envelope = Envelope.new("probe.Count", 1, source="tests")
    deliver(broker, envelope, {"key": key})
    first = bus.reply_for(envelope.correlation_id, timeout=30)
    deliver(broker, envelope, {"key": key})
    drained(bus)
    assert broker.state().get(broker.key("probe", "count", key)) == "1"
    second = bus.reply_for(envelope.correlation_id, timeout=30)
    assert second == first


def test_two_copies_of_a_command_running_at_the_same_time_have_one_effect(
    broker: BrokerContext, bus: MessageBus
) -> None:
    """Both copies pass the inbox check before either commits; only the first commit lands."""
    broker.start_worker(Pool("probe-pair", ("commands.probe",), concurrency=2))
    for _ in range(3):
        key = uuid.uuid4().hex
        envelope = Envelope.new("probe.Count", 1, source="tests")
        deliver(broker, envelope, {"key": key, "pause": 1.0})
        deliver(broker, envelope, {"key": key, "pause": 1.0})
        assert bus.reply_for(envelope.correlation_id, timeout=30).ok
        time.sleep(2)  # the other copy started with it and pauses 1 s: it is done by now
        assert broker.state().get(broker.key("probe", "count", key)) == "1"


def test_the_same_command_sent_twice_as_two_messages_runs_twice(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    assert bus.send(Count(key=key)).reply(timeout=30).ok
    assert bus.send(Count(key=key)).reply(timeout=30).ok
    assert broker.state().get(broker.key("probe", "count", key)) == "2"


def test_a_duplicated_event_has_one_effect_in_each_pool(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    message_id = bus.publish(ProbeHappened(key=key))
    assert bus.publish(ProbeHappened(key=key), message_id=message_id) == message_id
    marker = uuid.uuid4().hex
    bus.publish(ProbeHappened(key=marker))  # handled after both copies, in every pool

    def done(k: str, pool: str) -> list[str]:
        return broker.state().lrange(broker.key("probe", k, "done", pool), 0, -1)

    wait_for(lambda: all(done(marker, p) for p in POOLS), timeout=30)
    for pool in POOLS:
        assert [json.loads(d)["message_id"] for d in done(key, pool)] == [message_id]
    runs = broker.state().hgetall(broker.key("probe", key, "runs"))
    assert runs == dict.fromkeys(POOLS, "1")
