"""Process managers' instances in the three stores alike (postroom.instances): written with the
handling's mark, outbox and writes, or not at all; never over a version another handling wrote."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from postroom.errors import ConcurrentUpdate
from postroom.instances import Instance
from postroom.outbox import Entry
from tests.stores.conftest import Subject

OWNER = "fulfilment"


def _id() -> str:
    return str(uuid.uuid4())


def _started(key: str, **changes: object) -> Instance:
    now = time.time()
    fresh = Instance("fulfilment", key, started_at=now, updated_at=now)
    return fresh.step({"result": "started"}, state={"order": key}, **changes)


def _entry() -> Entry:
    return Entry(
        message_id=_id(),
        kind="command",
        message_type="vendors.NotifyVendor",
        payload={"n": 1},
        correlation_id=None,
        causation_id=_id(),
        source=OWNER,
    )


def test_an_instance_is_written_with_the_mark_and_read_back_at_its_next_version(
    subject: Subject,
) -> None:
    store, message, key = subject.store, _id(), _id()
    tx = store.transaction()
    subject.write(tx, "seen", message)
    assert store.settle(tx, OWNER, [message], {"status": "handled"}, instances=[_started(key)])
    found = store.instance("fulfilment", key)
    assert found is not None
    assert (found.version, found.status, found.state, found.steps) == (
        1,
        "running",
        {"order": key},
        ({"result": "started"},),
    )
    assert store.outcome(OWNER, message) == {"status": "handled"}
    assert subject.read("seen") == message


def test_a_write_over_a_version_that_moved_on_writes_nothing_at_all(subject: Subject) -> None:
    store, key = subject.store, _id()
    assert store.settle(None, OWNER, [_id()], {}, instances=[_started(key)])
    loaded = store.instance("fulfilment", key)
    assert loaded is not None
    winner = loaded.step({"result": "handled"}, state={"order": key, "paid": True})
    assert store.settle(None, OWNER, [_id()], {}, instances=[winner])
    loser, message = loaded.step({"result": "completed"}, status="completed"), _id()
    tx = store.transaction()
    subject.write(tx, "lost", "yes")
    with pytest.raises(ConcurrentUpdate):
        store.settle(tx, OWNER, [message], {"status": "handled"}, [_entry()], instances=[loser])
    found = store.instance("fulfilment", key)
    assert found is not None
    assert (found.version, found.status) == (2, "running")
    assert found.state == {"order": key, "paid": True}
    assert store.outcome(OWNER, message) is None  # not marked: the run goes again
    assert subject.read("lost") is None
    assert store.claim_stale(-60, 100) == []  # nor its outbox entry


def test_two_starts_of_one_key_write_one_instance(subject: Subject) -> None:
    store, key = subject.store, _id()
    assert store.settle(None, OWNER, [_id()], {}, instances=[_started(key)])
    with pytest.raises(ConcurrentUpdate):
        store.settle(None, OWNER, [_id()], {}, instances=[_started(key, status="completed")])
    found = store.instance("fulfilment", key)
    assert found is not None
    assert (found.version, found.status) == (1, "running")


def test_a_copy_of_a_message_handled_already_loses_to_the_mark_first(subject: Subject) -> None:
    store, key, message = subject.store, _id(), _id()
    assert store.settle(None, OWNER, [message], {"n": 1}, instances=[_started(key)])
    # the copy loaded the instance before the first copy committed
    assert store.settle(None, OWNER, [message], {"n": 2}, instances=[_started(key)]) is False
    assert store.outcome(OWNER, message) == {"n": 1}


def test_running_and_ended_instances_are_listed_apart_newest_first(subject: Subject) -> None:
    store, keys = subject.store, [_id() for _ in range(3)]
    for key in keys:
        assert store.settle(None, OWNER, [_id()], {}, instances=[_started(key)])
        time.sleep(0.01)  # distinct update times
    first = store.instance("fulfilment", keys[0])
    assert first is not None
    done = first.step({"result": "completed"}, status="completed", updated_at=time.time())
    assert store.settle(None, OWNER, [_id()], {}, instances=[done])
    assert [i.key for i in store.instances("fulfilment")] == [keys[2], keys[1]]
    assert [i.key for i in store.instances("fulfilment", running=False)] == [keys[0]]
    assert [i.key for i in store.instances("fulfilment", limit=1)] == [keys[2]]
    assert store.instances("other") == []


def test_of_two_handlings_racing_on_one_instance_exactly_one_commits(subject: Subject) -> None:
    """Both loaded version 1; on SQL the second waits for the first's row lock, then loses."""
    store, key = subject.store, _id()
    assert store.settle(None, OWNER, [_id()], {}, instances=[_started(key)])
    loaded = store.instance("fulfilment", key)
    assert loaded is not None
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def handle(n: int) -> None:
        mine = loaded.step({"result": f"run {n}"}, state={"order": key, "by": n})
        start.wait()
        try:
            store.settle(None, OWNER, [_id()], {}, instances=[mine])
            outcomes.append("won")
        except ConcurrentUpdate:
            outcomes.append("lost")

    threads = [threading.Thread(target=handle, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["lost", "won"]
    found = store.instance("fulfilment", key)
    assert found is not None
    assert found.version == 2


def test_an_ended_instance_on_redis_expires_with_the_inbox(subject: Subject) -> None:
    if subject.kind != "redis":
        pytest.skip("only Redis expires what it keeps")
    store, key = subject.store, _id()
    done = _started(key, status="compensated")
    assert store.settle(None, OWNER, [_id()], {}, instances=[done])
    client = store.client  # type: ignore[attr-defined]
    ttl = client.ttl(f"{store.config.namespace}:process:fulfilment:{key}")  # type: ignore[attr-defined]
    assert 0 < ttl <= store.config.inbox_retention  # type: ignore[attr-defined]
