"""Circuit breakers in the harness, on its fake clock: a 30 s outage of a downstream costs a test
nothing, and every run of the handler is counted."""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis

from postroom import (
    CircuitBreaker,
    CircuitClosed,
    CircuitOpened,
    Command,
    Event,
    Rejected,
    RetryPolicy,
    TransientError,
    handles,
    subscribes,
)
from postroom.breakers import Admission, Breakers, Change, Limits, MemoryBreakers
from postroom.testing import Harness

SERVICE = "breakered"
#: until when (harness time) the downstream is down
outage = {"until": 0.0}
#: (handler, harness time) of every run
runs: list[tuple[str, float]] = []


class Charge(Command, service=SERVICE):
    n: int


class Ping(Command, service=SERVICE):
    n: int


class Refund(Command, service=SERVICE):
    n: int


class Crash(Command, service=SERVICE):
    n: int


class Plain(Command, service=SERVICE):
    n: int


class Unguarded(Command, service=SERVICE):
    n: int


class Settle(Command, service=SERVICE, partition_key="account"):
    account: str


class Wobble(Command, service=SERVICE):
    n: int


class Defaulted(Command, service=SERVICE):
    n: int


class Charged(Event, service=SERVICE):
    n: int


def _downstream(harness_now: float, name: str) -> None:
    runs.append((name, harness_now))
    if harness_now < outage["until"]:
        raise TransientError("the payment provider does not answer")


@handles(Charge, breaker=CircuitBreaker(failures=3, cooldown=10))
def charge(cmd: Charge, ctx: object) -> int:
    _downstream(HARNESS[0].clock.now, "charge")
    return cmd.n


@handles(Ping)
def ping(cmd: Ping, ctx: object) -> int:
    runs.append(("ping", HARNESS[0].clock.now))
    return cmd.n


@handles(Refund, breaker=CircuitBreaker(failures=3, cooldown=10))
def refund(cmd: Refund, ctx: object) -> None:
    runs.append(("refund", HARNESS[0].clock.now))
    raise Rejected("nothing to refund")


@handles(Crash, breaker=CircuitBreaker(failures=2, cooldown=10))
def crash(cmd: Crash, ctx: object) -> None:
    runs.append(("crash", HARNESS[0].clock.now))
    if HARNESS[0].clock.now < outage["until"]:
        raise ValueError("a bug")


@handles(Plain)
def plain(cmd: Plain, ctx: object) -> int:
    _downstream(HARNESS[0].clock.now, "plain")
    return cmd.n


@handles(Unguarded, breaker=False)
def unguarded(cmd: Unguarded, ctx: object) -> int:
    _downstream(HARNESS[0].clock.now, "unguarded")
    return cmd.n


@handles(Settle, breaker=CircuitBreaker(failures=1, cooldown=10))
def settle(cmd: Settle, ctx: object) -> None:
    _downstream(HARNESS[0].clock.now, "settle")


@handles(Wobble, breaker=CircuitBreaker(failures=100, cooldown=10, ratio=0.5, window=60))
def wobble(cmd: Wobble, ctx: object) -> None:
    """Fails every other run while the downstream is unwell: never three in a row."""
    runs.append(("wobble", HARNESS[0].clock.now))
    if HARNESS[0].clock.now < outage["until"] and _runs("wobble") % 2:
        raise TransientError("every other call times out")


@handles(Defaulted, breaker=True)
def defaulted(cmd: Defaulted, ctx: object) -> int:
    _downstream(HARNESS[0].clock.now, "defaulted")
    return cmd.n


@subscribes(Charged, pool="ledger", breaker=CircuitBreaker(failures=2, cooldown=5))
def book(event: Charged, ctx: object) -> None:
    _downstream(HARNESS[0].clock.now, "book")


HARNESS: list[Harness] = []


@pytest.fixture
def harness() -> Harness:
    runs.clear()
    outage["until"] = 0.0
    HARNESS[:] = [Harness(retry=RetryPolicy(max_retries=5, backoff=1.0, backoff_max=4.0))]
    return HARNESS[0]


def _runs(name: str, before: float = float("inf")) -> int:
    return sum(1 for who, at in runs if who == name and at < before)


def test_an_outage_holds_the_messages_and_they_all_succeed_once_it_ends(
    harness: Harness,
) -> None:
    outage["until"] = 30.0
    sent = [harness.send(Charge(n=n)) for n in range(100)]
    pings = [harness.send(Ping(n=n)) for n in range(20)]
    harness.run()
    assert [s.reply().status for s in sent] == ["succeeded"] * 100
    assert harness.dead_letters == []
    # 3 failures open it; it stays open 10 s, then one probe fails at 10 s and one at 20 s
    assert _runs("charge", before=30.0) == 3 + 2
    assert _runs("charge") == 3 + 2 + 100
    # the other handler of the service did not wait for the outage
    assert [p.reply().status for p in pings] == ["succeeded"] * 20
    assert {at for who, at in runs if who == "ping"} == {0.0}
    assert harness.events(CircuitOpened) == [
        CircuitOpened(
            owner=SERVICE,
            message_type="breakered.Charge",
            failures=3,
            cooldown=10.0,
            error_type="TransientError",
            error_message="the payment provider does not answer",
        )
    ]
    assert harness.events(CircuitClosed) == [
        CircuitClosed(owner=SERVICE, message_type="breakered.Charge")
    ]


