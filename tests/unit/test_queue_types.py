"""RabbitMQ's refusal of a queue's type, worded for a person: RabbitMQ 3.10's own messages, as it
sends them for a classic queue declared quorum and for a quorum queue declared classic (the
integration test tests/integration/test_queue_types.py gets the first from a real broker)."""

from __future__ import annotations

import pytest
from amqp.exceptions import PreconditionFailed

from postroom._celery.queue_types import mismatch, queue_types_checked
from postroom.errors import ConfigurationError, QueueTypeMismatch

CLASSIC_DECLARED_QUORUM = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'commands.assets' in vhost "
    "'prod': received the value 'quorum' of type 'longstr' but current is none"
)
QUORUM_DECLARED_CLASSIC = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'events.search' in vhost "
    "'prod': received none but current is the value 'quorum' of type 'longstr'"
)


def _refusal(text: str) -> PreconditionFailed:
    return PreconditionFailed(text, (50, 10), "Queue.declare", 406)


def test_a_classic_queue_declared_quorum_is_named_with_how_to_migrate_it() -> None:
    error = mismatch(_refusal(CLASSIC_DECLARED_QUORUM))
    assert isinstance(error, QueueTypeMismatch)
    assert isinstance(error, ConfigurationError)
    assert error.queue == "commands.assets"
    message = str(error)
    assert "RabbitMQ already has a classic queue 'commands.assets' (vhost 'prod')" in message
    assert "declares it quorum (POSTROOM_QUEUE_TYPE=quorum)" in message
    assert "cannot change in place" in message
    assert "rabbitmqctl -p prod delete_queue commands.assets" in message
    assert "keep classic queues with POSTROOM_QUEUE_TYPE=classic" in message


def test_a_quorum_queue_declared_classic_says_so_the_other_way_round() -> None:
    error = mismatch(_refusal(QUORUM_DECLARED_CLASSIC))
    assert error is not None
    assert error.queue == "events.search"
    assert "RabbitMQ already has a quorum queue 'events.search'" in str(error)
    assert "keep quorum queues with POSTROOM_QUEUE_TYPE=quorum" in str(error)


def test_another_precondition_failure_passes_through_unchanged() -> None:
    other = _refusal(
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': "
        "received 'false' but current is 'true'"
    )
    assert mismatch(other) is None
    with pytest.raises(PreconditionFailed), queue_types_checked():
        raise other


QUEUE_DECLARED_WITH_A_DELIVERY_LIMIT = (  # RabbitMQ 3.10's, for a quorum queue made without one
    "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'commands.assets' "
    "in vhost 'prod': received the value '' of type 'longstr' but current is none"
)


def test_a_queue_made_before_its_delivery_limit_or_classic_is_named_with_how_to_migrate_it() -> (
    None
):
    error = mismatch(_refusal(QUEUE_DECLARED_WITH_A_DELIVERY_LIMIT))
    assert isinstance(error, QueueTypeMismatch)
    assert error.queue == "commands.assets"
    message = str(error)
    assert "queue 'commands.assets' (vhost 'prod') declared otherwise" in message
    assert "(x-dead-letter-exchange is none there, '' here)" in message
    assert "cannot change in place" in message
    assert "a classic queue, or a quorum queue made before postroom's delivery limit" in message
    assert "rabbitmqctl -p prod delete_queue commands.assets" in message
    assert "POSTROOM_QUEUE_TYPE=classic for a classic queue" in message
    assert "POSTROOM_DELIVERY_LIMIT=0 for a quorum queue made without a limit" in message


def test_another_delivery_limit_than_the_queue_has_names_both() -> None:
    error = mismatch(
        _refusal(  # RabbitMQ 3.10's words for an integer argument
            "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'commands.z' in "
            "vhost 'prod': received '20' but current is '5'"
        )
    )
    assert error is not None
    assert error.queue == "commands.z"
    assert "with a delivery limit of 5, and this deployment declares 20" in str(error)
    assert "POSTROOM_DELIVERY_LIMIT=5" in str(error)
