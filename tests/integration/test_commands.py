"""Commands and queries over real workers, on Redis and RabbitMQ: replies by correlation ID."""

from __future__ import annotations

import json
import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus, ReplyTimeout
from postroom.headers import PREFIX, Envelope
from postroom.messages import Command
from tests.integration.services import Crash, Echo, Flaky, Refuse
from tests.support import BrokerContext, last_line, run_python

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


class Unowned(Command, service="nobody"):
    """No pool consumes commands.nobody: its replies never come."""


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=2))
    return MessageBus(broker.app, source="tests")


def test_command_reply_arrives_under_its_correlation_id(bus: MessageBus) -> None:
    pending = bus.send(Echo(text="hello"))
    reply = pending.reply(timeout=30)
    assert reply.status == "succeeded"
    assert reply.correlation_id == pending.correlation_id
    assert reply.causation_id == pending.message_id
    assert reply.value["text"] == "hello"
    assert reply.message_id != pending.message_id


def test_identity_travels_in_headers_not_in_the_payload(bus: MessageBus) -> None:
    pending = bus.send(Echo(text="ids"))
    envelope = pending.reply(timeout=30).value["envelope"]
    assert envelope[PREFIX + "message_id"] == pending.message_id
    assert envelope[PREFIX + "correlation_id"] == pending.correlation_id
    assert envelope[PREFIX + "message_type"] == "probe.Echo"
    assert envelope[PREFIX + "version"] == 1
    assert envelope[PREFIX + "source"] == "tests"
    assert uuid.UUID(pending.message_id).version == 7


def test_rejected_command_is_not_retried_and_the_reply_says_why(
    bus: MessageBus, broker: BrokerContext
) -> None:
    pending = bus.send(Refuse(reason="not today"))
    reply = pending.reply(timeout=30)
    assert reply.status == "rejected"
    assert reply.error is not None
    assert reply.error.message == "not today"
    assert broker.state().get(broker.key("probe", "refused", pending.correlation_id)) == "1"


def test_transient_failure_is_retried_with_backoff_then_succeeds(bus: MessageBus) -> None:
    reply = bus.send(Flaky(key=uuid.uuid4().hex, failures=2)).reply(timeout=30)
    assert reply.status == "succeeded"
    assert reply.value == {"runs": 3}
    assert reply.attempts == 3


def test_retries_exhausted_reply_says_failed_with_the_error(bus: MessageBus) -> None:
    reply = bus.send(Flaky(key=uuid.uuid4().hex, failures=100)).reply(timeout=30)
    assert reply.status == "failed"
    assert reply.attempts == 4  # POSTROOM_MAX_RETRIES=3 in tests
    assert reply.error is not None
    assert reply.error.type == "TransientError"
    assert reply.error.message == "run 4 fails on purpose"


def test_a_bug_in_a_handler_fails_at_once_without_retry(
    bus: MessageBus, broker: BrokerContext
) -> None:
    key = uuid.uuid4().hex
    reply = bus.send(Crash(key=key)).reply(timeout=30)
    assert (reply.status, reply.attempts) == ("failed", 1)
    assert reply.error is not None
    assert (reply.error.type, reply.error.message) == ("ValueError", "a bug in the handler")
    assert broker.state().get(broker.key("probe", "crashed", key)) == "1"


def test_reply_timeout_names_the_correlation_id_and_the_queue(bus: MessageBus) -> None:
    pending = bus.send(Unowned())
    with pytest.raises(ReplyTimeout) as caught:
        pending.reply(timeout=1)
    assert pending.correlation_id in str(caught.value)
    assert "commands.nobody" in str(caught.value)


SENDER = """
import json, sys
from postroom import Command, MessageBus
import config

class Echo(Command, service="probe"):  # the contract alone: no handler code in this process
    text: str

pending = MessageBus(config.app).send(Echo(text=sys.argv[1]))
print(json.dumps({"correlation_id": pending.correlation_id}))
"""

FETCHER = """
import sys
from postroom import MessageBus
import config

print(MessageBus(config.app).reply_for(sys.argv[1], timeout=30).model_dump_json())
"""


def _python(broker: BrokerContext, code: str, *args: str) -> str:
    env = dict(broker.env, POSTROOM_IMPORTS="")  # these processes load no test handlers
    return last_line(run_python(env, "-c", code, *args))


def test_a_plain_process_sends_by_contract_and_another_fetches_the_reply(
    broker: BrokerContext, bus: MessageBus
) -> None:
    sent = json.loads(_python(broker, SENDER, "from afar"))
    reply = json.loads(_python(broker, FETCHER, sent["correlation_id"]))
    assert reply["status"] == "succeeded"
    assert reply["correlation_id"] == sent["correlation_id"]
    assert reply["value"]["text"] == "from afar"


def test_invalid_payload_is_refused_on_receipt_naming_the_field(
    broker: BrokerContext, bus: MessageBus
) -> None:
    envelope = Envelope.new("probe.Echo", 1, source="forger")
    broker.app.send_task(
        "probe.Echo", kwargs={"text": 42, "extra": 1}, task_id=envelope.correlation_id,
        headers=envelope.to_headers(), queue="commands.probe",
    )  # fmt: skip
    reply = bus.reply_for(envelope.correlation_id, timeout=30)
    assert reply.status == "rejected"
    assert reply.error is not None
    assert reply.error.type == "InvalidMessage"
    assert "text" in reply.error.message
    assert "extra" in reply.error.message


def test_a_partial_envelope_is_refused_saying_which_headers_are_missing(
    broker: BrokerContext, bus: MessageBus
) -> None:
    task_id = str(uuid.uuid4())
    broker.app.send_task(
        "probe.Echo",
        kwargs={"text": "x"},
        task_id=task_id,
        queue="commands.probe",
        headers={PREFIX + "message_type": "probe.Echo"},
    )
    reply = bus.reply_for(task_id, timeout=30)
    assert reply.status == "rejected"
    assert reply.error is not None
    assert "postroom.message_id" in reply.error.message


def test_send_many_enqueues_every_command_with_its_own_correlation_id(bus: MessageBus) -> None:
    pending = bus.send_many([Echo(text=f"bulk {i}") for i in range(50)])
    assert len({p.correlation_id for p in pending}) == 50
    replies = [p.reply(timeout=30) for p in pending]
    assert [r.value["text"] for r in replies] == [f"bulk {i}" for i in range(50)]
    assert all(r.correlation_id == p.correlation_id for r, p in zip(replies, pending, strict=True))
