"""One attempt budget for every message: it runs at most POSTROOM_MAX_RETRIES + 1 times in all,
and a partitioned one is retried in place, never behind the later messages of its partition (and
once it fails for good, they wait behind it)."""

from __future__ import annotations

import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.reliability import reliability
from tests.integration.services import ORDERED, Flaky, RecordInOrder
from tests.support import BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

SETTINGS = {"max_retries": "2"}


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=2))
    broker.start_worker(Pool(ORDERED, (f"commands.{ORDERED}",), concurrency=1))
    return MessageBus(broker.app, source="tests")


def test_a_command_that_keeps_failing_runs_max_retries_plus_one_times(
    bus: MessageBus, broker: BrokerContext
) -> None:
    name = uuid.uuid4().hex
    reply = bus.send(Flaky(key=name, failures=100)).reply(timeout=60)
    assert (reply.status, reply.attempts) == ("failed", 3)
    assert reply.error is not None
    assert reply.error.type == "TransientError"
    assert broker.state().get(broker.key("probe", "flaky", name)) == "3"


def test_a_partitioned_command_that_keeps_failing_runs_three_times_and_keeps_its_place(
    bus: MessageBus, broker: BrokerContext
) -> None:
    name = uuid.uuid4().hex
    first = bus.send(RecordInOrder(key=name, seq=0, failures=100))
    for seq in (1, 2, 3):
        bus.send(RecordInOrder(key=name, seq=seq))
    reply = first.reply(timeout=60)
    assert (reply.status, reply.attempts) == ("failed", 3)
    store = reliability(broker.app).dead_letters

    def parked() -> list[int]:
        found = [store.get(i) for i in store.ids()]
        return [
            letter.kwargs["seq"]
            for letter in found
            if letter
            and letter.reason == "parked"
            and letter.kwargs
            and letter.kwargs["key"] == name
        ]

    wait_for(
        lambda: len(parked()) == 3, timeout=60
    )  # behind it: see "Dead letters that keep order"
    assert sorted(parked()) == [1, 2, 3]
    log = broker.state().lrange(broker.key(ORDERED, name, "log"), 0, -1)
    assert log == ["0:1", "0:2", "0:3"]


def test_a_partitioned_command_that_recovers_is_handled_before_the_ones_behind_it(
    bus: MessageBus, broker: BrokerContext
) -> None:
    name = uuid.uuid4().hex
    first = bus.send(RecordInOrder(key=name, seq=0, failures=2))
    second = bus.send(RecordInOrder(key=name, seq=1))
    assert first.reply(timeout=60).value == {"seq": 0, "runs": 3}
    assert second.reply(timeout=60).value == {"seq": 1, "runs": 1}
    log = broker.state().lrange(broker.key(ORDERED, name, "log"), 0, -1)
    assert log == ["0:1", "0:2", "0:3", "1:1"]
