"""A process manager's instance under two workers at once, with real workers on Redis and
RabbitMQ, its state on the Redis store (seed 004's fulfilment, on SQL: test_orders.py).

Two workers of two processes each handle 120 adds to two tallies; each tally's first adds are
made to overlap with another add of the same tally (tests/integration/tallies.py). A run whose
commit lost to the other reruns on the new state, so no add is lost and none counts twice. Each
tally also got the reply to the query it sent when it opened, through its own address.
"""

from __future__ import annotations

import pytest

from config.pools import Pool
from postroom import MessageBus, installation
from postroom.reliability import reliability
from tests.integration.tallies import CLERK, TALLY, AddToTally, OpenTally
from tests.support import TEST_SERVICES, BrokerContext, wait_for
from workers.launcher import wait_until_ready

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

SETTINGS = {"imports": f"{TEST_SERVICES},tests.integration.tallies"}
ADDS = 60  # per tally


def test_two_workers_adding_to_one_instance_at_once_lose_no_update(
    broker: BrokerContext,
) -> None:
    queues = (f"commands.{TALLY}", f"commands.{CLERK}")
    pools = [Pool(f"tally-{w}", queues, concurrency=2) for w in "ab"]
    for pool in pools:
        broker.spawn_worker(pool)
    wait_until_ready(broker.app, pools, timeout=60)
    bus = MessageBus(broker.app, source="tests")
    tallies = ["t1", "t2"]
    for tally in tallies:
        assert bus.send(OpenTally(tally=tally)).reply(timeout=30).ok
    sent = bus.send_many([AddToTally(tally=t, n=n) for n in range(1, ADDS + 1) for t in tallies])
    replies = [pending.reply(timeout=60) for pending in sent]
    assert all(reply.ok for reply in replies), [r for r in replies if not r.ok][:3]
    store = installation(broker.app).runtime.store(TALLY)
    state = broker.state()
    for tally in tallies:
        instance = store.instance(TALLY, tally)
        assert instance is not None
        assert instance.state == {
            "total": ADDS * (ADDS + 1) // 2,
            "adds": ADDS,
            "label": f"Tally {tally.upper()}",
        }
        assert instance.version == ADDS + 2  # started, the clerk's reply, one write per add
        runs = int(state.get(broker.key(TALLY, "runs", tally)) or 0)
        assert runs > ADDS, f"{tally}: no run lost its commit and reran ({runs} runs)"
    wait_for(lambda: reliability(broker.app).dead_letters.ids() == [])
    for worker in broker.workers:
        assert "Traceback" not in worker.output(), worker.output()
