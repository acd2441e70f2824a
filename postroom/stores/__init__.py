"""What the pipeline records in: an inbox per consumer and the dead letters.

Two implementations each: on Redis (postroom.reliability) for real deployments, and in memory
(postroom.stores.memory) for ``postroom.testing``. The pipeline speaks only these protocols.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from postroom.reliability import DeadLetter


class InboxStore(Protocol):
    def begin(
        self, owner: str, message_id: str, *, dedupe: bool = True
    ) -> tuple[dict[str, Any] | None, int]:
        """What was recorded if the message was handled (only when ``dedupe``), else the number
        of runs begun and not ended, this one included."""

    def transaction(self) -> Any:
        """Where a handler queues its writes, to be committed with the inbox mark."""

    def settle(self, tx: Any, owner: str, message_ids: list[str], outcome: dict[str, Any]) -> bool:
        """Apply ``tx`` and mark every ID handled with ``outcome``, in one step, unless the first
        ID is marked already (a concurrent copy won): then False, and nothing is written."""

    def ended(self, owner: str, message_id: str) -> None:
        """The run came to an end other than a commit: it did not kill its worker."""

    def outcome(self, owner: str, message_id: str) -> dict[str, Any] | None:
        """What ``owner`` recorded when it handled the message, if it has."""


class DeadLetterStore(Protocol):
    def add(self, letter: DeadLetter) -> str:
        """Keep the letter; its ID."""
