"""Dead letters that keep order, on Redis and RabbitMQ with real workers: a dead-lettered key's
later messages are parked behind it while the other keys flow, and ``postroom dlq redrive --all``
(the real CLI) runs every line in send order, each message once in effect, even when a worker is
killed with -9 while the lines drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.reliability import reliability
from tests.integration.ordering import Hop
from tests.support import ROOT, BrokerContext, WorkerProcess, children, run_python, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
SETTINGS = {
    "imports": "tests.integration.services,tests.integration.ordering",
    "partitions": "4",
    "partition_lease": "3",
}
PARCELS, HOPS = 20, 20
#: parcel index -> the hop that fails for good while the switch is on (two on one parcel: the
#: later one is parked behind the first and never reached while the switch is on)
FAILS = {0: [0], 3: [7], 8: [12, 15], 13: [19], 17: [4]}


@pytest.fixture(scope="module")
def workers(broker: BrokerContext) -> list[WorkerProcess]:
    """Two single-message workers of the partitioned service, sharing its 4 partitions."""
    return [
        broker.start_worker(Pool(name, ("commands.ordered",), concurrency=1))
        for name in ("ordered-a", "ordered-b")
    ]


def postroom(broker: BrokerContext, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], cwd=ROOT, env=broker.env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def handled(broker: BrokerContext, lists: list[str]) -> list[list[int]]:
    """Each parcel's hops as handled, in order."""
    pipe = broker.state().pipeline()
    for name in lists:
        pipe.lrange(name, 0, -1)
    return [[int(v) for v in found] for found in pipe.execute()]


def test_a_dead_lettered_keys_later_messages_wait_behind_it_and_a_redrive_keeps_every_keys_order(
    broker: BrokerContext, workers: list[WorkerProcess]
) -> None:
    run, db = uuid.uuid4().hex[:8], broker.state()
    parcels = [f"{run}-{i}" for i in range(PARCELS)]
    lists = [broker.key("ordered", "hopped", p) for p in parcels]  # see ordering.hopped
    switch = broker.key("ordered", "failing")
    db.sadd(switch, *(f"{parcels[i]}:{seq}" for i, seqs in FAILS.items() for seq in seqs))
    bus = MessageBus(broker.app, source="tests")
    for seq in range(HOPS):  # interleaved across parcels, in order per parcel
        bus.send_many([Hop(parcel=p, seq=seq) for p in parcels])

    def seen() -> list[list[int]]:
        return handled(broker, lists)

    letters = reliability(broker.app).dead_letters
    kept = sum(HOPS - min(seqs) for seqs in FAILS.values())  # each head and all behind it
    wait_for(lambda: sum(map(len, seen())) == PARCELS * HOPS - kept and len(letters) == kept, 60)
    time.sleep(0.5)  # a parked message that ran anyway would show up now
    for i, hops in enumerate(seen()):
        assert hops == list(range(min(FAILS.get(i, [HOPS])))), f"parcel {i}: {hops}"
    listing = postroom(broker, "dlq", "list").stdout.splitlines()
    assert sum(" parked " in line and " behind " in line for line in listing) == kept - len(FAILS)
    assert sum("Broken: hop" in line and "parked]" in line for line in listing) == len(FAILS)

    [parked] = [
        letter
        for letter in map(letters.get, letters.ids())
        if letter and letter.reason == "parked" and letter.kwargs
        and (letter.kwargs["parcel"], letter.kwargs["seq"]) == (parcels[3], 8)
    ]  # fmt: skip
    refused = postroom(broker, "dlq", "redrive", parked.id)
    assert refused.returncode == 1
    assert "parked behind" in refused.stderr
    refused = postroom(broker, "dlq", "purge", parked.id)
    assert (refused.returncode, "parked behind" in refused.stderr) == (1, True)

    db.delete(switch)
    for seq in range(HOPS, 2 * HOPS):  # more of every parcel, queued while the lines drain
        bus.send_many([Hop(parcel=p, seq=seq) for p in parcels])
    done = run_python(broker.env, "-m", "workers.cli", "dlq", "redrive", "--all")
    assert done.count("redriven ") == len(FAILS)
    wait_for(lambda: sum(map(len, seen())) == PARCELS * 2 * HOPS, timeout=60)
    time.sleep(1)  # anything doubled would show up now
    for i, hops in enumerate(seen()):
        assert hops == list(range(2 * HOPS)), f"parcel {i}: out of order, lost or doubled"
    assert len(letters) == 0
    assert list(db.scan_iter(broker.key("parked", "*"))) == []  # every key flows again


def test_a_worker_killed_while_the_lines_drain_loses_no_message_and_runs_none_twice(
    broker: BrokerContext, workers: list[WorkerProcess]
) -> None:
    run, db = uuid.uuid4().hex[:8], broker.state()
    parcels, hops = [f"{run}-{i}" for i in range(8)], 40
    lists = [broker.key("ordered", "hopped", p) for p in parcels]
    switch = broker.key("ordered", "failing")
    db.sadd(switch, *(f"{p}:0" for p in parcels[:6]))  # six lines of 40, two parcels flow
    bus = MessageBus(broker.app, source="tests")
    for seq in range(hops):
        bus.send_many([Hop(parcel=p, seq=seq, pause=0.02) for p in parcels])  # 2.4 s a worker
    letters = reliability(broker.app).dead_letters
    wait_for(lambda: len(letters) == 6 * hops, timeout=60)
    db.delete(switch)
    run_python(broker.env, "-m", "workers.cli", "dlq", "redrive", "--all")
    wait_for(
        lambda: sum(map(len, handled(broker, lists))) >= 2 * hops + 40, timeout=60, interval=0.02
    )
    first = workers[0]
    for pid in [first.proc.pid, *children(first.proc.pid)]:  # the whole worker, mid-drain
        os.kill(pid, signal.SIGKILL)
    first.proc.wait()
    assert sum(map(len, handled(broker, lists))) < 8 * hops  # killed while the lines drained
    wait_for(lambda: sum(map(len, handled(broker, lists))) == 8 * hops, timeout=60)
    wait_for(lambda: len(letters) == 0, timeout=30)  # a copy parked again by the crash drains too
    time.sleep(1)  # anything doubled would show up now
    for i, seen in enumerate(handled(broker, lists)):
        assert seen == list(range(hops)), f"parcel {i}: out of order, lost or doubled"
