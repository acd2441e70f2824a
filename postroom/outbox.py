"""The transactional outbox: what a handler sends or publishes leaves only after it committed.

``ctx.publish(event)`` and ``ctx.send(command)`` do not touch the broker. They add an Entry to the
handling's outbox, which the store writes in the same transaction as the handler's writes and the
inbox mark. Only once that transaction has committed does the Relay dispatch the entries (to the
event log and the broker) and remove them. A worker killed between commit and dispatch leaves its
entries in the store; the sweep (every worker runs one, see postroom._celery.bootsteps) dispatches
entries older than a grace period. An entry keeps its message ID, so a dispatch repeated after a
crash is dropped by the receivers' inboxes.

```
 handler ── ctx.publish ──> outbox (in memory) ─┐
 handler's writes ──────────────────────────────┼─ one transaction ─> store ─ Relay ─> event log,
 inbox mark ────────────────────────────────────┘   (Redis or SQL)         (or sweep)   broker
```
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from postroom.messages import Command, Event, Query, contract_for

if TYPE_CHECKING:
    from postroom.pipeline.delivery import Publisher
    from postroom.stores import InboxStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """A message waiting for its handler's transaction: everything needed to send it later."""

    message_id: str
    kind: Literal["event", "command"]
    message_type: str
    payload: dict[str, Any]
    correlation_id: str | None
    causation_id: str | None
    source: str
    at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Entry:
        return cls(**json.loads(raw))


class Relay:
    """Dispatches committed entries through the bus, then removes them from the store."""

    def __init__(self, bus: Publisher) -> None:
        self.bus = bus

    def dispatch(
        self,
        store: InboxStore,
        owner: str,
        entries: Sequence[Entry],
        *,
        later: list[Callable[[], None]],
    ) -> None:
        """Right after commit. A failure leaves the rest to the sweep: the outcome stands. The
        sent entries' removal goes to ``later``: it need not delay the reply, since a store that
        never removes them only has the sweep send them again, and the receivers' inboxes drop
        the repeat."""
        if not entries:
            return
        try:
            for entry in entries:
                self._send(entry)
        except Exception:
            logger.warning(
                "%d committed message(s) of %s are not dispatched yet; the outbox sweep will "
                "send them",
                len(entries),
                owner,
                exc_info=True,
            )
            return
        later.append(partial(self._remove, store, owner, [e.message_id for e in entries]))

    @staticmethod
    def _remove(store: InboxStore, owner: str, entry_ids: list[str]) -> None:
        try:
            store.delivered(owner, entry_ids)
        except Exception:
            logger.warning(
                "%d message(s) of %s were sent but are still in the outbox; the outbox sweep "
                "will send them again, and their receivers will drop the repeat",
                len(entry_ids),
                owner,
                exc_info=True,
            )

    def sweep(self, store: InboxStore, grace: float, limit: int = 500) -> int:
        """Dispatch entries committed more than ``grace`` seconds ago (their worker died before
        dispatching them); the number dispatched."""
        claimed = store.claim_stale(grace, limit)
        for owner, entry in claimed:
            self._send(entry)
            store.delivered(owner, [entry.message_id])
        if claimed:
            logger.warning("outbox sweep dispatched %d message(s) left by a crash", len(claimed))
        return len(claimed)

    def _send(self, entry: Entry) -> None:
        message = contract_for(entry.message_type).model_validate(entry.payload)
        if isinstance(message, Event):
            self.bus.publish(
                message,
                correlation_id=entry.correlation_id,
                causation_id=entry.causation_id,
                source=entry.source,
                message_id=entry.message_id,
            )
        else:
            assert isinstance(message, Command | Query)
            self.bus.send(message, causation_id=entry.causation_id, message_id=entry.message_id)
