"""A process manager's instance as its store keeps it (see postroom.processes for the manager).

An instance is a document (its state, what it waits for, the steps it took) under a version. A
handling loads it, and writes it back with the handling's inbox mark and outbox only if its
stored version is still the one loaded; otherwise another message of the same instance
committed first, and the handling runs again against the new document (ConcurrentUpdate). So
two messages of one instance never both build on the same state: no update is lost, and the
stores need no lock held across a handler's run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

#: running: it takes messages; completed or compensated: it has ended, and ignores late ones
Status = Literal["running", "completed", "compensated"]
ENDED: frozenset[str] = frozenset({"completed", "compensated"})
#: the steps an instance remembers, newest last: enough to follow a long-running one
MAX_STEPS = 100


@dataclass(frozen=True)
class Instance:
    """One instance of a process manager, as loaded or as to be written."""

    process: str
    key: str
    status: Status = "running"
    #: the manager's state model, as JSON (None until a handler sets one)
    state: dict[str, Any] | None = None
    #: what it sent itself and still waits for (a timeout, say): message ID -> message type
    pending: dict[str, str] = field(default_factory=dict)
    #: what each message it received did, oldest first (postroom trace --process)
    steps: tuple[dict[str, Any], ...] = ()
    started_at: float = 0.0
    updated_at: float = 0.0
    #: the stored version this was loaded at; 0: not stored yet
    version: int = 0

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def address(self) -> str:
        """``<process>:<key>``: what a reply, or a message it sent itself, returns to."""
        return f"{self.process}:{self.key}"

    def document(self) -> str:
        """What a store keeps besides the process, key and version, as JSON."""
        return json.dumps(
            {
                "status": self.status,
                "state": self.state,
                "pending": self.pending,
                "steps": list(self.steps),
                "started_at": self.started_at,
                "updated_at": self.updated_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, process: str, key: str, document: str | bytes, version: int) -> Instance:
        found = json.loads(document)
        return cls(
            process=process,
            key=key,
            status=found["status"],
            state=found["state"],
            pending=dict(found["pending"]),
            steps=tuple(found["steps"]),
            started_at=float(found["started_at"]),
            updated_at=float(found["updated_at"]),
            version=version,
        )

    def step(self, record: dict[str, Any], **changes: Any) -> Instance:
        """This instance with ``changes`` and one more step, the oldest beyond MAX_STEPS dropped."""
        steps = (*self.steps, record)[-MAX_STEPS:]
        return replace(self, steps=steps, **changes)
