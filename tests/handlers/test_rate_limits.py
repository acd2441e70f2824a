"""Rate limits in the harness, on its fake clock: every run's time is exact, so the spacing of a
limit's slots, and what waits where, can be asserted to the millisecond."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
import redis

from postroom import (
    CircuitBreaker,
    CircuitOpened,
    Command,
    ContractError,
    Event,
    RateLimit,
    RetryPolicy,
    TransientError,
    handles,
    subscribes,
)
from postroom.ratelimits import LATE, MemoryRateLimits, Slot
from postroom.testing import Harness

SERVICE = "limited"
#: (handler, harness time) of every run
runs: list[tuple[str, float]] = []
HARNESS: list[Harness] = []
#: keys whose first run fails with a transient error
flaky: set[int] = set()
flaky_settle: set[int] = set()


class CallVendor(Command, service=SERVICE):
    n: int


class Ping(Command, service=SERVICE):
    n: int


class Settle(Command, service=SERVICE, partition_key="account"):
    account: str
    n: int


class Shipped(Event):
    n: int


class Charge(Command, service=SERVICE):
    n: int


class Refund(Command, service=SERVICE):
    n: int


def _run(name: str) -> None:
    runs.append((name, HARNESS[0].clock.now))


@handles(CallVendor, rate_limit=RateLimit(50, per=1.0))
def call_vendor(cmd: CallVendor, ctx: object) -> int:
    _run("vendor")
    if cmd.n in flaky:
        flaky.discard(cmd.n)
        raise TransientError("the vendor hiccupped")
    return cmd.n


@handles(Ping)
def ping(cmd: Ping, ctx: object) -> int:
    _run("ping")
    return cmd.n


@handles(Settle, rate_limit="10/s")
def settle(cmd: Settle, ctx: object) -> int:
    _run(f"settle {cmd.account} {cmd.n}")
    if cmd.n in flaky_settle:
        flaky_settle.discard(cmd.n)
        raise TransientError("the ledger hiccupped")
    return cmd.n


@subscribes(Shipped, pool="mailer", rate_limit="2/m")
def mail(event: Shipped, ctx: object) -> None:
    _run("mail")


@handles(Charge, rate_limit="5/s", breaker=CircuitBreaker(failures=1, cooldown=10))
def charge(cmd: Charge, ctx: object) -> None:
    _run("charge")
    if HARNESS[0].clock.now < 1.0:
        raise TransientError("the provider is away")


@handles(Refund, rate_limit="1/s", breaker=CircuitBreaker(failures=2, cooldown=10))
def refund(cmd: Refund, ctx: object) -> None:
    _run("refund")
    if HARNESS[0].clock.now < 1.5:
        raise TransientError("the provider is away")


@pytest.fixture
def harness() -> Harness:
    runs.clear()
    flaky.clear()
    flaky_settle.clear()
    HARNESS[:] = [Harness(retry=RetryPolicy(max_retries=5, backoff=1.0, backoff_max=1.0))]
    return HARNESS[0]


def _times(name: str) -> list[float]:
    return [at for who, at in runs if who == name]


def test_a_backlog_runs_at_the_limit_evenly_spaced_and_none_is_lost(harness: Harness) -> None:
    sent = [harness.send(CallVendor(n=n)) for n in range(200)]
    assert [s.reply().status for s in sent] == ["succeeded"] * 200
    times = _times("vendor")
    assert len(times) == 200
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) == pytest.approx(0.02)  # one slot every 1/50 s, never two at once
    assert times[-1] == pytest.approx(199 * 0.02)
    assert max(Counter(int(t) for t in times).values()) == 50  # 50 in each second
    assert harness.dead_letters == []


def test_a_held_message_runs_on_its_return_without_asking_again(harness: Harness) -> None:
    sent = [harness.send(CallVendor(n=n)) for n in range(200)]
    deliveries = harness.run()
    assert all(s.reply().status == "succeeded" for s in sent)
    # the first ran at once; 199 went to the broker once each and ran on their return
    assert deliveries == 200 + 199


def test_another_handler_of_the_pool_is_not_slowed(harness: Harness) -> None:
    vendor = [harness.send(CallVendor(n=n)) for n in range(100)]
    pings = [harness.send(Ping(n=n)) for n in range(10)]
    assert [p.reply().status for p in pings] == ["succeeded"] * 10
    assert all(v.reply().status == "succeeded" for v in vendor)
    assert max(_times("ping")) < 0.2  # while the vendor's backlog takes 2 s
    assert max(_times("vendor")) == pytest.approx(99 * 0.02)


def test_a_retry_asks_for_a_new_slot(harness: Harness) -> None:
    flaky.update({0, 1, 2})
    sent = [harness.send(CallVendor(n=n)) for n in range(20)]
    assert [s.reply().attempts for s in sent[:4]] == [2, 2, 2, 1]
    times = sorted(_times("vendor"))
    assert len(times) == 23
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.02 - 1e-9  # the retries' runs are within the limit too


def test_a_partitioned_message_waits_in_place_keeping_its_order(harness: Harness) -> None:
    sent = [harness.send(Settle(account="a", n=n)) for n in range(10)]
    deliveries = harness.run()
    assert all(s.reply().status == "succeeded" for s in sent)
    assert deliveries == 10  # none went back to the broker
    assert [who for who, _ in runs] == [f"settle a {n}" for n in range(10)]
    assert [at for _, at in runs] == pytest.approx([n * 0.1 for n in range(10)])


def test_a_pools_event_handler_has_a_limit_of_its_own(harness: Harness) -> None:
    for n in range(4):
        harness.publish(Shipped(n=n))
    harness.run()
    assert _times("mail") == pytest.approx([0.0, 30.0, 60.0, 90.0])  # "2/m": every 30 s


def test_a_message_held_by_an_open_breaker_spends_no_slot(harness: Harness) -> None:
    sent = [harness.send(Charge(n=n)) for n in range(10)]
    assert {s.reply().status for s in sent} == {"succeeded"}
    times = _times("charge")
    # the first run opened the breaker; 10 s later the probe ran, then the rest in their
    # slots, 0.2 s apart (slots spent while it was open would have been taken by now)
    assert times[0] == 0.0
    assert times[1:] == pytest.approx([10.0 + 0.2 * k for k in range(10)], abs=0.01)


def test_a_message_the_limit_holds_is_no_run_for_the_breaker(harness: Harness) -> None:
    sent = [harness.send(Refund(n=n)) for n in range(2)]
    assert {s.reply().status for s in sent} == {"succeeded"}
    # the first failed at 0 (1 in a row), the second was held until its slot at 1 s and failed
    # there: 2 in a row, though held meanwhile (counted a success, the hold would have made
    # it 1, and the first's retry, in the slot at 2 s, would have found the provider back)
    assert len(harness.events(CircuitOpened)) == 1
    assert _times("refund")[:2] == [0.0, 1.0]


def test_a_partitioned_message_retried_in_place_does_not_ask_again(harness: Harness) -> None:
    flaky_settle.add(0)
    sent = [harness.send(Settle(account="b", n=n)) for n in range(3)]
    assert [s.reply().attempts for s in sent] == [2, 1, 1]
    times = [at for who, at in runs if who.startswith("settle b")]
    assert times[0] == 0.0
    assert 0.5 <= times[1] <= 1.0  # its retry: after the backoff, not in a slot of its own
    assert times[2] == times[1]  # the next had its slot (0.1 s) long passed: it ran at once
    assert times[3] == pytest.approx(times[2] + 0.1)


def test_a_limit_that_cannot_be_read_holds_its_messages(harness: Harness) -> None:
    harness.runtime = replace(harness.runtime, rate_limits=Unreachable())
    harness.send(CallVendor(n=1))
    with pytest.raises(RuntimeError, match="still 1 message"):
        harness.run(max_messages=20)  # held again and again, a second each
    assert runs == []
    assert harness.clock.now == pytest.approx(19.0)
    assert harness.dead_letters == []


class Unreachable(MemoryRateLimits):
    def take(self, name: str, now: float, interval: float, carried: str, in_place: float) -> Slot:
        raise redis.exceptions.ConnectionError("the state Redis is away")


def test_a_reservation_is_spent_once() -> None:
    limits = MemoryRateLimits()
    taken = [limits.take("s:T", 0.0, 1.0, "", 0.1) for _ in range(10)]
    assert [(s.wait, bool(s.token)) for s in taken[:3]] == [(0.0, False), (1.0, True), (2.0, True)]
    assert limits.take("s:T", 1.0, 1.0, taken[1].token, 0.1) == Slot()  # runs on its return
    again = limits.take("s:T", 1.0, 1.0, taken[1].token, 0.1)  # a redelivered copy asks anew
    assert again.wait == pytest.approx(9.0)
    assert again.token


def test_a_late_message_runs_only_where_it_leaves_the_limit_room() -> None:
    limits = MemoryRateLimits()
    taken = [limits.take("s:T", 0.0, 1.0, "", 0.1) for _ in range(5)]  # slots 0 to 4
    # slots 1 to 3 passed unused: their messages queued behind others; back at 3.5 and 4.4
    assert limits.take("s:T", 3.5, 1.0, taken[1].token, 0.1) == Slot()  # room: it runs
    second = limits.take("s:T", 3.5, 1.0, taken[2].token, 0.1)  # none for a second at once
    assert second.token
    assert second.wait == pytest.approx(1.5)  # asked anew: slot 5
    third = limits.take("s:T", 4.4, 1.0, taken[3].token, 0.1)  # a run's room, 0.05 s ahead
    assert third == Slot(pytest.approx(0.05))
    fourth = limits.take("s:T", 5.0, 1.0, taken[4].token, 0.1)
    assert fourth.wait == pytest.approx(1.0)  # slot 6: never two runs within an interval
    lapsed = limits.take("s:T", 5.0 + LATE + 1, 1.0, second.token, 0.1)
    assert lapsed == Slot()  # its reservation was dropped; the limit is free by then


def test_a_limit_is_written_as_celery_writes_it() -> None:
    assert RateLimit.parse("50/s") == RateLimit(50, per=1.0)
    assert RateLimit.parse("100/m") == RateLimit(100, per=60.0)
    assert RateLimit.parse("1000/h").interval == pytest.approx(3.6)
    for wrong in ("50", "50/d", "0/s", "fast"):
        with pytest.raises(ContractError):
            RateLimit.parse(wrong)
    with pytest.raises(ContractError, match="RateLimit"):
        RateLimit(0)
