"""postroom.testing runs the real pipeline in-process: what a user's handler test can rely on."""

from __future__ import annotations

from typing import Any

import pytest

from postroom import (
    Command,
    Delivery,
    Event,
    HandlerContext,
    Outcome,
    Query,
    Rejected,
    RetryPolicy,
    Step,
    TransientError,
    handles,
    subscribes,
)
from postroom.messages import CommandFailed
from postroom.pipeline import Next
from postroom.stores.memory import MemoryInbox
from postroom.testing import Harness

SERVICE = "harnessed"
#: what each handler did, in order: the tests read it
calls: list[str] = []


class Plant(Command, service=SERVICE):
    name: str


class Wobble(Command, service=SERVICE):
    name: str
    failures: int


class Water(Command, service=SERVICE, partition_key="bed"):
    bed: str
    seq: int
    failures: int = 0


class Prune(Command, service=SERVICE):
    """Announces a plant, then changes its mind (``reject``) or breaks (a bug)."""

    name: str
    reject: bool


class PlantTwice(Command, service=SERVICE):
    """Sends two Plant commands of its own."""

    names: list[str]


class CountPlants(Query, service=SERVICE):
    pass


class Gossip(Query, service=SERVICE):
    """A query whose handler wrongly tries to publish."""


class Planted(Event, service=SERVICE):
    name: str


@handles(Plant)
def plant(cmd: Plant, ctx: HandlerContext) -> dict[str, str]:
    if cmd.name == "weed":
        raise Rejected("no weeds")
    calls.append(f"plant {cmd.name}")
    ctx.publish(Planted(name=cmd.name))
    return {"planted": cmd.name}


@handles(Wobble)
def wobble(cmd: Wobble, ctx: HandlerContext) -> int:
    calls.append(f"wobble {ctx.attempt}")
    if ctx.attempt <= cmd.failures:
        raise TransientError(f"attempt {ctx.attempt} fails on purpose")
    return ctx.attempt


@handles(Water)
def water(cmd: Water, ctx: HandlerContext) -> int:
    calls.append(f"water {cmd.seq}:{ctx.attempt}")
    if ctx.attempt <= cmd.failures:
        raise TransientError("the hose is blocked")
    return cmd.seq


@handles(Prune)
def prune(cmd: Prune, ctx: HandlerContext) -> None:
    ctx.publish(Planted(name=cmd.name))
    if cmd.reject:
        raise Rejected("changed my mind")
    raise ValueError("a bug after publishing")


@handles(PlantTwice)
def plant_twice(cmd: PlantTwice, ctx: HandlerContext) -> list[str]:
    return [ctx.send(Plant(name=name)) for name in cmd.names]


@handles(CountPlants)
def count_plants(query: CountPlants, ctx: HandlerContext) -> int:
    return sum(1 for c in calls if c.startswith("plant "))


@handles(Gossip)
def gossip(query: Gossip, ctx: HandlerContext) -> None:
    ctx.publish(Planted(name="rumour"))


@subscribes(Planted, pool="gardeners")
def tell_gardeners(event: Planted, ctx: HandlerContext) -> None:
    calls.append(f"gardeners {event.name}")


@subscribes(Planted, pool="birds")
def tell_birds(event: Planted, ctx: HandlerContext) -> None:
    calls.append(f"birds {event.name} caused by {ctx.causation_id}")


@pytest.fixture(autouse=True)
def _forget() -> None:
    calls.clear()


def test_a_command_gets_its_reply_and_each_pool_gets_the_event(postroom_harness: Harness) -> None:
    sent = postroom_harness.send(Plant(name="rose"))
    reply = sent.reply()
    assert (reply.status, reply.value) == ("succeeded", {"planted": "rose"})
    assert reply.correlation_id == sent.correlation_id
    assert postroom_harness.events() == [Planted(name="rose")]
    assert sorted(calls) == [
        f"birds rose caused by {sent.envelope.message_id}",
        "gardeners rose",
        "plant rose",
    ]


def test_a_harness_given_pools_delivers_events_to_those_pools_only() -> None:
    harness = Harness(pools={"gardeners"})
    assert harness.send(Plant(name="fern")).reply().status == "succeeded"
    assert harness.events() == [Planted(name="fern")]  # published all the same
    assert sorted(calls) == ["gardeners fern", "plant fern"]


def test_a_rejected_command_announces_nothing_and_is_not_retried(
    postroom_harness: Harness,
) -> None:
    reply = postroom_harness.send(Plant(name="weed")).reply()
    assert reply.status == "rejected"
    assert reply.error is not None
    assert reply.error.message == "no weeds"
    assert postroom_harness.events() == []
    assert postroom_harness.dead_letters == []


def test_a_duplicate_delivery_runs_the_handler_once_and_gets_the_same_reply(
    postroom_harness: Harness,
) -> None:
    sent = postroom_harness.send(Plant(name="tulip"))
    first = sent.reply()
    postroom_harness.deliver_again(sent)
    assert sent.reply() == first
    assert calls.count("plant tulip") == 1


def test_transient_failures_are_retried_on_a_fake_clock_within_the_budget() -> None:
    harness = Harness(retry=RetryPolicy(max_retries=2, backoff=30, backoff_max=60))
    reply = harness.send(Wobble(name="a", failures=2)).reply()
    assert (reply.status, reply.value, reply.attempts) == ("succeeded", 3, 3)
    assert harness.clock.now >= 15 + 30  # two backoffs passed, none of them really waited


