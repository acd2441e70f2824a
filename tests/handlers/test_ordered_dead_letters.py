"""Dead letters that keep order, in the harness: a dead-lettered key's later messages wait behind
it, other keys flow, and a redrive runs the whole line in send order (postroom.parking). Each
harness has ``pools=()``: the CommandFailed of a failed command reaches no subscriber another
test module registered, so the letters are the test's own."""

from __future__ import annotations

import pytest

from postroom import Command, HandlerContext, OutOfLine, handles
from postroom.testing import Harness

SERVICE = "lined"
#: (key, seq) of every run that got past the failure switch, in order
ran: list[tuple[str, int]] = []
#: (key, seq) whose handler fails for good while in here
failing: set[tuple[str, int]] = set()


class Deliver(Command, service=SERVICE, partition_key="parcel"):
    parcel: str
    seq: int


class Unordered(Command, service=SERVICE):
    parcel: str


class Broken(Exception):
    """Not transient: the message is dead-lettered at once."""


@handles(Deliver)
def deliver(cmd: Deliver, ctx: HandlerContext) -> None:
    if (cmd.parcel, cmd.seq) in failing:
        raise Broken(f"{cmd.parcel}#{cmd.seq} fails on purpose")
    ran.append((cmd.parcel, cmd.seq))


@handles(Unordered)
def unordered(cmd: Unordered, ctx: HandlerContext) -> None:
    ran.append((cmd.parcel, -1))


@pytest.fixture(autouse=True)
def clean() -> None:
    ran.clear()
    failing.clear()


def sequence(parcel: str) -> list[int]:
    return [seq for key, seq in ran if key == parcel]


def send(harness: Harness, parcels: list[str], seqs: range) -> None:
    for seq in seqs:
        for parcel in parcels:
            harness.send(Deliver(parcel=parcel, seq=seq))
    harness.run()


def test_the_messages_after_a_dead_letter_of_the_same_key_are_parked_and_other_keys_flow() -> None:
    harness = Harness(
        partitions=1, pools=()
    )  # every key in one queue: b and c pass a's parked ones
    failing.add(("a", 2))
    send(harness, ["a", "b", "c"], range(6))
    assert sequence("a") == [0, 1]
    assert sequence("b") == sequence("c") == list(range(6))
    head, *parked = [letter for letter in harness.dead_letters if letter.partition == "a"]
    assert (head.reason, head.error_type, head.kwargs) == (
        "failed",
        "Broken",
        {"parcel": "a", "seq": 2},
    )
    assert [(letter.reason, letter.kwargs["seq"]) for letter in parked if letter.kwargs] == [
        ("parked", 3), ("parked", 4), ("parked", 5)
    ]  # fmt: skip
    assert "parcel=a was dead-lettered" in parked[0].error_message


def test_redriving_the_head_runs_it_and_its_parked_messages_in_send_order_with_their_ids() -> None:
    harness = Harness(pools=())
    failing.update({("a", 2), ("b", 0)})
    send(harness, ["a", "b", "c"], range(5))
    ids = {
        letter.kwargs["seq"]: letter.headers
        for letter in harness.dead_letters
        if letter.kwargs and letter.partition == "a"
    }
    failing.clear()
    done = harness.redrive()
    assert len(done) == 2  # the two heads; their parked ones follow them
    assert "the 2 message(s) parked behind it follow it" in " ".join(done)
    harness.run()
    assert sequence("a") == sequence("b") == sequence("c") == list(range(5))
    assert harness.dead_letters == []
    replies = [harness.replies[h["postroom.correlation_id"]] for h in ids.values()]
    assert [r.causation_id for r in replies] == [h["postroom.message_id"] for h in ids.values()]
    send(harness, ["a"], range(5, 7))  # the key flows again
    assert sequence("a") == list(range(7))


def test_messages_sent_while_a_line_drains_join_its_tail_and_keep_their_order() -> None:
    harness = Harness(pools=())
    failing.add(("a", 0))
    send(harness, ["a"], range(3))
    failing.clear()
    harness.redrive()
    for seq in range(3, 6):  # queued ahead of the redriven head, and behind it
        harness.send(Deliver(parcel="a", seq=seq))
    harness.run()
    assert sequence("a") == list(range(6))
    assert harness.dead_letters == []


def test_a_redriven_message_that_fails_again_heads_its_line_again() -> None:
    harness = Harness(pools=())
    failing.update({("a", 1), ("a", 3)})
    send(harness, ["a"], range(5))
    failing.discard(("a", 1))
    harness.redrive()
    harness.run()
    assert sequence("a") == [0, 1, 2]
    [head] = [letter for letter in harness.dead_letters if letter.reason == "failed"]
    assert head.kwargs == {"parcel": "a", "seq": 3}
    assert [letter.kwargs for letter in harness.dead_letters if letter.reason == "parked"] == [
        {"parcel": "a", "seq": 4}
    ]
    send(harness, ["a"], range(5, 6))
    assert sequence("a") == [0, 1, 2]  # still parked behind seq 3
    failing.clear()
    harness.redrive()
    harness.run()
    assert sequence("a") == list(range(6))


def test_a_parked_letter_alone_cannot_be_redriven_or_purged() -> None:
    harness = Harness(pools=())
    failing.add(("a", 0))
    send(harness, ["a"], range(3))
    head, parked, _ = harness.dead_letters
    with pytest.raises(OutOfLine, match=f"parked behind {head.id}.*redrive {head.id}"):
        harness.redrive(parked.id)
    with pytest.raises(OutOfLine, match=f"parked behind {head.id}"):
        harness.purge(parked.id)
    assert len(harness.dead_letters) == 3


def test_purging_a_head_leaves_its_parked_messages_parked_behind_the_next_one() -> None:
    harness = Harness(pools=())
    failing.add(("a", 0))
    send(harness, ["a"], range(3))
    head, first, _ = harness.dead_letters
    said = harness.purge(head.id)
    assert f"{first.id} now at the head" in said
    send(harness, ["a"], range(3, 4))
    assert sequence("a") == []  # still parked
    failing.clear()
    harness.redrive(first.id)
    harness.run()
    assert sequence("a") == [1, 2, 3]  # seq 0 was purged: never run


def test_a_duplicate_of_a_parked_message_is_kept_once() -> None:
    harness = Harness(pools=())
    failing.add(("a", 0))
    harness.send(Deliver(parcel="a", seq=0))
    later = harness.send(Deliver(parcel="a", seq=1))
    harness.run()
    harness.deliver_again(later)
    harness.run()
    assert [letter.reason for letter in harness.dead_letters] == ["failed", "parked"]
    failing.clear()
    harness.redrive()
    harness.run()
    assert sequence("a") == [0, 1]


def test_a_partitioned_command_costs_one_lookup_of_its_key_and_other_messages_none() -> None:
    harness = Harness(pools=())
    store, asked = harness.runtime.dead_letters, []
    look = store.waiting

    def counted(owner: str, key: str) -> str | None:
        asked.append(key)
        return look(owner, key)

    store.waiting = counted  # type: ignore[method-assign]
    send(harness, ["a", "b"], range(3))
    assert asked == ["a", "b"] * 3
    asked.clear()
    harness.send(Unordered(parcel="a"))
    harness.run()
    assert asked == []
