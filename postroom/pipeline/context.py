"""What a handler knows about the message it runs for, and how it speaks in return."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from postroom.errors import WrongMessageKind
from postroom.headers import Envelope
from postroom.instances import Instance
from postroom.messages import Command, Event, Query
from postroom.outbox import Entry
from postroom.pipeline.delivery import Delivery
from postroom.registry import registry
from postroom.reliability import derived_id
from postroom.schedules import due_time


class HandlerContext:
    """Made afresh for each attempt, so a retried run starts with no writes and no messages."""

    def __init__(self, delivery: Delivery) -> None:
        assert delivery.envelope is not None
        self.envelope: Envelope = delivery.envelope
        self.attempt = delivery.attempt
        self.owner = delivery.owner
        self._delivery = delivery
        self._transaction: Any = None
        #: what this run sent or published, to be recorded with its writes
        self.outbox: list[Entry] = []
        #: what carries this run's reply on (a callback): committed even with a rejection
        self.replies: list[Entry] = []
        #: the process instances this run changed (postroom.processes), written with its writes
        self.instances: list[Instance] = []

    @property
    def message_id(self) -> str:
        return self.envelope.message_id

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlation_id

    @property
    def causation_id(self) -> str | None:
        return self.envelope.causation_id

    def publish(self, event: Event) -> str:
        """Publish an event caused by this message, in the same conversation, once this
        handling commits: an event announces what happened, so a run that is rejected, fails
        or loses to a concurrent copy announces nothing (see postroom.outbox).

        Its message ID derives from this message's ID and its rank among this run's messages,
        so a second run publishes the same IDs and subscribers drop the repeats.
        """
        if not isinstance(event, Event):
            raise WrongMessageKind(
                f"ctx.publish() takes an Event, not {event!r}: send commands with ctx.send()"
            )
        return self._record("event", event, self.correlation_id)

    def send(
        self,
        command: Command | Query,
        *,
        reply_to: str | bool = False,
        delay: float | None = None,
        not_before: datetime | None = None,
    ) -> str:
        """Send a command (or query) to its owner once this handling commits; its message ID.

        It starts a conversation of its own (its reply is stored under its message ID), caused
        by this message. ``reply_to`` delivers the reply, as a message, to that pool's
        ``@on_reply`` handler (True: this handler's own service or pool), so no worker waits
        for it; ContractError at once if that pool has none. ``delay`` (seconds) or
        ``not_before`` (an aware datetime) schedules it, as ``bus.send`` does: the broker holds
        it from the commit until then (InvalidSchedule at once for a bad schedule).
        """
        return self._send(command, reply_to=reply_to, delay=delay, not_before=not_before)

    def _send(
        self,
        command: Command | Query,
        *,
        reply_to: str | bool = False,
        delay: float | None = None,
        not_before: datetime | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        if not isinstance(command, Command | Query):
            raise WrongMessageKind(
                f"ctx.send() takes a Command or Query, not {command!r}: publish events"
            )
        pool = self.owner if reply_to is True else reply_to or None
        if pool is not None:
            registry.check_reply_to(type(command), pool)
        due = due_time(delay, not_before, self._delivery.runtime.clock())
        return self._record("command", command, None, reply_to=pool, due=due, headers=headers or {})

    def _record(
        self,
        kind: Any,
        message: Any,
        correlation_id: str | None,
        *,
        reply_to: str | None = None,
        due: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        if self._delivery.kind == "query":
            raise WrongMessageKind(
                "a query changes nothing and announces nothing: send or publish from a command's "
                "or an event's handler"
            )
        entry = Entry(
            message_id=derived_id(self.message_id, len(self.outbox) + 1),
            kind=kind,
            message_type=type(message).__message_type__,
            payload=message.payload(),
            correlation_id=correlation_id,
            causation_id=self.message_id,
            source=self.owner,
            reply_to=reply_to,
            due=due,
            headers=headers or {},
        )
        self.outbox.append(entry)
        return entry.message_id

    def transaction(self) -> Any:
        """Where the handler queues its writes (on Redis, a pipeline on POSTROOM_STATE_URL's
        Redis); postroom applies them together with this message's inbox mark and outbox, or
        not at all if a concurrent copy of the message committed first. Queue writes only:
        never execute it.
        """
        if self._transaction is None:
            self._transaction = self._delivery.store.transaction()
        return self._transaction

    def discard(self) -> None:
        """Drop the writes queued so far (the run did not commit)."""
        tx, self._transaction = self._transaction, None
        if tx is not None:
            self._delivery.store.discard(tx)

    def commit(self, outcome: dict[str, Any], *, effects: bool = True) -> bool:
        """Apply the writes and the outbox with the inbox mark; False if a concurrent copy
        committed first. Without ``effects`` (a rejection) only the mark is recorded, and what
        carries the reply on."""
        delivery = self._delivery
        inbox = delivery.store
        ids = list(dict.fromkeys([delivery.inbox_id, self.message_id]))
        tx, self._transaction = self._transaction, None
        if not effects:
            inbox.discard(tx)
            tx, self.outbox, self.instances = None, [], []
        self.outbox += self.replies
        return inbox.settle(tx, self.owner, ids, outcome, self.outbox, instances=self.instances)