def test_a_command_that_keeps_failing_runs_max_retries_plus_one_times_then_is_dead_lettered() -> (
    None
):
    harness = Harness(retry=RetryPolicy(max_retries=2, backoff=0.1))
    sent = harness.send(Wobble(name="b", failures=99))
    reply = sent.reply()
    assert (reply.status, reply.attempts) == ("failed", 3)
    assert calls == ["wobble 1", "wobble 2", "wobble 3"]
    # (other test modules' subscribers of CommandFailed may be registered in this process too)
    [letter] = [d for d in harness.dead_letters if d.task == "harnessed.Wobble"]
    assert (letter.reason, letter.error_type, letter.attempts) == ("failed", "TransientError", 3)
    [failed] = harness.events(CommandFailed)
    assert (failed.command_type, failed.attempts) == ("harnessed.Wobble", 3)


class BrokenStore(MemoryInbox):
    """A store with a defect: it cannot even count a run."""

    def begin(self, owner: str, message_id: str, *, dedupe: bool = True) -> Any:
        raise RuntimeError("the store has a bug")


def test_an_error_no_step_expected_is_dead_lettered_as_a_failure_not_dropped() -> None:
    harness = Harness(stores={SERVICE: BrokenStore()})
    reply = harness.send(Plant(name="rose")).reply()
    assert (reply.status, reply.error and reply.error.type) == ("failed", "RuntimeError")
    assert calls == []
    [letter] = [d for d in harness.dead_letters if d.task == "harnessed.Plant"]
    assert (letter.reason, letter.error_message) == ("failed", "the store has a bug")
    [failed] = harness.events(CommandFailed)
    assert failed.command_type == "harnessed.Plant"


def test_a_message_whose_dead_letter_cannot_be_kept_yet_goes_back_until_it_can() -> None:
    harness = Harness(retry=RetryPolicy(max_retries=1, backoff=0.1, backoff_max=30))
    keep, refusals = harness.runtime.dead_letters.add, [ConnectionError("Redis is away")] * 2

    def add_once_back(letter: Any) -> str:  # the dead letters' store answers at the third try
        if refusals:
            raise refusals.pop()
        return keep(letter)

    harness.runtime.dead_letters.add = add_once_back  # type: ignore[method-assign]
    reply = harness.send(Wobble(name="c", failures=99)).reply()
    assert reply.status == "failed"
    # its budget spent, each return runs it once more: the failure that follows keeps it at once
    assert calls == ["wobble 1", "wobble 2", "wobble 3", "wobble 4"]
    assert [d.task for d in harness.dead_letters if d.task == "harnessed.Wobble"] == [
        "harnessed.Wobble"
    ]
    assert harness.clock.now >= 2 * 30  # it waited the longest backoff each time


def test_a_partitioned_command_is_retried_in_place_before_the_ones_behind_it() -> None:
    # pools=(): no subscriber of CommandFailed another module registered adds letters of its own
    harness = Harness(retry=RetryPolicy(max_retries=2, backoff=0.1), pools=())
    first = harness.send(Water(bed="north", seq=0, failures=99))
    harness.send(Water(bed="north", seq=1))  # parked behind the first once it fails for good
    other = harness.send(Water(bed="south", seq=2))
    assert first.reply().status == "failed"
    assert other.reply().status == "succeeded"
    assert calls == ["water 0:1", "water 0:2", "water 0:3", "water 2:1"]
    assert [d.reason for d in harness.dead_letters] == ["failed", "parked"]


def test_an_event_published_before_a_rejection_is_never_delivered(
    postroom_harness: Harness,
) -> None:
    reply = postroom_harness.send(Prune(name="ivy", reject=True)).reply()
    assert reply.status == "rejected"
    assert postroom_harness.events() == []
    assert not any(c.startswith(("gardeners", "birds")) for c in calls)


def test_a_command_that_fails_after_publishing_announces_only_command_failed(
    postroom_harness: Harness,
) -> None:
    reply = postroom_harness.send(Prune(name="ivy", reject=False)).reply()
    assert reply.status == "failed"
    assert [type(e) for e in postroom_harness.events()] == [CommandFailed]
    assert not any(c.startswith(("gardeners", "birds")) for c in calls)


def test_commands_a_handler_sends_go_out_after_it_commits(postroom_harness: Harness) -> None:
    sent = postroom_harness.send(PlantTwice(names=["elm", "yew"]))
    ids = sent.reply().value
    assert [postroom_harness.replies[i].value for i in ids] == [
        {"planted": "elm"},
        {"planted": "yew"},
    ]
    # each starts a conversation of its own: its reply is stored under its message ID
    assert all(postroom_harness.replies[i].correlation_id == i for i in ids)


def test_a_query_cannot_publish(postroom_harness: Harness) -> None:
    reply = postroom_harness.ask(Gossip())
    assert reply.status == "failed"
    assert reply.error is not None
    assert "a query changes nothing and announces nothing" in reply.error.message


def test_a_query_is_answered_from_what_the_handlers_did(postroom_harness: Harness) -> None:
    for name in ("oak", "ash"):
        postroom_harness.send(Plant(name=name))
    assert postroom_harness.ask(CountPlants()).value == 2


class AuditLog(Step):
    """The README's example of a user's own step."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        outcome = call_next(delivery)
        self.seen.append(f"{delivery.name} {outcome.status}")
        return outcome


def test_a_users_own_step_sees_every_handling() -> None:
    audit = AuditLog()
    harness = Harness(steps=[audit])
    harness.send(Plant(name="fern")).reply()
    harness.send(Plant(name="weed")).reply()
    assert audit.seen == [
        "harnessed.Plant succeeded",
        "harnessed.Planted@birds handled",
        "harnessed.Planted@gardeners handled",
        "harnessed.Plant rejected",
    ]


def test_a_signed_harness_checks_signatures_like_a_worker() -> None:
    harness = Harness(signing_keys=["k1"])
    assert harness.send(Plant(name="moss")).reply().status == "succeeded"
