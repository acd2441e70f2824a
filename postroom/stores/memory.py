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
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from postroom.errors import ConcurrentUpdate, PostroomError
from postroom.instances import Instance
from postroom.outbox import Entry
from postroom.parking import Admission, Line, message_id_of
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
        #: process managers' instances by (process, key), as last committed
        self.processes: dict[tuple[str, str], Instance] = {}
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
        *,
        instances: Sequence[Instance] = (),
    ) -> bool:
        with self._lock:
            if (owner, message_ids[0]) in self.done:
                self.discard(tx)
                return False
            for instance in instances:
                stored = self.processes.get((instance.process, instance.key))
                if (stored.version if stored else 0) != instance.version:
                    self.discard(tx)
                    raise ConcurrentUpdate(f"{instance.address} changed since it was loaded")
            for instance in instances:
                self.processes[instance.process, instance.key] = replace(
                    instance, version=instance.version + 1
                )
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

    def instance(self, process: str, key: str) -> Instance | None:
        return self.processes.get((process, key))

    def instances(self, process: str, *, running: bool = True, limit: int = 100) -> list[Instance]:
        found = [i for (p, _), i in self.processes.items() if p == process and i.ended != running]
        return sorted(found, key=lambda i: i.updated_at, reverse=True)[:limit]


@dataclass
class _Line:
    """One parked key: "" while blocked, else the message ID of the head being redriven."""

    state: str = ""
    order: list[str] = field(default_factory=list)  # message IDs
    letters: dict[str, str] = field(default_factory=dict)  # message ID -> letter ID


class MemoryDeadLetters:
    """The Redis store's rules (postroom.parking's scripts), each step under one lock."""

    def __init__(self) -> None:
        self._letters: dict[str, DeadLetter] = {}
        self._lines: dict[tuple[str, str], _Line] = {}
        self._lock = threading.Lock()

    @property
    def letters(self) -> list[DeadLetter]:
        """Oldest first, as the Redis store's index has them."""
        return sorted(self._letters.values(), key=lambda letter: letter.at)

    def add(self, letter: DeadLetter) -> str:
        with self._lock:
            self._letters[letter.id] = letter
            if letter.partition is not None:
                line = self._lines.setdefault((letter.owner, letter.partition), _Line())
                message_id = message_id_of(letter)
                if message_id in line.letters:
                    self._letters.pop(line.letters[message_id], None)
                    line.order.remove(message_id)
                line.order.insert(0, message_id)
                line.letters[message_id] = letter.id
                line.state = ""
        return letter.id

    def get(self, letter_id: str) -> DeadLetter | None:
        return self._letters.get(letter_id)

    def ids(self, limit: int | None = None) -> list[str]:
        return [letter.id for letter in self.letters][:limit]

    def remove(self, letter_id: str) -> bool:
        with self._lock:
            return self._letters.pop(letter_id, None) is not None

    def waiting(self, owner: str, key: str) -> str | None:
        line = self._lines.get((owner, key))
        return None if line is None else line.state

    def park(self, letter: DeadLetter) -> Admission:
        assert letter.partition is not None
        message_id = message_id_of(letter)
        with self._lock:
            line = self._lines.get((letter.owner, letter.partition))
            if line is None:
                return "free"
            if line.state == message_id:
                return "next"
            if message_id not in line.letters:
                line.order.append(message_id)
                line.letters[message_id] = letter.id
                self._letters[letter.id] = letter
            return "parked"

    def line(self, owner: str, key: str) -> Line | None:
        found = self._lines.get((owner, key))
        if found is None or not found.order:
            return None
        return Line([found.letters[m] for m in found.order], redriving=found.state != "")

    def start(self, owner: str, key: str, message_id: str) -> str:
        with self._lock:
            line = self._lines.get((owner, key))
            if line is None:
                return "gone"
            if line.order[0] != message_id:
                return "behind"
            if line.state == message_id:
                return "again"
            line.state = message_id
            return "started"

    def following(self, owner: str, key: str, message_id: str) -> str | None:
        line = self._lines.get((owner, key))
        if line is None or line.state != message_id or len(line.order) < 2:
            return None
        return line.letters[line.order[1]]

    def advance(self, owner: str, key: str, message_id: str) -> None:
        self._drop(owner, key, message_id, ran=True)

    def drop_head(self, owner: str, key: str, message_id: str) -> str:
        return self._drop(owner, key, message_id, ran=False)

    def _drop(self, owner: str, key: str, message_id: str, *, ran: bool) -> str:
        with self._lock:
            line = self._lines.get((owner, key))
            if line is None:
                return "gone"
            if line.order[0] != message_id:
                return "behind"
            if ran and line.state != message_id:
                return "gone"
            if not ran and line.state != "":
                return "redriving"
            line.order.pop(0)
            self._letters.pop(line.letters.pop(message_id), None)
            if not line.order:
                del self._lines[owner, key]
            elif ran:
                line.state = line.order[0]
            return "dropped"
