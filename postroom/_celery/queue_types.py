"""RabbitMQ's refusal of a queue declared with another type than the one it already has.

A queue's type is fixed when it is created: declaring ``commands.assets`` as a quorum queue where a
classic one of that name exists fails with PRECONDITION_FAILED (406, "inequivalent arg
'x-queue-type'"), which closes the channel and, unexplained, stops a worker with py-amqp's words.
Here it becomes a QueueTypeMismatch that names the queue and says how to migrate it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from amqp.exceptions import PreconditionFailed

from postroom.errors import QueueTypeMismatch

_INEQUIVALENT = re.compile(
    r"inequivalent arg 'x-queue-type' for queue '(?P<queue>[^']*)' in vhost '(?P<vhost>[^']*)': "
    r"received (?:the value '(?P<wanted>[^']*)'|none)[^:]*?but current is "
    r"(?:the value '(?P<current>[^']*)'|none)"
)


def mismatch(error: PreconditionFailed) -> QueueTypeMismatch | None:
    """The postroom error ``error`` stands for, if it is a queue type refusal; else None."""
    found = _INEQUIVALENT.search(str(error))
    if found is None:
        return None
    queue, vhost = found["queue"], found["vhost"]
    wanted, current = found["wanted"] or "classic", found["current"] or "classic"
    return QueueTypeMismatch(
        f"RabbitMQ already has a {current} queue {queue!r} (vhost {vhost!r}), and this deployment "
        f"declares it {wanted} (POSTROOM_QUEUE_TYPE={wanted}). A queue's type cannot change in "
        f"place: stop its consumers, let it drain (or move its messages with a shovel), delete it "
        f"(`rabbitmqctl -p {vhost} delete_queue {queue}`) and start postroom again, which declares "
        f"it {wanted}; or keep {current} queues with POSTROOM_QUEUE_TYPE={current}",
        queue,
    )


@contextmanager
def queue_types_checked() -> Iterator[None]:
    """Raise QueueTypeMismatch instead of RabbitMQ's refusal of a queue's type, within."""
    try:
        yield
    except PreconditionFailed as error:
        found = mismatch(error)
        if found is None:
            raise
        raise found from error
