"""The Park step: a partitioned command whose key waits behind a dead letter is not run.

It sits after Validate (the key's value is known and trustworthy) and before Dedupe, so that the
head of a line being redriven moves the line on even when its inbox says it ran already (a
worker killed after the run and before the line moved on: see postroom.parking).
"""

from __future__ import annotations

from postroom.pipeline.delivery import Delivery, Outcome
from postroom.pipeline.steps import Next, Step, letter_of


class Park(Step):
    """Runs a partitioned command only if its key flows or it heads its key's line being
    redriven; otherwise keeps it at the tail of the line (reason ``parked``) and acknowledges
    it. Once the head being redriven has run, the next message of its line is sent."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        key = delivery.partition
        if key is None:
            return call_next(delivery)
        letters, owner = delivery.runtime.dead_letters, delivery.owner
        waiting = letters.waiting(owner, key)
        if waiting is None:
            return call_next(delivery)
        assert delivery.envelope is not None
        message_id = delivery.envelope.message_id
        if waiting != message_id:
            admission = letters.park(letter_of(delivery, "parked", "Parked", _why(delivery, key)))
            if admission == "parked":
                return Outcome("parked")
            if admission == "free":
                return call_next(delivery)
        outcome = call_next(delivery)  # a failure raises GiveUp: its letter heads the line again
        if outcome.status not in {"retry", "held"}:
            following = letters.following(owner, key, message_id)
            letter = None if following is None else letters.get(following)
            if letter is not None:  # sent before the head leaves the line: see postroom.parking
                assert delivery.runtime.redrive is not None
                delivery.runtime.redrive(letter)
            letters.advance(owner, key, message_id)
        return outcome


def _why(delivery: Delivery, key: str) -> str:
    assert delivery.handler is not None
    field = delivery.handler.contract.__partition_key__
    return (
        f"an earlier message with {field}={key} was dead-lettered: this one waits behind it, "
        "in order; redrive that one (postroom dlq redrive) and this one follows it"
    )
