"""What a send that the broker never took looks like to the sender.

kombu retries a publish (Celery's ``task_publish_retry_policy``, from POSTROOM_PUBLISH_RETRIES),
reconnecting to the next of the ``;``-separated broker URLs; when the tries run out it raises its
own OperationalError, often with an empty message (a RabbitMQ nack has none). Here that becomes a
SendFailed saying what the sender can do, and RabbitMQ's refusal of a queue's type a
QueueTypeMismatch (postroom._celery.queue_types).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kombu.exceptions import OperationalError

from postroom._celery.queue_types import queue_types_checked
from postroom.errors import SendFailed


@contextmanager
def published(what: str, retries: int | None) -> Iterator[None]:
    """Raise SendFailed for ``what`` (a message, named for the user) if the broker never took it
    after ``retries`` retries (None: a bulk send, which is not retried, some of it stored)."""
    with queue_types_checked():
        try:
            yield
        except OperationalError as error:
            cause = error.__cause__ or error
            tried = (
                "a bulk send is not retried"
                if retries is None
                else f"after {retries} retries, POSTROOM_PUBLISH_RETRIES"
            )
            raise SendFailed(
                f"the broker did not take {what} ({type(cause).__name__}: "
                f"{cause or 'no reason given'}; {tried}): it may or may not hold it. "
                "Once the broker answers (POSTROOM_BROKER_URL), send it again with the same "
                "message_id=, so that it is handled once"
            ) from error
