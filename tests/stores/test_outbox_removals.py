"""A worker removes what its handlings sent from the outbox in batches, off their way: many
handlings' entries leave in one removal per owner, within the window, on every store."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from postroom.outbox import Entry, Removals
from tests.stores.conftest import Subject

DONE = {"status": "succeeded"}


def _committed(subject: Subject, owner: str, count: int) -> list[str]:
    """``count`` handlings of ``owner``, one sent entry each, committed; their entry IDs."""
    ids = []
    for _ in range(count):
        entry = Entry(str(uuid.uuid4()), "event", "assets.AssetRegistered", {}, None, None, owner)
        assert subject.store.settle(None, owner, [str(uuid.uuid4())], DONE, [entry]) is True
        ids.append(entry.message_id)
    return ids


def _counting(subject: Subject) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []
    delivered = subject.store.delivered

    def counted(owner: str, entry_ids: list[str]) -> None:
        calls.append((owner, list(entry_ids)))
        delivered(owner, entry_ids)

    subject.store.delivered = counted  # type: ignore[method-assign]
    return calls


def _left(subject: Subject) -> set[str]:
    return {entry.message_id for _, entry in subject.store.claim_stale(-60, 1000)}


@pytest.mark.timeout(30)
def test_many_handlings_sent_entries_leave_in_one_removal_per_owner(subject: Subject) -> None:
    removals = Removals(window=0.3)
    calls = _counting(subject)
    assets, devices = _committed(subject, "assets", 5), _committed(subject, "devices", 3)
    for entry_id in assets + devices:
        owner = "assets" if entry_id in assets else "devices"
        removals.add(subject.store, owner, [entry_id])
    assert calls == []  # nobody waited for them
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(calls) == sorted([("assets", assets), ("devices", devices)])
    assert not _left(subject) & set(assets + devices)


@pytest.mark.timeout(30)
def test_a_forked_process_removes_its_own_sent_entries(subject: Subject) -> None:
    removals = Removals(window=0.1)
    removals.add(subject.store, "assets", _committed(subject, "assets", 1))  # the parent's
    sent = _committed(subject, "assets", 2)
    pid = os.fork()  # while the parent's removal thread runs, as Celery forks its pool
    if pid == 0:
        code = 1
        try:
            removals.add(subject.store, "assets", sent)
            time.sleep(1)
            code = 0 if not _left(subject) & set(sent) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
