"""The two dead-letter stores keep parked keys' lines by the same rules (postroom.parking): the
Redis one, which workers use, and the in-memory one the harness uses. A Redis store lives in a
namespace of its own in DB 13, removed at the end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from postroom.errors import OutOfLine
from postroom.headers import MESSAGE_ID
from postroom.parking import Line, purge_one, redrive_all, redrive_one
from postroom.reliability import DeadLetter, Reliability
from postroom.stores import DeadLetterStore
from postroom.stores.memory import MemoryDeadLetters

REDIS = "redis://127.0.0.1:6379/13"


@pytest.fixture(params=["memory", "redis"])
def letters(request: pytest.FixtureRequest) -> Iterator[DeadLetterStore]:
    if request.param == "memory":
        yield MemoryDeadLetters()
        return
    namespace = f"l{uuid.uuid4().hex[:10]}"
    yield Reliability(REDIS, namespace=namespace).dead_letters
    with redis.Redis.from_url(REDIS) as client:
        for name in client.scan_iter(f"{namespace}:*"):
            client.delete(name)


def letter(seq: int, reason: str = "parked", key: str = "k1") -> DeadLetter:
    return DeadLetter(
        reason=reason, error_type="E", error_message="", queue="commands.s.p0", owner="s",
        task="s.Hop", headers={MESSAGE_ID: f"m{seq}"}, kwargs={"seq": seq}, partition=key,
    )  # fmt: skip


def test_a_failed_partitioned_message_blocks_its_key_and_later_ones_join_its_line(
    letters: DeadLetterStore,
) -> None:
    assert letters.waiting("s", "k1") is None
    head = letter(0, "failed")
    letters.add(head)
    assert letters.waiting("s", "k1") == ""
    assert letters.waiting("s", "k2") is None  # other keys flow
    parked = [letter(1), letter(2)]
    assert [letters.park(p) for p in parked] == ["parked", "parked"]
    assert letters.park(letter(1)) == "parked"  # a copy of m1 (a redelivery) is kept once
    line = letters.line("s", "k1")
    assert line is not None
    assert (line.letter_ids, line.redriving) == ([head.id, parked[0].id, parked[1].id], False)
    assert len(letters.ids()) == 3


def test_a_line_drains_one_message_at_a_time_and_the_key_flows_when_it_is_empty(
    letters: DeadLetterStore,
) -> None:
    head, one = letter(0, "failed"), letter(1)
    letters.add(head)
    letters.park(one)
    assert letters.start("s", "k1", "m1") == "behind"
    assert letters.start("s", "k1", "m0") == "started"
    assert letters.start("s", "k1", "m0") == "again"
    assert letters.waiting("s", "k1") == "m0"
    assert letters.park(letter(0)) == "next"  # the redriven head runs
    late = letter(2)
    assert letters.park(late) == "parked"  # sent meanwhile: at the tail
    assert letters.following("s", "k1", "m0") == one.id
    assert letters.following("s", "k1", "m1") is None  # not the head: nothing moves
    letters.advance("s", "k1", "m1")
    assert letters.waiting("s", "k1") == "m0"
    letters.advance("s", "k1", "m0")
    assert (letters.waiting("s", "k1"), letters.get(head.id)) == ("m1", None)
    letters.advance("s", "k1", "m1")
    assert letters.following("s", "k1", "m2") is None
    letters.advance("s", "k1", "m2")
    assert letters.waiting("s", "k1") is None
    assert letters.line("s", "k1") is None
    assert letters.ids() == []


def test_a_redriven_head_that_fails_again_heads_its_line_again(letters: DeadLetterStore) -> None:
    letters.add(letter(0, "failed"))
    letters.park(letter(1))
    letters.start("s", "k1", "m0")
    again = letter(0, "failed")
    letters.add(again)
    line = letters.line("s", "k1")
    assert line is not None
    assert (line.head, line.redriving, len(line.letter_ids)) == (again.id, False, 2)
    assert len(letters.ids()) == 2  # the first letter of m0 is replaced


def test_redrive_and_purge_keep_order_or_refuse(letters: DeadLetterStore) -> None:
    sent: list[int] = []

    def send(found: DeadLetter) -> None:
        assert found.kwargs is not None
        sent.append(found.kwargs["seq"])

    head, one, two = letter(0, "failed"), letter(1), letter(2)
    loose = letter(9, "failed", key="k2")
    for each in (head, loose):
        letters.add(each)
    letters.park(one)
    letters.park(two)
    with pytest.raises(OutOfLine, match=f"parked behind {head.id}"):
        redrive_one(letters, send, one.id)
    with pytest.raises(OutOfLine, match=f"purge or redrive {head.id} first"):
        purge_one(letters, two.id)
    assert f"{one.id} now at the head" in purge_one(letters, head.id)
    assert len(redrive_all(letters, send)) == 2  # k1's new head and k2's: one.id and loose.id
    assert sorted(sent) == [1, 9]
    assert redrive_all(letters, send) == []  # draining lines are left to drain
    with pytest.raises(OutOfLine, match="being redriven"):
        purge_one(letters, one.id)
    assert "again" in redrive_one(letters, send, one.id)  # resent, after a crash say
    alone = DeadLetter(reason="failed", error_type="E", error_message="", queue="commands.s")
    letters.add(alone)
    assert purge_one(letters, alone.id) == f"purged {alone.id}"
    assert letters.get(alone.id) is None


def test_purging_every_letter_lets_every_parked_key_flow_again() -> None:
    store = Reliability(REDIS, namespace=f"l{uuid.uuid4().hex[:10]}").dead_letters
    store.add(letter(0, "failed"))
    store.park(letter(1))
    assert store.purge() == 2
    assert (store.waiting("s", "k1"), store.line("s", "k1"), store.ids()) == (None, None, [])
    assert store.park(letter(2)) == "free"


def test_a_line_that_drains_while_redrive_all_runs_is_not_sent_again(
    letters: DeadLetterStore,
) -> None:
    sent: list[str] = []
    look = letters.line

    def send(found: DeadLetter) -> None:
        sent.append(found.headers[MESSAGE_ID])

    def drained_meanwhile(owner: str, key: str) -> Line | None:
        if sent and letters.waiting(owner, key):  # a fast worker runs the line as it is read
            for message_id in ("m0", "m1"):
                letters.advance(owner, key, message_id)
        return look(owner, key)

    letters.line = drained_meanwhile  # type: ignore[method-assign]
    letters.add(letter(0, "failed"))
    letters.park(letter(1))
    assert len(redrive_all(letters, send)) == 1
    assert sent == ["m0"]  # m1 ran with its line: its letter, read before, is not sent alone
    assert letters.ids() == []
