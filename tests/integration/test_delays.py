"""Delays held by the broker, never by a worker: retries in backoff and scheduled messages wait in
the broker (Redis: a sorted set; RabbitMQ: delay queues), so they neither block a worker nor die
with it, and each arrives no earlier than due, at its own queue only."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.bus import route
from tests.integration.services import POOLS, Echo, Flaky, ProbeHappened, WhatTime
from tests.support import BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

#: the first retry waits 4 to 8 s: long enough to tell a waiting retry from a running one
SETTINGS = {
    "max_retries": "3",
    "retry_backoff": "8",
    "retry_backoff_max": "8",
    "visibility_timeout": "60",
    "restore_interval": "1",
}
#: how late a scheduled message may run: a promotion period or a smallest delay level, and a fetch
LATE = 1.0


def flaky_runs(broker: BrokerContext, keys: list[str]) -> list[int]:
    found = broker.state().mget([broker.key("probe", "flaky", k) for k in keys])
    return [int(n or 0) for n in found]


def deliveries(broker: BrokerContext, key: str, pool: str) -> list[dict[str, float]]:
    done = broker.state().lrange(broker.key("probe", key, "done", pool), 0, -1)
    return [json.loads(d) for d in done]


def test_fresh_messages_are_handled_promptly_while_200_retries_wait_in_backoff(
    broker: BrokerContext, bus: MessageBus
) -> None:
    keys = [uuid.uuid4().hex for _ in range(200)]
    retried = bus.send_many([Flaky(key=k, failures=1) for k in keys])
    wait_for(lambda: min(flaky_runs(broker, keys)) >= 1, timeout=60)
    started = time.monotonic()
    fresh = [bus.send(Echo(text=str(n))) for n in range(10)]
    assert [p.reply(timeout=10).status for p in fresh] == ["succeeded"] * 10
    assert time.monotonic() - started < 3.0
    assert flaky_runs(broker, keys).count(1) > 100  # most retries were still waiting meanwhile
    assert broker.app.AsyncResult(retried[-1].correlation_id).state == "RETRY"  # as Flower shows
    replies = [p.reply(timeout=60) for p in retried]
    assert {(r.status, r.attempts) for r in replies} == {("succeeded", 2)}


def test_killing_every_worker_loses_no_message_waiting_in_backoff(
    broker: BrokerContext, bus: MessageBus, pools: dict[str, Pool]
) -> None:
    keys = [uuid.uuid4().hex for _ in range(20)]
    retried = [bus.send(Flaky(key=k, failures=1)) for k in keys]
    wait_for(lambda: min(flaky_runs(broker, keys)) >= 1, timeout=30)
    time.sleep(0.5)  # the last one's retry sent and acknowledged
    for worker in broker.workers:
        worker.kill_9()
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=1))
    # within the visibility timeout: none of them was in a worker's hands to be given back
    replies = [p.reply(timeout=30) for p in retried]
    assert {r.status for r in replies} == {"succeeded"}
    assert max(flaky_runs(broker, keys)) == 2
    broker.start_workers(*pools.values())


def test_a_retried_event_waits_in_backoff_and_reaches_only_the_failing_pool_again(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    bus.publish(ProbeHappened(key=key, fail_pool="pool_a", fail_times=1))
    wait_for(lambda: len(deliveries(broker, key, "pool_a")) == 1, timeout=30)
    time.sleep(1.0)
    counted = broker.state().hgetall(broker.key("probe", key, "runs"))
    assert {pool: int(n) for pool, n in counted.items()} == {"pool_a": 2, "pool_b": 1, "pool_c": 1}
    [delivery] = deliveries(broker, key, "pool_a")
    assert delivery["attempt"] == 2


@pytest.mark.parametrize("delay", [0.5, 2.5])
def test_a_command_sent_with_a_delay_runs_once_due_and_not_before(
    bus: MessageBus, delay: float
) -> None:
    sent = time.time()
    reply = bus.send(WhatTime(), delay=delay).reply(timeout=30)
    assert reply.value is not None
    assert sent + delay <= reply.value["at"] <= sent + delay + LATE


def test_a_command_sent_not_before_a_time_runs_once_that_time_came(bus: MessageBus) -> None:
    due = datetime.now(UTC) + timedelta(seconds=1.5)
    reply = bus.send(WhatTime(), not_before=due).reply(timeout=30)
    assert reply.value is not None
    assert due.timestamp() <= reply.value["at"] <= due.timestamp() + LATE


def test_an_event_published_with_a_delay_reaches_every_pool_once_due(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    due = time.time() + 2.5
    bus.publish(ProbeHappened(key=key), delay=2.5)
    wait_for(lambda: all(deliveries(broker, key, p) for p in POOLS), timeout=30)
    time.sleep(0.5)
    for pool in POOLS:
        [delivery] = deliveries(broker, key, pool)
        assert due <= delivery["at"] <= due + LATE


def test_a_plain_celery_countdown_waits_in_the_broker_and_fresh_commands_do_not_wait_for_it(
    broker: BrokerContext, bus: MessageBus
) -> None:
    sent = time.time()
    later = broker.app.send_task(
        "probe.WhatTime",
        countdown=3,
        queue=route(broker.app, WhatTime()),
        task_id=str(uuid.uuid4()),
    )
    time.sleep(0.5)  # the countdown reached a worker first
    started = time.monotonic()
    assert bus.send(Echo(text="now")).reply(timeout=10).status == "succeeded"
    assert time.monotonic() - started < 1.5
    reply = bus.reply_for(later.id, timeout=30)
    assert reply.value is not None
    assert sent + 3 <= reply.value["at"] <= sent + 3 + LATE
