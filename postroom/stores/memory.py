"""The inbox and dead letters in this process's memory, for ``postroom.testing``.

The semantics are the Redis stores': a handled message is remembered with its outcome, runs are
counted until they end, and settling is all-or-nothing. A handler's writes go to the Redis its
state lives in when the harness is given one (``Harness(state=...)``), applied when the message
settles, exactly as a worker applies them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from postroom.errors import PostroomError
from postroom.outbox import Entry
from postroom.reliability import DeadLetter


class NoStateStore(PostroomError):
    """A handler asked for ctx.transaction() in a harness that was given nowhere to write."""


class MemoryInbox:
    def __init__(
        self, state: redis.Redis | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.state = state
        self.done: dict[tuple[str, str], dict[str, Any]] = {}
        self.runs: dict[tuple[str, str], int] = {}
        #: committed entries not dispatched yet, by (owner, message ID), and when each is due
        self.outbox: dict[tuple[str, str], Entry] = {}
        self.due: dict[tuple[str, str], float] = {}
        self.clock = clock
        self._lock = threading.Lock()

    def begin(
        self, owner: str, message_id: str, *, dedupe: bool = True
    ) -> tuple[dict[str, Any] | None, int]:
        with self._lock:
            if dedupe and (owner, message_id) in self.done:
                return dict(self.done[owner, message_id]), 0
            runs = self.runs[owner, message_id] = self.runs.get((owner, message_id), 0) + 1
            return None, runs

    def transaction(self) -> Any:
        if self.state is None:
            raise NoStateStore(
                "this handler writes through ctx.transaction(): give the harness the Redis its "
                "state lives in, e.g. Harness(state=redis.Redis.from_url(...))"
            )
        return self.state.pipeline(transaction=True)

    def settle(
        self,
        tx: Any,
        owner: str,
        message_ids: list[str],
        outcome: dict[str, Any],
        outbox: Sequence[Entry] = (),
    ) -> bool:
        with self._lock:
            if (owner, message_ids[0]) in self.done:
                self.discard(tx)
                return False
            if tx is not None:
                tx.execute()
            for entry in outbox:
                self.outbox[owner, entry.message_id] = entry
            for message_id in message_ids:
                self.done[owner, message_id] = dict(outcome)
                self.runs.pop((owner, message_id), None)
            return True

    def discard(self, tx: Any) -> None:
        if tx is not None:
            tx.reset()

    def delivered(self, owner: str, entry_ids: list[str]) -> None:
        with self._lock:
            for entry_id in entry_ids:
                self.outbox.pop((owner, entry_id), None)
                self.due.pop((owner, entry_id), None)

    def claim_stale(self, grace: float, limit: int) -> list[tuple[str, Entry]]:
        now = self.clock()
        with self._lock:
            stale = [k for k in self.outbox if self.due.get(k, self.outbox[k].at) < now - grace]
            for key in stale[:limit]:
                self.due[key] = now
            return [(key[0], self.outbox[key]) for key in stale[:limit]]

    def ended(self, owner: str, message_id: str) -> None:
        with self._lock:
            self.runs.pop((owner, message_id), None)

    def outcome(self, owner: str, message_id: str) -> dict[str, Any] | None:
        found = self.done.get((owner, message_id))
        return None if found is None else dict(found)


class MemoryDeadLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    def add(self, letter: DeadLetter) -> str:
        self.letters.append(letter)
        return letter.id
