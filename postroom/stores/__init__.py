"""What the pipeline records in: an inbox and outbox per consumer, the instances of its process
managers, and the dead letters.

Implementations: on Redis (postroom.reliability) and in SQL (postroom.stores.sql) for real
deployments, and in memory (postroom.stores.memory) for ``postroom.testing``. The pipeline speaks
only these protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from postroom.instances import Instance
    from postroom.outbox import Entry
    from postroom.parking import Admission, Line
    from postroom.reliability import DeadLetter


class InboxStore(Protocol):
    def begin(
        self, owner: str, message_id: str, *, dedupe: bool = True
    ) -> tuple[dict[str, Any] | None, int]:
        """What was recorded if the message was handled (only when ``dedupe``), else the number
        of runs begun and not ended, this one included."""

    def transaction(self) -> Any:
        """Where a handler queues its writes, to be committed with the inbox mark."""

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
        """Apply ``tx``, record the ``outbox`` entries, write the process ``instances`` and mark
        every ID handled with ``outcome``, in one transaction, unless the first ID is marked
        already (a concurrent copy won): then False, and nothing is written. ``tx`` None: no
        writes of the handler's. Each instance is written at its version + 1 if its stored
        version is still ``instance.version`` (0: not stored); else ConcurrentUpdate, and
        nothing is written."""

    def discard(self, tx: Any) -> None:
        """Drop the writes queued on ``tx`` (a rejected command changes nothing)."""

    def delivered(self, owner: str, entry_ids: list[str]) -> None:
        """Remove dispatched outbox entries."""

    def claim_stale(self, grace: float, limit: int) -> list[tuple[str, Entry]]:
        """Outbox entries committed over ``grace`` seconds ago, as (owner, entry); each claimed
        for another ``grace`` seconds, so concurrent sweeps do not take the same entries."""

    def ended(self, owner: str, message_id: str) -> None:
        """The run came to an end other than a commit: it did not kill its worker."""

    def outcome(self, owner: str, message_id: str) -> dict[str, Any] | None:
        """What ``owner`` recorded when it handled the message, if it has."""

    def instance(self, process: str, key: str) -> Instance | None:
        """A process manager's instance as last committed, with its version; None if none is
        (or, once ended, no longer) stored."""

    def instances(self, process: str, *, running: bool = True, limit: int = 100) -> list[Instance]:
        """A process manager's running instances (else its ended ones), most recently updated
        first."""


class DeadLetterStore(Protocol):
    """The dead letters, and the lines of the partition keys parked behind one (see
    postroom.parking for what each line operation means)."""

    def add(self, letter: DeadLetter) -> str:
        """Keep the letter; its ID. A partitioned one (``letter.partition``) heads its key's line."""

    def get(self, letter_id: str) -> DeadLetter | None: ...

    def ids(self, limit: int | None = None) -> list[str]:
        """The letters' IDs, oldest first."""

    def remove(self, letter_id: str) -> bool: ...

    def waiting(self, owner: str, key: str) -> str | None: ...

    def park(self, letter: DeadLetter) -> Admission: ...

    def line(self, owner: str, key: str) -> Line | None: ...

    def start(self, owner: str, key: str, message_id: str) -> str: ...

    def following(self, owner: str, key: str, message_id: str) -> str | None: ...

    def advance(self, owner: str, key: str, message_id: str) -> None: ...

    def drop_head(self, owner: str, key: str, message_id: str) -> str: ...
