"""Events are facts: what a handler publishes leaves only after its handling committed, on Redis
and RabbitMQ, even when its worker is killed between commit and dispatch."""

from __future__ import annotations

import json
import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus
from tests.integration.services import POOLS, Announce
from tests.integration.test_events import deliveries, settle
from tests.support import BrokerContext

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]
PROBE_CONCURRENCY = 2
#: the sweep sends what a dead worker committed after one second, checking every half second
SETTINGS = {"outbox_grace": "1", "outbox_sweep": "0.5"}


def faults(broker: BrokerContext) -> list[dict[str, object]]:
    return [json.loads(f) for f in broker.state().lrange(broker.key("probe", "faults"), 0, -1)]


def count(broker: BrokerContext, name: str) -> int:
    return int(broker.state().get(broker.key("probe", "announced", name)) or 0)


def no_delivery(broker: BrokerContext, name: str) -> bool:
    return all(deliveries(broker, name, pool) == [] for pool in POOLS)


def test_an_event_published_before_a_rejection_is_never_delivered(
    bus: MessageBus, broker: BrokerContext
) -> None:
    name = f"reject-{uuid.uuid4().hex}"
    reply = bus.send(Announce(key=name, then="reject")).reply(timeout=30)
    assert reply.status == "rejected"
    settle(broker, name, {}, timeout=5)
    assert no_delivery(broker, name)
    assert count(broker, name) == 0  # a rejection changes nothing either


def test_a_command_that_fails_after_publishing_announces_only_command_failed(
    bus: MessageBus, broker: BrokerContext, pools: dict[str, Pool]
) -> None:
    name = f"fail-{uuid.uuid4().hex}"
    pending = bus.send(Announce(key=name, then="fail"))
    assert pending.reply(timeout=30).status == "failed"
    settle(broker, name, {}, timeout=5)
    assert no_delivery(broker, name)
    assert any(f["correlation_id"] == pending.correlation_id for f in faults(broker))


def test_a_worker_killed_before_commit_runs_the_command_again_with_one_effect_and_one_event(
    bus: MessageBus, broker: BrokerContext
) -> None:
    name = f"die_before_commit-{uuid.uuid4().hex}"
    reply = bus.send(Announce(key=name, then="die_before_commit")).reply(timeout=60)
    assert reply.status == "succeeded"
    settle(broker, name, dict.fromkeys(POOLS, 1))
    assert {pool: len(deliveries(broker, name, pool)) for pool in POOLS} == dict.fromkeys(POOLS, 1)
    assert count(broker, name) == 1


def test_a_worker_killed_between_commit_and_dispatch_still_delivers_each_event_once_per_pool(
    bus: MessageBus, broker: BrokerContext
) -> None:
    name = f"die_before_dispatch-{uuid.uuid4().hex}"
    reply = bus.send(Announce(key=name, then="die_before_dispatch")).reply(timeout=60)
    assert reply.status == "succeeded"  # the redelivered copy finds the committed outcome
    settle(broker, name, dict.fromkeys(POOLS, 1))
    assert {pool: len(deliveries(broker, name, pool)) for pool in POOLS} == dict.fromkeys(POOLS, 1)
    assert count(broker, name) == 1
    assert broker.app.conf.postroom.reliability.inbox.pending() == 0  # nothing left behind
