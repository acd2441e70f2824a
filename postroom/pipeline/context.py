"""What a handler knows about the message it runs for, and how it speaks in return."""

from __future__ import annotations

from typing import Any

from postroom.headers import Envelope
from postroom.messages import Event
from postroom.pipeline.delivery import Delivery
from postroom.reliability import derived_id


class HandlerContext:
    """Made afresh for each attempt, so a retried run starts with no writes and no events."""

    def __init__(self, delivery: Delivery) -> None:
        assert delivery.envelope is not None
        self.envelope: Envelope = delivery.envelope
        self.attempt = delivery.attempt
        self.owner = delivery.owner
        self._delivery = delivery
        self._published = 0
        self._transaction: Any = None

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
        """Publish an event caused by this message, in the same conversation.

        Its message ID derives from this message's ID and its rank among this run's events, so a
        second run of the handler publishes the same IDs and subscribers drop the repeats.
        """
        self._published += 1
        return self._delivery.runtime.bus.publish(
            event,
            correlation_id=self.correlation_id,
            causation_id=self.message_id,
            source=self.owner,
            message_id=derived_id(self.message_id, self._published),
        )

    def transaction(self) -> Any:
        """Where the handler queues its writes (on Redis, a pipeline on POSTROOM_STATE_URL's
        Redis); postroom applies them together with this message's inbox mark, or not at all
        if a concurrent copy of the message committed first. Queue writes only: never execute it.
        """
        if self._transaction is None:
            self._transaction = self._delivery.runtime.inbox.transaction()
        return self._transaction

    def commit(self, outcome: dict[str, Any]) -> bool:
        """Apply the writes with the inbox mark; False if a concurrent copy committed first."""
        delivery = self._delivery
        ids = list(dict.fromkeys([delivery.inbox_id, self.message_id]))
        tx, self._transaction = self._transaction, None
        return delivery.runtime.inbox.settle(tx, self.owner, ids, outcome)
