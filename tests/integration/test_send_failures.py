"""A send the broker never takes raises SendFailed, on both brokers, once its retries
(POSTROOM_PUBLISH_RETRIES) ran out: it says what happened and what to do, instead of kombu's
OperationalError (often with no message at all, as for a RabbitMQ nack)."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom import MessageBus, SendFailed
from tests.integration.services import Echo, ProbeHappened
from tests.private_brokers import free_port
from tests.support import BROKERS, broker_context

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


def _nowhere(kind: str) -> str:
    """A broker URL on a loopback port no server listens on."""
    port = free_port()
    return (
        f"redis://127.0.0.1:{port}/0"
        if kind == "redis"
        else f"amqp://guest:guest@127.0.0.1:{port}//"
    )


@pytest.mark.parametrize("kind", BROKERS)
def test_a_command_or_event_the_broker_never_takes_raises_send_failed_naming_the_setting(
    kind: str, tmp_path: Path
) -> None:
    context = broker_context(kind, tmp_path, broker_url=_nowhere(kind), publish_retries="1")
    bus = MessageBus(context.app, source="tests")
    try:
        with pytest.raises(SendFailed, match="after 1 retries, POSTROOM_PUBLISH_RETRIES") as sent:
            bus.send(Echo(text="into the void"), message_id="01a23c1c-4bd5-7861-9b83-47502b8445a5")
        assert "01a23c1c-4bd5-7861-9b83-47502b8445a5" in str(sent.value)
        assert "send it again with the same message_id=" in str(sent.value)
        with pytest.raises(SendFailed, match="a bulk send is not retried"):
            bus.send_many([Echo(text="nor this"), Echo(text="nor that")])
        with pytest.raises(SendFailed, match="did not take event"):
            bus.publish(ProbeHappened(key="unheard"))
    finally:
        context.close()
