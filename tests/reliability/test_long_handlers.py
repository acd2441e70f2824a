"""On Redis, a handler may run longer than the visibility timeout without being delivered twice,
and a dead worker's message still comes back within about one visibility timeout.

kombu gives back every unacknowledged message delivered more than the visibility timeout ago; a
worker's heartbeat (postroom._celery.bootsteps.Heartbeat) keeps marking the messages it holds as
just delivered, so only a dead worker's messages grow old enough. The timeout here is a few
seconds, so that both show within the test.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from config.pools import Pool
from postroom import MessageBus
from postroom.topology import command_queue_name
from tests.integration.services import SERVICE, Linger
from tests.support import BrokerContext, broker_context, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]
VISIBILITY, RESTORE = 3, 1
QUEUE = command_queue_name(SERVICE)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerContext]:
    """Redis only (RabbitMQ keeps a delivered message for as long as its consumer is connected)."""
    ctx = broker_context(
        "redis", tmp_path, visibility_timeout=str(VISIBILITY), restore_interval=str(RESTORE)
    )
    yield ctx
    ctx.close()


def runs_began(broker: BrokerContext, name: str) -> list[float]:
    """When each run of Linger(key=name) began."""
    return [float(t) for t in broker.state().lrange(broker.key(SERVICE, "lingered", name), 0, -1)]


def nothing_left(broker: BrokerContext) -> bool:
    """No message unacknowledged, none waiting in the queue."""
    with redis.Redis.from_url(broker.app.conf.broker_url) as client:
        unacked = client.hlen(f"{broker.namespace}:unacked")
        return not unacked and not client.llen(f"{broker.namespace}:{QUEUE}")


def test_a_handler_running_three_visibility_timeouts_runs_once(broker: BrokerContext) -> None:
    # two processes: a second delivery would start at once, beside the first
    broker.start_worker(Pool(SERVICE, (QUEUE,), concurrency=2))
    name = uuid.uuid4().hex
    pending = MessageBus(broker.app, source="tests").send(Linger(key=name, seconds=3 * VISIBILITY))

    assert pending.reply(timeout=30).status == "succeeded"
    wait_for(lambda: nothing_left(broker), timeout=5)  # no second delivery on its way
    assert len(runs_began(broker, name)) == 1


# a solo pool runs its handler on the worker's event loop, where a timer would not fire meanwhile
@pytest.mark.parametrize("kind", ["prefork", "solo"])
def test_a_killed_workers_message_is_handled_again_within_a_visibility_timeout(
    broker: BrokerContext, kind: str
) -> None:
    doomed = broker.start_worker(Pool("probe-a", (QUEUE,), concurrency=1, pool=kind))
    name = uuid.uuid4().hex
    pending = MessageBus(broker.app, source="tests").send(Linger(key=name, seconds=120))
    wait_for(lambda: runs_began(broker, name), timeout=10)
    broker.start_worker(Pool("probe-b", (QUEUE,), concurrency=1))  # idle, and sweeping
    time.sleep(VISIBILITY + RESTORE)
    assert len(runs_began(broker, name)) == 1  # the live worker kept its message

    killed = time.time()
    doomed.kill_9()

    assert pending.reply(timeout=30).status == "succeeded"
    _first, second = runs_began(broker, name)
    assert second - killed < VISIBILITY + RESTORE + 1, f"back after {second - killed:.1f}s"
