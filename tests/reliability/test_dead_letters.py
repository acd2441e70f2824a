"""Nothing is dropped in silence: what cannot be handled is dead-lettered with the reason, and redriven."""

from __future__ import annotations

import json
import pickle
import time
import uuid

import pytest
from kombu import Connection

from config.pools import Pool
from postroom import MessageBus
from postroom.headers import PREFIX, Envelope
from postroom.reliability import DeadLetter, reliability
from tests.integration.services import Echo, Explode, Flaky
from tests.support import BrokerContext, run_python, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]
SETTINGS = {"poison_after": "2"}


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=1))
    broker.start_worker(Pool("pool_a", ("events.pool_a",), concurrency=1))
    return MessageBus(broker.app, source="tests")


def letters_of(broker: BrokerContext, **match: str) -> list[DeadLetter]:
    store = reliability(broker.app).dead_letters
    found = [store.get(i) for i in store.ids()]
    return [
        letter
        for letter in found
        if letter
        and all(
            getattr(letter, k, None) == v or letter.headers.get(PREFIX + k) == v
            for k, v in match.items()
        )
    ]


def alive(bus: MessageBus) -> None:
    """The worker still answers: nothing bad input did has stopped it."""
    assert bus.send(Echo(text="still here")).reply(timeout=30).status == "succeeded"


def postroom(broker: BrokerContext, *args: str) -> str:
    return run_python(broker.env, "-m", "workers.cli", *args)


def test_a_command_that_fails_for_good_is_dead_lettered_and_announced(
    broker: BrokerContext, bus: MessageBus
) -> None:
    pending = bus.send(Flaky(key=uuid.uuid4().hex, failures=100))
    assert pending.reply(timeout=30).status == "failed"
    [letter] = letters_of(broker, message_id=pending.message_id)
    assert (letter.reason, letter.queue, letter.owner) == ("failed", "commands.probe", "probe")
    assert (letter.error_type, letter.attempts) == ("TransientError", 4)
    assert "run 4 fails on purpose" in letter.traceback
    assert letter.kwargs is not None
    assert letter.headers[PREFIX + "correlation_id"] == pending.correlation_id

    def announced() -> list[dict[str, object]]:
        faults = broker.state().lrange(broker.key("probe", "faults"), 0, -1)
        return [f for f in map(json.loads, faults) if f["correlation_id"] == pending.correlation_id]

    wait_for(announced, timeout=30)
    [fault] = announced()
    assert (fault["command_type"], fault["error_type"]) == ("probe.Flaky", "TransientError")
    assert fault["causation_id"] == pending.message_id


def test_redrive_sends_a_dead_letter_back_with_the_same_message_id(
    broker: BrokerContext, bus: MessageBus
) -> None:
    pending = bus.send(Flaky(key=uuid.uuid4().hex, failures=4))  # 4 attempts fail, the 5th works
    assert pending.reply(timeout=30).status == "failed"
    [letter] = letters_of(broker, message_id=pending.message_id)
    assert letter.id in postroom(broker, "dlq", "list")
    assert json.loads(postroom(broker, "dlq", "show", letter.id))["reason"] == "failed"
    assert f"redriven {letter.id} to commands.probe" in postroom(
        broker, "dlq", "redrive", letter.id
    )

    def succeeded() -> bool:
        return bus.reply_for(pending.correlation_id, timeout=5).status == "succeeded"

    wait_for(succeeded, timeout=30)
    reply = bus.reply_for(pending.correlation_id)
    assert reply.value == {"runs": 5}
    assert reply.causation_id == pending.message_id
    assert letters_of(broker, message_id=pending.message_id) == []


def test_invalid_payload_is_dead_lettered_naming_the_field(
    broker: BrokerContext, bus: MessageBus
) -> None:
    envelope = Envelope.new("probe.Echo", 1, source="forger")
    broker.app.send_task(
        "probe.Echo",
        kwargs={"txt": "typo"},
        task_id=envelope.correlation_id,
        headers=envelope.to_headers(),
        queue="commands.probe",
    )
    assert bus.reply_for(envelope.correlation_id, timeout=30).status == "rejected"
    [letter] = letters_of(broker, message_id=envelope.message_id)
    assert letter.reason == "invalid"
    assert "txt" in letter.error_message
    alive(bus)


def _publish_raw(broker: BrokerContext, body: bytes, content_type: str, task: str) -> str:
    task_id = str(uuid.uuid4())
    with Connection(
        broker.settings.broker_url, transport_options=broker.app.conf.broker_transport_options
    ) as conn:
        conn.Producer().publish(
            body, exchange="", routing_key="commands.probe", content_type=content_type,
            content_encoding="utf-8" if content_type != "application/x-python-serialize" else "binary",
            headers={"id": task_id, "task": task, "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )  # fmt: skip
    return task_id


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b'{"not json', "application/json", "undecodable"),
        (pickle.dumps(([], {"text": "x"}, {})), "application/x-python-serialize", "undecodable"),
        (b"<xml/>", "application/xml", "undecodable"),
    ],
    ids=["malformed-json", "pickle", "unknown-content-type"],
)
def test_a_message_celery_cannot_decode_is_dead_lettered_and_the_worker_keeps_running(
    broker: BrokerContext, bus: MessageBus, body: bytes, content_type: str, reason: str
) -> None:
    task_id = _publish_raw(broker, body, content_type, "probe.Echo")
    wait_for(lambda: letters_of(broker, task_id=task_id), timeout=30)
    [letter] = letters_of(broker, task_id=task_id)
    assert letter.reason == reason
    assert letter.body_bytes() == body
    assert letter.content_type == content_type
    alive(bus)


def test_an_unknown_message_type_is_dead_lettered_and_its_sender_told(
    broker: BrokerContext, bus: MessageBus
) -> None:
    envelope = Envelope.new("probe.Nonexistent", 1, source="tests")
    broker.app.send_task(
        "probe.Nonexistent",
        kwargs={},
        task_id=envelope.correlation_id,
        headers=envelope.to_headers(),
        queue="commands.probe",
    )
    reply = bus.reply_for(envelope.correlation_id, timeout=30)
    assert reply.status == "failed"
    assert reply.error is not None
    assert reply.error.type == "NotRegistered"
    wait_for(lambda: letters_of(broker, message_id=envelope.message_id), timeout=10)
    assert letters_of(broker, message_id=envelope.message_id)[0].reason == "unknown"
    alive(bus)


@pytest.mark.parametrize("how", ["exit", "segfault", "sigkill"])
def test_a_poison_message_that_kills_its_worker_is_dead_lettered_after_a_bounded_number_of_runs(
    broker: BrokerContext, bus: MessageBus, how: str
) -> None:
    key = uuid.uuid4().hex
    pending = bus.send(Explode(key=key, how=how))
    wait_for(lambda: letters_of(broker, message_id=pending.message_id), timeout=90)
    [letter] = letters_of(broker, message_id=pending.message_id)
    assert letter.reason == "poison"
    assert broker.state().get(broker.key("probe", "exploded", key)) == "2"  # POSTROOM_POISON_AFTER
    reply = bus.reply_for(pending.correlation_id, timeout=30)
    assert (reply.status, reply.error and reply.error.type) == ("failed", "PoisonMessage")
    time.sleep(0.5)
    alive(bus)


def test_purge_empties_the_dead_letters(broker: BrokerContext, bus: MessageBus) -> None:
    assert bus.send(Flaky(key=uuid.uuid4().hex, failures=100)).reply(timeout=30).status == "failed"
    assert "purged" in postroom(broker, "dlq", "purge")
    assert postroom(broker, "dlq", "list").strip() == ""
