"""Replies to a callback over real workers, on Redis and RabbitMQ: a query sent with reply_to is
answered by a message to the asking pool's @on_reply handler, which no worker waits for."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from config.pools import Pool
from postroom import MessageBus, uuid7
from postroom.pipeline.callback import reply_message_id
from tests.integration.callbacks import ASKER, ORACLE, AskOracle, Forbid, Lookup, Remember
from tests.integration.flower import Flower, running_flower
from tests.integration.services import COUNT_DELIVERIES
from tests.support import TEST_SERVICES, BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]
SETTINGS = {"imports": f"{TEST_SERVICES},tests.integration.callbacks"}


@pytest.fixture(scope="module")
def flower(broker: BrokerContext) -> Iterator[Flower]:
    yield from running_flower(broker)


@pytest.fixture(scope="module")
def bus(broker: BrokerContext, flower: Flower) -> MessageBus:
    broker.env[COUNT_DELIVERIES] = "1"  # to see the reply's duplicate reach the asker's worker
    broker.start_workers(
        *(Pool(service, (f"commands.{service}",), concurrency=1) for service in (ASKER, ORACLE))
    )
    return MessageBus(broker.app, source="tests")


def received(broker: BrokerContext, correlation_id: str) -> dict[str, Any]:
    """What the asker's @on_reply handler recorded for a correlation ID, once it has."""
    wait_for(lambda: broker.state().hexists(broker.key(ASKER, "replies"), correlation_id))
    found = broker.state().hget(broker.key(ASKER, "replies"), correlation_id)
    assert found is not None
    seen: dict[str, Any] = json.loads(found)
    return seen


def test_a_handler_asking_with_reply_to_gets_the_reply_in_its_own_pools_on_reply(
    bus: MessageBus, broker: BrokerContext
) -> None:
    asked = bus.send(AskOracle(word="owl")).reply(timeout=30)
    assert asked.ok  # replied at once: the asker's worker never waited for the oracle
    lookup_id = asked.value
    seen = received(broker, lookup_id)
    assert seen["reply"]["status"] == "succeeded"
    assert seen["reply"]["value"] == {"word": "owl", "upper": "OWL", "run": 1}
    assert seen["correlation_id"] == seen["reply"]["correlation_id"] == lookup_id
    assert seen["causation_id"] == seen["reply"]["causation_id"] == lookup_id
    assert seen["source"] == ORACLE
    assert seen["message_id"] == reply_message_id(lookup_id)
    assert bus.reply_for(lookup_id, timeout=10).value == seen["reply"]["value"]


def test_a_send_from_outside_with_reply_to_is_answered_to_that_pool(
    bus: MessageBus, broker: BrokerContext
) -> None:
    pending = bus.send(Lookup(word="moth"), reply_to=ASKER)
    seen = received(broker, pending.correlation_id)
    assert seen["reply"]["value"] == {"word": "moth", "upper": "MOTH", "run": 1}
    assert seen["correlation_id"] == pending.correlation_id
    assert seen["causation_id"] == pending.message_id
    assert pending.reply(timeout=10).value == seen["reply"]["value"]  # the backend has it too


def test_flower_shows_the_replys_delivery_as_a_task_of_the_conversation(
    bus: MessageBus, flower: Flower
) -> None:
    pending = bus.send(Lookup(word="wasp"), reply_to=ASKER)
    assert pending.reply(timeout=30).ok
    task_id = reply_message_id(pending.message_id)
    shown: dict[str, Any] = {}

    def succeeded() -> bool:
        try:
            shown.update(flower.api(f"/api/task/info/{task_id}"))
        except OSError:  # 404 (an HTTPError) until Flower has an event of it
            return False
        return shown.get("state") == "SUCCESS"

    wait_for(succeeded, timeout=30, interval=0.3)
    assert shown["name"] == "oracle.Lookup.reply"
    assert shown["root_id"] == pending.correlation_id
    assert shown["parent_id"] == pending.message_id


def test_a_rejection_and_a_failure_for_good_are_replied_to_the_callback(
    bus: MessageBus, broker: BrokerContext
) -> None:
    refused = bus.send(Forbid(word="ant"), reply_to=ASKER)
    failing = bus.send(Lookup(word="unreachable"), reply_to=ASKER)
    rejected = received(broker, refused.correlation_id)["reply"]
    assert (rejected["status"], rejected["error"]["message"]) == ("rejected", "ant is forbidden")
    failed = received(broker, failing.correlation_id)["reply"]
    assert (failed["status"], failed["error"]["type"]) == ("failed", "TransientError")
    assert failed["attempts"] == 4  # after its retries (POSTROOM_MAX_RETRIES=3), not before
    assert broker.state().get(broker.key(ORACLE, "runs", "unreachable")) == "4"


def test_a_duplicate_of_the_reply_message_is_absorbed_by_the_askers_inbox(
    bus: MessageBus, broker: BrokerContext
) -> None:
    message_id = uuid7()  # sent twice as one message: the oracle answers each run
    bus.send(Lookup(word="bee"), message_id=message_id, reply_to=ASKER)
    first = received(broker, message_id)
    bus.send(Lookup(word="bee"), message_id=message_id, reply_to=ASKER)
    deliveries = broker.key("probe", "deliveries")
    attempt = f"{reply_message_id(message_id)}|0"
    wait_for(lambda: int(broker.state().hget(deliveries, attempt) or 0) >= 2)
    assert broker.state().get(broker.key(ORACLE, "runs", "bee")) == "2"
    assert broker.state().hget(broker.key(ASKER, "effects"), message_id) == "1"
    assert received(broker, message_id) == first  # the second run's reply did not replace it


def test_a_worker_killed_before_sending_the_reply_leaves_it_to_the_redelivery(
    bus: MessageBus, broker: BrokerContext
) -> None:
    word = f"die_before_reply-{uuid.uuid4().hex}"
    pending = bus.send(Remember(word=word), reply_to=ASKER)
    seen = received(broker, pending.correlation_id)
    assert broker.state().get(broker.key(ORACLE, "died", word)) == "1"  # the first run's worker
    assert seen["reply"]["status"] == "succeeded"
    assert broker.state().get(broker.key(ORACLE, "remembered", word)) == "1"  # committed once
    assert broker.state().hget(broker.key(ASKER, "effects"), pending.correlation_id) == "1"
    assert pending.reply(timeout=10).value == {"word": word}