def test_a_held_message_spends_no_attempt(harness: Harness) -> None:
    outage["until"] = 30.0
    sent = [harness.send(Charge(n=n)) for n in range(4)]
    harness.run()
    # each run is one attempt; waiting, held, for the cool-downs to end is none
    assert sum(s.reply().attempts for s in sent) == _runs("charge") == 3 + 2 + 4


def test_a_message_that_keeps_failing_is_still_dead_lettered_after_its_budget(
    harness: Harness,
) -> None:
    outage["until"] = float("inf")
    reply = harness.send(Charge(n=1)).reply()
    assert (reply.status, reply.attempts) == ("failed", 6)
    assert _runs("charge") == 6  # 3 that opened it, then 3 probes, one per cool-down
    letters = [letter for letter in harness.dead_letters if letter.task == "breakered.Charge"]
    assert [letter.reason for letter in letters] == ["failed"]


def test_a_rejection_is_not_a_failure(harness: Harness) -> None:
    replies = [harness.send(Refund(n=n)).reply() for n in range(10)]
    assert {r.status for r in replies} == {"rejected"}
    assert {at for who, at in runs if who == "refund"} == {0.0}  # none was held
    assert harness.events(CircuitOpened) == []


def test_a_bug_counts_as_a_failure(harness: Harness) -> None:
    outage["until"] = 15.0
    sent = [harness.send(Crash(n=n)) for n in range(5)]
    replies = [s.reply() for s in sent]
    # the two that opened it failed at once, as a bug does; the others waited for a probe
    assert [r.status for r in replies].count("failed") == 3  # two, and the probe at 10 s
    assert [r.status for r in replies].count("succeeded") == 2
    assert _runs("crash", before=15.0) == 2 + 1
    assert len(harness.events(CircuitOpened)) == 1


def test_an_event_handler_has_a_breaker_of_its_own_per_pool(harness: Harness) -> None:
    outage["until"] = 12.0
    for n in range(10):
        harness.publish(Charged(n=n))
    harness.run()
    assert harness.dead_letters == []
    assert _runs("book", before=12.0) == 2 + 2  # probes at 5 s and 10 s
    assert _runs("book") == 4 + 10
    assert [e.message_type for e in harness.events(CircuitOpened)] == ["breakered.Charged"]


def test_the_settings_give_every_handler_one_unless_it_declines() -> None:
    harness = Harness(breaker_failures=2, breaker_cooldown=5)
    HARNESS[:] = [harness]
    runs.clear()
    outage["until"] = 7.0
    for n in range(5):
        harness.send(Plain(n=n))
        harness.send(Unguarded(n=n))
    harness.run()
    assert _runs("plain", before=7.0) == 2 + 1  # one probe, at 5 s
    assert _runs("unguarded", before=0.5) == 5  # no breaker: all five ran at once, and failed


def test_without_a_declaration_or_a_setting_there_is_no_breaker(harness: Harness) -> None:
    outage["until"] = 2.0
    sent = [harness.send(Plain(n=n)) for n in range(10)]
    assert {s.reply().status for s in sent} == {"succeeded"}
    assert _runs("plain", before=0.5) == 10
    assert harness.events(CircuitOpened) == []


def test_a_partitioned_command_is_never_held(harness: Harness) -> None:
    outage["until"] = 3.0
    sent = [harness.send(Settle(account="a")) for _ in range(3)]
    assert [s.reply().status for s in sent] == ["succeeded"] * 3
    # retried in place, in order, as if it had no breaker: it keeps its partition's order
    assert harness.events(CircuitOpened) == []


class Unreachable(MemoryBreakers):
    def admit(self, name: str, now: float, limits: Limits) -> Admission:
        raise redis.exceptions.ConnectionError("the state Redis is away")

    def record(
        self, name: str, ok: bool, probe: bool, now: float, limits: Limits
    ) -> tuple[Change, int]:
        raise redis.exceptions.ConnectionError("the state Redis is away")


def test_a_breaker_whose_state_cannot_be_reached_stands_aside(harness: Harness) -> None:
    harness.runtime = replace(harness.runtime, breakers=Breakers(Unreachable()))
    outage["until"] = 1.0
    sent = [harness.send(Charge(n=n)) for n in range(5)]
    assert [s.reply().status for s in sent] == ["succeeded"] * 5
    assert _runs("charge", before=0.5) == 5  # none was held


def test_a_failure_ratio_opens_it_with_no_long_run_of_failures(harness: Harness) -> None:
    outage["until"] = 25.0
    sent = [harness.send(Wobble(n=n)) for n in range(30)]
    assert {s.reply().status for s in sent} == {"succeeded"}
    assert harness.dead_letters == []
    opened = harness.events(CircuitOpened)
    assert opened  # each time a window's 10 runs or more had half of them fail
    assert {o.failures >= 5 for o in opened} == {True}
    assert len(harness.events(CircuitClosed)) == len(opened)
    # the 11th run, the 6th to fail, opened it at 0 s (it opens on a failure); then nothing
    # ran until the probe at 10 s
    assert _runs("wobble", before=0.1) == 11
    assert not [at for who, at in runs if who == "wobble" and 0 < at < 10]


def test_a_breaker_declared_with_true_and_no_setting_opens_after_five_for_30_s(
    harness: Harness,
) -> None:
    outage["until"] = 40.0
    sent = [harness.send(Defaulted(n=n)) for n in range(20)]
    assert {s.reply().status for s in sent} == {"succeeded"}
    assert _runs("defaulted", before=40.0) == 5 + 1  # one probe, at 30 s
    assert [(o.failures, o.cooldown) for o in harness.events(CircuitOpened)] == [(5, 30.0)]
