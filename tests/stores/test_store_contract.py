"""One contract, three stores: what the pipeline relies on from an InboxStore holds alike for the
Redis store, the SQL store and the in-memory store of ``postroom.testing``."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

from postroom.outbox import Entry
from tests.stores.conftest import Subject

DONE = {"status": "succeeded", "value": {"n": 1}}


def _id() -> str:
    return str(uuid.uuid4())


def _entry(age: float = 0.0) -> Entry:
    return Entry(
        message_id=_id(),
        kind="event",
        message_type="assets.AssetRegistered",
        payload={"n": 1},
        correlation_id=_id(),
        causation_id=_id(),
        source="assets",
        at=time.time() - age,
    )


def test_runs_are_counted_until_one_ends(subject: Subject) -> None:
    store, owner, message = subject.store, "assets", _id()
    assert store.begin(owner, message) == (None, 1)
    assert store.begin(owner, message) == (None, 2)
    store.ended(owner, message)
    assert store.begin(owner, message) == (None, 1)


def test_runs_outlive_the_process_that_began_them(subject: Subject) -> None:
    if subject.reopen is None:
        pytest.skip("the in-memory store lives and dies with its process")
    owner, message = "assets", _id()
    subject.store.begin(owner, message)
    subject.store.discard(subject.store.transaction())  # the run's own writes went nowhere
    again = subject.reopen()  # as the worker started after a crash opens it
    try:
        assert again.begin(owner, message) == (None, 2)
    finally:
        getattr(getattr(again, "engine", None), "dispose", lambda: None)()


def test_settle_applies_the_writes_and_marks_every_id_with_the_outcome(subject: Subject) -> None:
    store, owner, first, second = subject.store, "assets", _id(), _id()
    store.begin(owner, first)
    tx = store.transaction()
    subject.write(tx, first, "written")
    assert store.settle(tx, owner, [first, second], DONE) is True
    assert subject.read(first) == "written"
    assert store.outcome(owner, first) == store.outcome(owner, second) == DONE
    assert store.begin(owner, first) == (DONE, 0)
    assert store.begin(owner, first, dedupe=False) == (None, 1)  # the mark ended the runs
    assert store.outcome("search", first) is None  # per owner


def test_a_second_settle_of_a_message_returns_false_and_writes_nothing(subject: Subject) -> None:
    store, owner, message = subject.store, "assets", _id()
    assert store.settle(None, owner, [message], DONE) is True
    tx = store.transaction()
    subject.write(tx, message, "twice")
    assert store.settle(tx, owner, [message], {"status": "other"}, [_entry(age=60)]) is False
    assert subject.read(message) is None
    assert store.outcome(owner, message) == DONE
    assert store.claim_stale(0, 10) == []


def test_discarded_writes_are_never_applied(subject: Subject) -> None:
    store, message = subject.store, _id()
    tx = store.transaction()
    subject.write(tx, message, "rejected")
    store.discard(tx)
    store.discard(None)
    assert store.settle(None, "assets", [message], {"status": "rejected"}) is True
    assert subject.read(message) is None


def test_settled_outbox_entries_wait_until_delivered(subject: Subject) -> None:
    store, owner = subject.store, "assets"
    entries = [_entry(age=60), _entry(age=60)]
    assert store.settle(None, owner, [_id()], DONE, entries) is True
    claimed = store.claim_stale(10, 10)
    assert sorted(e.message_id for _, e in claimed) == sorted(e.message_id for e in entries)
    assert {o for o, _ in claimed} == {owner}
    assert claimed[0][1] == next(e for e in entries if e.message_id == claimed[0][1].message_id)
    store.delivered(owner, [e.message_id for e in entries])
    assert store.claim_stale(0, 10) == []


def test_an_entry_is_stale_only_after_the_grace_and_claimed_for_another(
    subject: Subject,
) -> None:
    store = subject.store
    fresh, old = _entry(), _entry(age=60)
    store.settle(None, "assets", [_id()], DONE, [fresh, old])
    assert [e.message_id for _, e in store.claim_stale(30, 10)] == [old.message_id]
    assert store.claim_stale(30, 10) == []  # claimed: the sweep that took it sends it


def test_two_concurrent_sweeps_claim_each_entry_once(
    subject: Subject,
) -> None:
    store = subject.store
    entries = [_entry(age=60) for _ in range(200)]
    for start in range(0, len(entries), 20):
        store.settle(None, "assets", [_id()], DONE, entries[start : start + 20])
    claimed: list[str] = []
    ready = threading.Barrier(2)

    def sweep() -> None:
        ready.wait()
        for _ in range(len(entries)):  # a bound, should a store claim an entry twice
            found = store.claim_stale(30, 7)
            if not found:
                return
            claimed.extend(e.message_id for _, e in found)

    sweepers = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in sweepers:
        thread.start()
    for thread in sweepers:
        thread.join(30)
    assert Counter(claimed) == Counter(e.message_id for e in entries)
