"""RabbitMQ's refusal of a queue declared with another type (or arguments) than it already has.

A queue's type is fixed when it is created: declaring ``commands.assets`` as a quorum queue where a
classic one of that name exists fails with PRECONDITION_FAILED (406, "inequivalent arg
'x-queue-type'"), which closes the channel and, unexplained, stops a worker with py-amqp's words.
Here it becomes a QueueTypeMismatch that names the queue and says how to migrate it. The same goes
for a queue made before postroom declared a delivery limit on it ("inequivalent arg
'x-delivery-limit'"): RabbitMQ cannot add one in place either.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from amqp.exceptions import PreconditionFailed

from postroom.errors import QueueTypeMismatch

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>x-[^']*)' for queue '(?P<queue>[^']*)' in vhost '(?P<vhost>[^']*)': "
    r"received (?:the value )?(?:'(?P<wanted>[^']*)'|none)[^:]*?but current is "
    r"(?:the value )?(?:'(?P<current>[^']*)'|none)"
)
_MIGRATE = (
    "stop its consumers, let it drain (or move its messages with a shovel), delete it "
    "(`rabbitmqctl -p {vhost} delete_queue {queue}`) and start postroom again"
)


def mismatch(error: PreconditionFailed) -> QueueTypeMismatch | None:
    """The postroom error ``error`` stands for, if it is a refusal of a queue's type or of one of
    its other arguments (the delivery limit's); else None."""
    found = _INEQUIVALENT.search(str(error))
    if found is None:
        return None
    if found["arg"] != "x-queue-type":
        return _arguments_differ(found)
    queue, vhost = found["queue"], found["vhost"]
    wanted, current = found["wanted"] or "classic", found["current"] or "classic"
    return QueueTypeMismatch(
        f"RabbitMQ already has a {current} queue {queue!r} (vhost {vhost!r}), and this deployment "
        f"declares it {wanted} (POSTROOM_QUEUE_TYPE={wanted}). A queue's type cannot change in "
        f"place: {_MIGRATE.format(vhost=vhost, queue=queue)}, which declares it {wanted}; or "
        f"keep {current} queues with POSTROOM_QUEUE_TYPE={current}",
        queue,
    )


def _arguments_differ(found: re.Match[str]) -> QueueTypeMismatch:
    """A queue RabbitMQ holds with other arguments than postroom declares. RabbitMQ names the
    first argument that differs, and compares the dead-letter ones before the type: a classic
    queue, or a quorum queue made before postroom's delivery limit, is refused the same way."""
    queue, vhost, arg = found["queue"], found["vhost"], found["arg"]
    wanted, current = (
        repr(v) if v is not None else "none" for v in found.group("wanted", "current")
    )
    migrate = _MIGRATE.format(vhost=vhost, queue=queue)
    if arg == "x-delivery-limit" and found["current"] is not None:
        return QueueTypeMismatch(
            f"RabbitMQ already has queue {queue!r} (vhost {vhost!r}) with a delivery limit of "
            f"{found['current']}, and this deployment declares {found['wanted']} "
            f"(POSTROOM_DELIVERY_LIMIT). A queue's arguments cannot change in place: {migrate}; "
            f"or declare it as before with POSTROOM_DELIVERY_LIMIT={found['current']}",
            queue,
        )
    return QueueTypeMismatch(
        f"RabbitMQ already has queue {queue!r} (vhost {vhost!r}) declared otherwise than this "
        f"deployment declares it ({arg} is {current} there, {wanted} here): it is a classic "
        f"queue, or a quorum queue made before postroom's delivery limit "
        f"(POSTROOM_DELIVERY_LIMIT). A queue's type and arguments cannot change in place: "
        f"{migrate}; or declare it as before: POSTROOM_QUEUE_TYPE=classic for a classic "
        f"queue, POSTROOM_DELIVERY_LIMIT=0 for a quorum queue made without a limit",
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
