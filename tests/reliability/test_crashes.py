"""Workers killed with -9 while 1,000 commands are in flight: one reply and one effect each."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus, PendingReply
from postroom.reliability import reliability
from postroom.topology import command_queue_name
from tests.integration.services import Count
from tests.support import BrokerContext, children, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]
# Short enough that Redis gives back a dead worker's messages within the test; on RabbitMQ the
# broker requeues them as soon as the connection drops.
SETTINGS = {"visibility_timeout": "5", "restore_interval": "1"}
POOL = Pool("probe", ("commands.probe",), concurrency=2)
N = 1000


def kill_a_child(pid: int) -> None:
    """SIGKILL one pool process of worker ``pid``; one that exits on its own in between (a child
    being replaced) does not count."""
    for _ in range(50):
        for child in children(pid):
            try:
                os.kill(child, signal.SIGKILL)
                return
            except ProcessLookupError:
                continue
        time.sleep(0.1)
    raise AssertionError(f"worker {pid} has no child process to kill")


def test_kill_9_of_worker_children_and_of_a_whole_worker_loses_nothing_and_doubles_nothing(
    broker: BrokerContext,
) -> None:
    worker = broker.start_worker(POOL)
    bus = MessageBus(broker.app, source="tests")
    run = uuid.uuid4().hex
    keys = [f"{run}-{i}" for i in range(N)]
    pending = [bus.send(Count(key=k, pause=0.01)) for k in keys]
    db = broker.state()

    def counted() -> int:
        return sum(1 for v in db.mget([broker.key("probe", "count", k) for k in keys]) if v)

    for threshold in (100, 250):  # kill a child process mid-command, twice
        wait_for(lambda t=threshold: counted() >= t, timeout=120)
        kill_a_child(worker.proc.pid)
    wait_for(lambda: counted() >= 400, timeout=120)
    worker.kill_9()  # and then the whole worker, its children with it
    time.sleep(1)
    broker.start_worker(POOL)

    try:
        wait_for(lambda: counted() == N, timeout=180)
    except AssertionError:
        raise AssertionError(_whereabouts(broker, keys, pending)) from None
    values = db.mget([broker.key("probe", "count", k) for k in keys])
    assert values == ["1"] * N  # one effect per command
    replies = [p.reply(timeout=60) for p in pending]
    assert [r.status for r in replies] == ["succeeded"] * N  # one reply each
    assert [r.correlation_id for r in replies] == [p.correlation_id for p in pending]
    assert len(reliability(broker.app).dead_letters) == 0


def _whereabouts(broker: BrokerContext, keys: list[str], pending: list[PendingReply]) -> str:
    """Where the commands without an effect are: runs begun, dead letters, what is queued."""
    db = broker.state()
    counts = db.mget([broker.key("probe", "count", k) for k in keys])
    missing = [p for p, v in zip(pending, counts, strict=True) if not v]
    runs = db.mget([broker.key("inbox", "runs", "probe", p.message_id) for p in missing])
    letters = reliability(broker.app).dead_letters
    queued = broker.queue_size(command_queue_name("probe"))
    return (
        f"{len(missing)} of {N} commands have no effect; runs begun: {runs[:20]}; "
        f"dead letters: {len(letters)}; queued: {queued}; "
        f"first missing: {[p.message_id for p in missing[:5]]}"
    )
