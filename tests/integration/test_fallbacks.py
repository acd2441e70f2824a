"""A query's fallback while its breaker is open, and breakers as Flower shows them, on real workers.

GetReading reads a sensor through a downstream; its breaker opens after 3 failures and stays
open 6 s, and its fallback answers with the sensor's last reading (kept in the state Redis, so
every worker process gives the same one). While the downstream is down, asks are answered by
the fallback, flagged as such, at once: all of them before the cool-down ends. Once the
downstream is back, the probe after the cool-down brings the real answer back, unflagged.

Flower (``postroom flower``, started before anything is sent) shows a command held by an open
breaker as HELD, with the breaker in its exception and when it is back as its ETA, until it runs
and succeeds; and a fallback's answer as the query task's result, ``'fallback': True`` in it.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.breakers import RedisBreakers, breaker_name
from tests.integration.flower import Flower, running_flower
from tests.integration.services import (
    READING_BREAKER,
    SERVICE,
    CallDownstream,
    GetReading,
)
from tests.support import BrokerContext, run_python, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

READINGS = breaker_name(SERVICE, GetReading.__message_type__)
CALLS = breaker_name(SERVICE, CallDownstream.__message_type__)
ASKS = 10


@pytest.fixture(scope="module")
def flower(broker: BrokerContext) -> Iterator[Flower]:
    yield from running_flower(broker)


@pytest.fixture(scope="module")
def bus(broker: BrokerContext, flower: Flower) -> MessageBus:
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=2))
    return MessageBus(broker.app, source="tests")


def test_while_the_breaker_is_open_the_fallback_answers_at_once_flagged_then_the_handler_again(
    bus: MessageBus, broker: BrokerContext, flower: Flower
) -> None:
    state = broker.state()
    down = broker.key(SERVICE, "readings", "down")
    first = bus.ask(GetReading(sensor="s1"), timeout=30)
    assert (first.value, first.fallback) == ({"sensor": "s1", "n": 1}, False)

    state.set(down, 1)
    opening = bus.ask(GetReading(sensor="s1"), timeout=30)  # 3 failed runs open the breaker
    assert (opening.status, opening.value, opening.fallback) == (
        "succeeded",
        {"sensor": "s1", "n": 1},
        True,
    )
    assert bus.reply_for(opening.correlation_id, timeout=5).fallback is True  # as stored
    (breaker,) = [s for s in RedisBreakers(state, broker.namespace).states() if s.name == READINGS]
    took = []
    for _ in range(ASKS):
        started = time.monotonic()
        reply = bus.ask(GetReading(sensor="s1"), timeout=30)
        took.append(time.monotonic() - started)
        assert (reply.status, reply.value, reply.fallback) == (
            "succeeded",
            {"sensor": "s1", "n": 1},
            True,
        )
    unknown = bus.ask(GetReading(sensor="never-read"), timeout=30)
    assert time.time() < breaker.open_until  # all answered before the cool-down ended
    assert max(took) < READING_BREAKER.cooldown / 2, took  # seen: 4 to 12 ms each
    assert unknown.status == "failed"
    assert unknown.error is not None
    assert unknown.error.type == "CircuitOpen"
    assert "its fallback had no answer" in unknown.error.message
    assert state.get(broker.key(SERVICE, "readings", "runs_while_down")) == "3"  # none ran it
    quiet = f"GetReading[{unknown.correlation_id}] raised expected: CircuitOpenReply("
    wait_for(lambda: quiet in _logs(broker), timeout=10)  # a line, not an error's traceback

    state.delete(down)
    answers: list[Any] = []

    def unflagged() -> bool:
        answers.append(bus.ask(GetReading(sensor="s1"), timeout=30))
        return not answers[-1].fallback

    wait_for(unflagged, timeout=30, interval=0.2)
    assert answers[-1].value == {"sensor": "s1", "n": 2}  # the probe's run: the real answer
    assert {a.value["n"] for a in answers[:-1]} <= {1}  # until then, the last one known
    assert bus.ask(GetReading(sensor="s1"), timeout=30).value == {"sensor": "s1", "n": 3}

    # Flower shows the fallback's answer as the query task's result, and no answer as a failure
    info = _task(flower, opening.correlation_id, lambda t: t.get("state") == "SUCCESS")
    assert "'fallback': True" in info["result"]
    failed = _task(flower, unknown.correlation_id, lambda t: t.get("state") == "FAILURE")
    assert "CircuitOpenReply(" in failed["exception"]


def test_flower_shows_a_message_its_breaker_holds_as_held_until_it_runs(
    bus: MessageBus, broker: BrokerContext, flower: Flower
) -> None:
    assert "opened" in _postroom(broker, "breakers", "open", CALLS)
    pending = bus.send(CallDownstream(n=1))
    held = _task(flower, pending.correlation_id, lambda t: t.get("state") == "HELD")
    assert f"CircuitOpen(\"{CALLS}'s circuit breaker is open: held" in held["exception"]
    assert held["eta"]  # when it is back, at the earliest
    assert pending.correlation_id in flower.api("/api/tasks?state=HELD")
    assert pending.correlation_id in _searched(flower, "state:HELD")
    page = flower.get(f"/task/{pending.correlation_id}")  # the task's page, as a person sees it
    assert ">HELD</span>" in page
    assert "circuit breaker is open: held" in page

    assert "closed" in _postroom(broker, "breakers", "close", CALLS)
    assert pending.reply(timeout=60).status == "succeeded"
    _task(flower, pending.correlation_id, lambda t: t.get("state") == "SUCCESS")


def _task(flower: Flower, task_id: str, shown: Any) -> dict[str, Any]:
    """The task as Flower's API gives it, once ``shown(task)`` holds."""
    found: dict[str, Any] = {}

    def matches() -> bool:
        try:
            found.update(flower.api(f"/api/task/info/{task_id}"))
        except urllib.error.HTTPError as error:
            if error.code != 404:  # 404: Flower has no event of it yet
                raise
            return False
        return bool(shown(found))

    try:
        wait_for(matches, timeout=30, interval=0.3)
    except AssertionError:
        pytest.fail(f"Flower never showed {task_id} as expected: {found}")
    return found


def _searched(flower: Flower, search: str) -> list[str]:
    """The task IDs the tasks page lists for what is typed in its search box."""
    query = urllib.parse.urlencode(
        {
            "draw": 1,
            "start": 0,
            "length": 100,
            "search[value]": search,
            "order[0][column]": 0,
            "columns[0][data]": "received",
            "order[0][dir]": "desc",
        }
    )
    return [row["uuid"] for row in flower.api(f"/tasks/datatable?{query}")["data"]]


def _logs(broker: BrokerContext) -> str:
    return "".join(worker.output() for worker in broker.workers)


def _postroom(broker: BrokerContext, *args: str) -> str:
    return run_python(broker.env, "-m", "workers.cli", *args)
