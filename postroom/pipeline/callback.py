"""Replies to a callback: the reply to a command or query sent with ``reply_to`` is delivered, as a
message, to that pool's ``@on_reply`` handler, so nobody blocks a worker waiting for it.

```
 pool "asker" ── ctx.send(Lookup, reply_to=True) ──> ( commands.oracle ) ──> pool "oracle"
                                                                                │ handles Lookup;
                                                                                │ its reply is also
 pool "asker": @on_reply(Lookup) <── ( commands.asker ) <── oracle.Lookup.reply ┘ stored as today
```

Why a step around DeadLetter rather than an outbox entry: it sees every final outcome in one place
(succeeded, rejected, and failed for good, which DeadLetter answers outside any transaction), for
queries too (which never commit), and the message it answers is acknowledged only after this step
returns. A worker that dies before the reply is sent leaves the message to be redelivered; a
command's repeat is answered by its inbox with the recorded reply, a query runs again, and the
step sends the reply again under the same message ID, which the asker's inbox drops. A reply the
broker will not take (after the publish retries) sends the message back for another try, so the
reply is not lost with an acknowledgement (a failure for good then runs once more and is kept
again, as when DeadLetter cannot reach its store).
"""

from __future__ import annotations

import logging

from postroom.errors import SendFailed
from postroom.headers import PROCESS, REPLY_TO
from postroom.messages import Reply
from postroom.pipeline.delivery import Delivery, Outcome
from postroom.pipeline.steps import Next, Step
from postroom.reliability import derived_id

logger = logging.getLogger(__name__)


def reply_message_id(message_id: str) -> str:
    """The reply message's ID: derived from the answered message's, so every run answering it
    sends the same ID and the asker's inbox keeps one."""
    return derived_id(message_id, "reply")


class Callback(Step):
    """Sends a command's or query's reply to the pool its ``postroom.reply_to`` header names.

    Only a decoded message is answered this way: one whose envelope could not be read has its
    reply in the result backend alone (the header of a message that is not one is not trusted).
    """

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        outcome = call_next(delivery)
        pool = delivery.headers.get(REPLY_TO)
        envelope = delivery.envelope
        if delivery.one_way or outcome.reply is None or envelope is None or not pool:
            return outcome
        reply = Reply.model_validate(outcome.reply)
        process = delivery.headers.get(PROCESS)  # the process instance it returns to, if any
        try:
            delivery.runtime.bus.send_reply(
                reply,
                pool=str(pool),
                message_id=reply_message_id(envelope.message_id),
                source=delivery.owner,
                headers={PROCESS: process} if isinstance(process, str) else None,
            )
        except SendFailed as exc:
            logger.warning(
                "%s: its reply to pool %s is not sent yet (%r)", delivery.name, pool, exc
            )
            return Outcome("retry", error=exc, delay=delivery.runtime.retry.backoff_max)
        return outcome
