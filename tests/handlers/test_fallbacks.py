"""A query's fallback in the harness: while its breaker is open the fallback answers at once, on
the harness's fake clock (no cool-down passes), and the reply says it is a fallback."""

from __future__ import annotations

import pytest

from postroom import (
    CircuitBreaker,
    CircuitOpened,
    Command,
    ContractError,
    HandlerContext,
    Query,
    RetryPolicy,
    TransientError,
    handles,
)
from postroom.testing import Harness

SERVICE = "quoting"
COOLDOWN = 20.0
#: whether the market data feed answers, and the runs of the handler
feed = {"up": True, "runs": 0, "price": 100, "down_until": 0.0}
#: the last quote given for each symbol: the fallback's answer
last: dict[str, dict[str, object]] = {}


class GetQuote(Query, service=SERVICE):
    symbol: str


class GetSpread(Query, service=SERVICE):
    """Its fallback breaks: the query fails at once instead."""

    symbol: str


class GetVolume(Query, service=SERVICE):
    """Behind a breaker and without a fallback: held, as a command is."""

    symbol: str


class PlaceOrder(Command, service=SERVICE):
    symbol: str


class GetDepth(Query, service=SERVICE, partition_key="symbol"):
    symbol: str


def _feed() -> int:
    feed["runs"] += 1
    if not feed["up"]:
        raise TransientError("the market data feed does not answer")
    return feed["price"]


def last_quote(query: GetQuote, ctx: HandlerContext) -> dict[str, object] | None:
    assert ctx.correlation_id  # a context like the handler's
    return last.get(query.symbol)


@handles(GetQuote, breaker=CircuitBreaker(failures=3, cooldown=COOLDOWN), fallback=last_quote)
def get_quote(query: GetQuote, ctx: HandlerContext) -> dict[str, object]:
    quote = last[query.symbol] = {"symbol": query.symbol, "price": _feed()}
    return quote


def broken(query: GetSpread, ctx: HandlerContext) -> int:
    raise KeyError(query.symbol)


@handles(GetSpread, breaker=CircuitBreaker(failures=1, cooldown=COOLDOWN), fallback=broken)
def get_spread(query: GetSpread, ctx: HandlerContext) -> int:
    return _feed()


@handles(GetVolume, breaker=CircuitBreaker(failures=1, cooldown=COOLDOWN))
def get_volume(query: GetVolume, ctx: HandlerContext) -> int:
    feed["up"] = HARNESS[0].clock.now >= feed["down_until"]
    return _feed()


HARNESS: list[Harness] = []


@pytest.fixture
def harness() -> Harness:
    feed.update(up=True, runs=0, price=100, down_until=0.0)
    last.clear()
    HARNESS[:] = [Harness(retry=RetryPolicy(max_retries=5, backoff=1.0, backoff_max=1.0))]
    return HARNESS[0]


def _opened(harness: Harness) -> None:
    """Asks once while the feed is down: it fails 3 times, opening the breaker, and its fourth
    arrival is answered by the fallback."""
    feed["up"] = False
    harness.ask(GetQuote(symbol="ACME"))
    assert len(harness.events(CircuitOpened)) == 1


def test_while_its_breaker_is_open_a_query_gets_the_fallbacks_answer_at_once(
    harness: Harness,
) -> None:
    first = harness.ask(GetQuote(symbol="ACME"))
    assert (first.value, first.fallback) == ({"symbol": "ACME", "price": 100}, False)
    feed["up"] = False
    reply = harness.ask(GetQuote(symbol="ACME"))  # fails 3 times, then the fallback answers
    assert (reply.status, reply.fallback, feed["runs"]) == ("succeeded", True, 1 + 3)
    opened_at = harness.clock.now
    replies = [harness.ask(GetQuote(symbol="ACME")) for _ in range(10)]
    assert {(r.status, r.fallback) for r in replies} == {("succeeded", True)}
    assert [r.value for r in replies] == [{"symbol": "ACME", "price": 100}] * 10
    assert harness.clock.now == opened_at  # answered without waiting for the cool-down
    assert feed["runs"] == 1 + 3  # nor running the handler
    assert harness.dead_letters == []


def test_after_the_cool_down_the_probe_brings_the_real_answer_back_unflagged(
    harness: Harness,
) -> None:
    harness.ask(GetQuote(symbol="ACME"))
    _opened(harness)
    feed.update(up=True, price=105)
    harness.clock.sleep(COOLDOWN)
    reply = harness.ask(GetQuote(symbol="ACME"))  # the probe: it succeeds and closes it
    assert (reply.value, reply.fallback) == ({"symbol": "ACME", "price": 105}, False)
    assert harness.ask(GetQuote(symbol="ACME")).fallback is False


def test_a_fallback_with_no_answer_fails_the_query_at_once(harness: Harness) -> None:
    _opened(harness)
    reply = harness.ask(GetQuote(symbol="NEVER-ASKED"))
    assert (reply.status, reply.fallback) == ("failed", False)
    assert reply.error is not None
    assert reply.error.type == "CircuitOpen"
    assert "its fallback had no answer" in reply.error.message
    assert harness.dead_letters == []  # a query changes nothing: there is nothing to redo


def test_a_fallback_that_raises_fails_the_query_at_once_saying_why(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    feed["up"] = False
    with caplog.at_level("WARNING", logger="postroom.breakers"):
        reply = harness.ask(GetSpread(symbol="ACME"))
    (logged,) = [r for r in caplog.records if "the fallback raised" in r.getMessage()]
    assert logged.exc_info is not None
    assert reply.error is not None
    assert (reply.status, reply.error.type) == ("failed", "CircuitOpen")
    assert "its fallback raised KeyError('ACME')" in reply.error.message
    assert feed["runs"] == 1  # the run that opened it; then the fallback, not a hold
    assert harness.dead_letters == []


def test_a_query_without_a_fallback_is_held_as_before(harness: Harness) -> None:
    feed["down_until"] = 1.0
    reply = harness.ask(GetVolume(symbol="ACME"))  # fails, opens it; its retry waits
    assert (reply.status, reply.fallback, reply.attempts) == ("succeeded", False, 2)
    assert harness.clock.now >= COOLDOWN  # held until the cool-down ended: then the probe ran


def test_a_fallback_on_a_command_is_refused_saying_what_to_do() -> None:
    with pytest.raises(ContractError, match=r"PlaceOrder is a command.*Leave fallback= out"):
        handles(PlaceOrder, breaker=True, fallback=last_quote)


@pytest.mark.parametrize("breaker", [None, False])
def test_a_fallback_needs_a_breaker_of_its_own(breaker: bool | None) -> None:
    with pytest.raises(ContractError, match=r"declare one, breaker=CircuitBreaker"):
        handles(GetQuote, breaker=breaker, fallback=last_quote)


def test_a_fallback_on_a_partitioned_query_is_refused() -> None:
    with pytest.raises(ContractError, match="GetDepth is partitioned"):
        handles(GetDepth, breaker=True, fallback=last_quote)


def test_a_fallback_must_be_a_function() -> None:
    with pytest.raises(ContractError, match="takes a function"):
        handles(GetQuote, breaker=True, fallback={"price": 1})  # type: ignore[arg-type]
