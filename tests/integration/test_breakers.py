"""A downstream outage behind a circuit breaker, on real workers (issue #15's proof, scaled down).

Two workers of the probe service (two processes each) share CallDownstream's breaker (3 failures
in a row, 1.5 s cool-down, in the state Redis). While the downstream is down, 200 commands
arrive; then it recovers. None is dead-lettered, all 200 succeed (each once), the handler runs
at most 3 + (failed probes) + 3 times meanwhile (3: the runs the other processes had begun when
it opened), and Echo, another handler of the same workers, answers all along. (Measured here:
Echo answered 200-260 times a second before the outage, and during it about 200 on Redis and 65
on RabbitMQ, where each held command's return costs a confirmed publish to a quorum queue; the
backlog passes through the pool once per cool-down, 3 s here against 30 s by default.)
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from config.pools import Pool
from postroom import MessageBus, installation
from postroom.breakers import RedisBreakers
from postroom.reliability import reliability
from tests.integration.services import (
    DOWNSTREAM_BREAKER,
    SERVICE,
    CallDownstream,
    DownstreamNoticed,
    Echo,
)
from tests.support import ROOT, BrokerContext, run_python, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

#: enough budget that no message runs out of attempts as one of the probes
SETTINGS = {"max_retries": "10"}
COMMANDS = 200
OUTAGE = 8.0  # seconds the downstream stays down once the breaker has opened
PROCESSES = 4  # two workers, two processes each
BREAKER = f"{SERVICE}:{CallDownstream.__message_type__}"


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_workers(
        *(
            Pool(name, ("commands.probe",), concurrency=PROCESSES // 2)
            for name in ("probe", "probe-twin")
        ),
        Pool("pool_a", ("events.pool_a",), concurrency=1),
    )
    return MessageBus(broker.app, source="tests")


def test_an_outage_is_waited_out_in_the_broker_and_the_backlog_drains_after_it(
    bus: MessageBus, broker: BrokerContext
) -> None:
    state = broker.state()
    down = broker.key(SERVICE, "downstream", "down")
    breakers = RedisBreakers(state, broker.namespace)
    state.set(down, 1)
    pending = [bus.send(CallDownstream(n=n)) for n in range(COMMANDS)]
    wait_for(lambda: _status(breakers) in {"open", "half-open"}, timeout=60)

    answered = 0
    outage_ends = time.monotonic() + OUTAGE
    while time.monotonic() < outage_ends:  # the other handler keeps answering meanwhile
        reply = bus.send(Echo(text=f"ping {answered}")).reply(timeout=30)
        assert reply.status == "succeeded"
        answered += 1
    assert state.exists(down)  # every ping was answered while the downstream was down
    assert _status(breakers) in {"open", "half-open"}
    state.delete(down)

    replies = [p.reply(timeout=90) for p in pending]
    assert [r.status for r in replies] == ["succeeded"] * COMMANDS
    assert reliability(broker.app).dead_letters.ids() == []
    assert state.get(broker.key(SERVICE, "downstream", "done")) == str(COMMANDS)
    assert answered > 0
    wait_for(lambda: _status(breakers) == "closed", timeout=30)

    logs = _logs(broker)
    failed_probes = logs.count(f"breaker {BREAKER} probe failed")
    assert logs.count(f"breaker {BREAKER} opened after") == 1  # one worker opened it, for all
    assert logs.count(f"breaker {BREAKER} closed") == 1
    assert failed_probes >= 1
    assert _announced(broker) == [
        ("postroom.CircuitOpened", "the downstream does not answer"),
        ("postroom.CircuitClosed", ""),
    ]
    runs_while_down = int(state.get(broker.key(SERVICE, "downstream", "runs_while_down")) or 0)
    assert DOWNSTREAM_BREAKER.failures is not None
    assert runs_while_down <= DOWNSTREAM_BREAKER.failures + failed_probes + (PROCESSES - 1)


def _logs(broker: BrokerContext) -> str:
    return "".join(worker.output() for worker in broker.workers)


def _status(breakers: RedisBreakers, name: str = BREAKER) -> str:
    found = [s for s in breakers.states() if s.name == name]
    return found[0].status(time.time()) if found else "closed"


def test_a_pools_event_handler_waits_out_an_outage_with_its_own_breaker(
    bus: MessageBus, broker: BrokerContext
) -> None:
    """One process: no run was under way when it opened, so the bound is failures + probes."""
    state = broker.state()
    down = broker.key(SERVICE, "downstream", "down")
    breakers = RedisBreakers(state, broker.namespace)
    name = f"pool_a:{DownstreamNoticed.__message_type__}"
    state.set(down, 1)
    for n in range(50):
        bus.publish(DownstreamNoticed(n=n))
    wait_for(lambda: _status(breakers, name) in {"open", "half-open"}, timeout=60)
    wait_for(lambda: _logs(broker).count(f"breaker {name} probe failed") >= 1, timeout=60)
    state.delete(down)
    done = broker.key(SERVICE, "downstream", "events_done")
    wait_for(lambda: state.get(done) == "50", timeout=90)
    wait_for(lambda: _status(breakers, name) == "closed", timeout=30)
    assert reliability(broker.app).dead_letters.ids() == []
    failed_probes = _logs(broker).count(f"breaker {name} probe failed")
    runs_while_down = int(state.get(broker.key(SERVICE, "downstream", "event_runs_while_down")))
    assert DOWNSTREAM_BREAKER.failures is not None
    assert runs_while_down <= DOWNSTREAM_BREAKER.failures + failed_probes


def test_a_breaker_opened_by_hand_holds_its_messages_until_closed_by_hand(
    bus: MessageBus, broker: BrokerContext
) -> None:
    state = broker.state()
    done = broker.key(SERVICE, "downstream", "done")
    assert f"{BREAKER} " in _postroom(broker, "breakers")
    assert "opened" in _postroom(broker, "breakers", "open", BREAKER)
    (listed,) = [
        line for line in _postroom(broker, "breakers", "list").splitlines() if BREAKER in line
    ]
    assert listed.split()[:2] == [BREAKER, "open"]
    assert "until closed by hand" in listed
    before = int(state.get(done) or 0)
    pending = bus.send(CallDownstream(n=-1))
    for n in range(20):  # the pool answers the rest meanwhile
        assert bus.send(Echo(text=f"ping {n}")).reply(timeout=30).status == "succeeded"
    assert int(state.get(done) or 0) == before  # held, not run
    assert "closed" in _postroom(broker, "breakers", "close", BREAKER)
    assert pending.reply(timeout=60).status == "succeeded"
    assert int(state.get(done) or 0) == before + 1
    assert _announced(broker)[-2:] == [
        ("postroom.CircuitOpened", "opened by hand"),
        ("postroom.CircuitClosed", ""),
    ]


def test_the_command_refuses_a_handler_without_a_breaker(broker: BrokerContext) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "breakers", "open", "probe:probe.Echo"],
        cwd=ROOT, env=broker.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "has a circuit breaker" in done.stderr


def _announced(broker: BrokerContext) -> list[tuple[str, str]]:
    """CallDownstream's CircuitOpened and CircuitClosed events in the event log, oldest first."""
    return [
        (e.message_type, e.payload.get("error_message", ""))
        for e in installation(broker.app).event_log.tail(100_000)
        if e.message_type.startswith("postroom.Circuit")
        and e.payload["message_type"] == CallDownstream.__message_type__
    ]


def _postroom(broker: BrokerContext, *args: str) -> str:
    return run_python(broker.env, "-m", "workers.cli", *args)
