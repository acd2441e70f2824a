"""The retry budget is postroom's alone: Celery's own default limit (three retries) never cuts a
larger POSTROOM_MAX_RETRIES short."""

from __future__ import annotations

import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus
from tests.integration.services import Flaky
from tests.support import BrokerContext

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

SETTINGS = {"max_retries": "5"}


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=1))
    return MessageBus(broker.app, source="tests")


def test_a_command_failing_five_times_succeeds_on_its_sixth_and_last_attempt(
    bus: MessageBus, broker: BrokerContext
) -> None:
    name = uuid.uuid4().hex
    reply = bus.send(Flaky(key=name, failures=5)).reply(timeout=60)
    assert (reply.status, reply.attempts, reply.value) == ("succeeded", 6, {"runs": 6})


def test_a_command_failing_for_good_runs_six_times_and_is_dead_lettered(
    bus: MessageBus, broker: BrokerContext
) -> None:
    name = uuid.uuid4().hex
    reply = bus.send(Flaky(key=name, failures=100)).reply(timeout=60)
    assert (reply.status, reply.attempts) == ("failed", 6)
    assert broker.state().get(broker.key("probe", "flaky", name)) == "6"
