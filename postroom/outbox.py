"""The transactional outbox: what a handler sends or publishes leaves only after it committed.

``ctx.publish(event)`` and ``ctx.send(command)`` do not touch the broker. They add an Entry to the
handling's outbox, which the store writes in the same transaction as the handler's writes and the
inbox mark. Only once that transaction has committed (and the reply is stored) does the Relay
dispatch the entries (to the event log and the broker) and remove them. A worker killed between commit and dispatch leaves its
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
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    #: a command's or query's: the pool its reply goes to (postroom.pipeline.callback)
    reply_to: str | None = None
    #: a command's: when it is due (seconds since the epoch), held by the broker until then
    due: float | None = None
    #: postroom headers it carries besides the envelope (a process instance's address, which
    #: its reply carries back: postroom.processes)
    headers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Entry:
        return cls(**json.loads(raw))


#: how long a sent entry may wait for its removal: the batch a removal thread gathers
REMOVAL_WINDOW = 0.1


class Removals:
    """Sent entries, removed from their stores in batches by a thread of their process.

    Removing the entries of one handling costs a round trip and a statement; removing those of a
    hundred costs about the same. So a handling process hands its sent entries to this thread and
    goes on to its next message, and the thread removes what gathered every ``window`` seconds,
    one statement per store and owner. An entry whose removal dies with its process (killed within
    the window) is sent again by the outbox sweep, and its receivers drop the repeat. The thread
    starts with the first removal after a fork, and ends when a window gathered nothing.
    """

    def __init__(self, window: float = REMOVAL_WINDOW) -> None:
        self.window = window
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, str], tuple[InboxStore, list[str]]] = {}
        self._thread: threading.Thread | None = None

    def add(self, store: InboxStore, owner: str, entry_ids: list[str]) -> None:
        with self._lock:
            self._pending.setdefault((id(store), owner), (store, []))[1].extend(entry_ids)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="postroom-outbox-removals", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.window)
            with self._lock:
                batches, self._pending = self._pending, {}
                if not batches:
                    self._thread = None
                    return
            for (_, owner), (store, entry_ids) in batches.items():
                Relay.remove(store, owner, entry_ids)


class Relay:
    """Dispatches committed entries through the bus, then removes them from the store: at once,
    or in batches if given ``removals``."""

    def __init__(
        self,
        bus: Publisher,
        removals: Removals | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.removals = removals
        self.clock = clock  # what an entry's due time is measured on (the harness's is fake)

    def dispatch(self, store: InboxStore, owner: str, entries: Sequence[Entry]) -> None:
        """Once the reply is out (the Commit step defers it there: the reply need not wait for
        the broker, the entries are committed either way). A failure leaves the rest to the
        sweep. A store that fails to remove sent entries only has the sweep send them again,
        and the receivers' inboxes drop the repeat."""
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
        sent = [e.message_id for e in entries]
        if self.removals is None:
            self.remove(store, owner, sent)
        else:
            self.removals.add(store, owner, sent)

    @staticmethod
    def remove(store: InboxStore, owner: str, entry_ids: list[str]) -> None:
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
            # due already (a sweep sends it late, or it was never delayed): sent at once
            delay = None if entry.due is None else max(0.0, entry.due - self.clock())
            self.bus.send(
                message,
                causation_id=entry.causation_id,
                message_id=entry.message_id,
                reply_to=entry.reply_to,
                delay=delay,
                headers=entry.headers or None,
            )
