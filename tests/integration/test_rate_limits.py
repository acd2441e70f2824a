"""A rate limit shared by two workers (issue #15's proof): 50 calls a second to a vendor, held.

Two workers of the probe service (two processes each) run CallVendor, limited to 50 a second
across both (its slots in the state Redis). 450 commands arrive at once: every one succeeds,
each handler runs once, none is dead-lettered, no second of the run holds more than 55 runs,
and the runs' rate over the steady window (from the first second at the full rate to half a
second before the last run) is 50 a second within 10 %. Echo, another handler of the same
workers, answers in under a second as a rule (never in 3 s) once the 450 have their slots,
while the backlog takes 9 s; and CallOtherVendor, limited to 5 a second, in the same queue, runs at its own pace, not behind it.
"""

from __future__ import annotations

import itertools
import statistics
import time

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.ratelimits import AHEAD
from postroom.reliability import reliability
from tests.integration.services import SERVICE, VENDOR_LIMIT, CallOtherVendor, CallVendor, Echo
from tests.support import BrokerContext

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

COMMANDS = 450
PROCESSES = 4  # two workers, two processes each
RATE = VENDOR_LIMIT.limit / VENDOR_LIMIT.per


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_workers(
        *(
            Pool(name, ("commands.probe",), concurrency=PROCESSES // 2)
            for name in ("probe", "probe-twin")
        )
    )
    return MessageBus(broker.app, source="tests")


def test_two_workers_share_a_rate_limit_and_hold_the_backlog_in_the_broker(
    bus: MessageBus, broker: BrokerContext
) -> None:
    state = broker.state()
    pending = bus.send_many([CallVendor(n=n) for n in range(COMMANDS)])
    sent_at = time.time()
    others = bus.send_many([CallOtherVendor(n=n) for n in range(5)])  # a limit of its own

    latencies: list[float] = []
    runs_key = broker.key(SERVICE, "vendor", "runs")
    # Echo answers while the backlog waits: pinged until half a second of it is left (by the runs
    # made, not by the clock: on a loaded machine the burst takes longer to get its slots)
    while state.llen(runs_key) < COMMANDS - RATE / 2 and time.time() < sent_at + 60:
        started = time.monotonic()
        assert bus.send(Echo(text="ping")).reply(timeout=30).status == "succeeded"
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    # the first ping waited in the queue behind the 450 commands, until each had its slot
    absorbed = sent_at + latencies[0]

    replies = [p.reply(timeout=60) for p in pending]
    assert [r.status for r in replies] == ["succeeded"] * COMMANDS
    assert reliability(broker.app).dead_letters.ids() == []
    by_n = state.hgetall(broker.key(SERVICE, "vendor", "by_n"))
    assert by_n == {str(n): "1" for n in range(COMMANDS)}  # each ran once
    logs = "".join(worker.output() for worker in broker.workers)
    assert logs.count("probe.CallVendor held") >= COMMANDS // 2  # in the broker, not a worker

    runs = sorted(float(t) for t in state.lrange(runs_key, 0, -1))
    assert len(runs) == COMMANDS
    busiest = max(sum(1 for t in runs if s <= t < s + 1.0) for s in runs)
    # the steady window: from the first second at the full rate (on RabbitMQ the slots handed
    # out while the 450 were still queued pass before their messages get back) to the last
    # half second, where the last slots are sparse
    begin = next(s for s in runs if sum(1 for t in runs if s <= t < s + 1.0) >= RATE * 0.9)
    end = runs[-1] - 0.5
    rate = sum(1 for t in runs if begin <= t < end) / (end - begin)
    print(f"{broker.kind}: absorbed in {latencies[0]:.1f}s, {rate:.1f}/s over {end - begin:.1f}s "
          f"from {begin - runs[0]:.1f}s, "
          f"busiest second {busiest}, {runs[-1] - runs[0]:.1f}s in all; Echo answered "
          f"{len(latencies)} times, slowest {max(latencies[1:], default=0):.3f}s after the first")  # fmt: skip
    assert end - begin >= 5.0
    assert rate == pytest.approx(RATE, rel=0.10)
    assert busiest <= RATE * 1.10
    if broker.kind == "redis":  # its slot holders go to the head of the queue: no slot lost
        assert runs[-1] - runs[0] < (COMMANDS - 1) / RATE * 1.10
    assert len(latencies) >= 5
    # not behind the backlog (9 s): under a second as a rule, and never a third of the backlog
    assert statistics.median(latencies[1:]) < 1.0
    assert max(latencies[1:]) < 3.0

    assert {p.reply(timeout=30).status for p in others} == {"succeeded"}
    other = sorted(
        float(t) for t in state.lrange(broker.key(SERVICE, "other_vendor", "runs"), 0, -1)
    )
    print(
        f"the other vendor's runs, after the first ping: {[round(t - absorbed, 2) for t in other]}"
    )
    assert len(other) == 5
    # 5 a second: a run may begin up to AHEAD ahead of even spacing
    assert min(b - a for a, b in itertools.pairwise(other)) >= 0.2 - AHEAD - 0.01
    # not behind the first limit's backlog (9 s): its 5 runs take 0.8 s and end while the backlog
    # still runs. A clock bound would not hold: on a loaded machine RabbitMQ's hops through the
    # delay queues add seconds to both (CI saw them 4.8 s after the first ping, the backlog's end
    # 9 s later), so the claim is checked against the backlog itself
    assert other[-1] < runs[-1] - 1.0
