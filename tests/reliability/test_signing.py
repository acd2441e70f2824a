"""Signed messages: unsigned or tampered ones are dead-lettered; a rotated-out key still verifies."""

from __future__ import annotations

import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.headers import PREFIX, Envelope
from postroom.reliability import reliability
from postroom.signing import SIGNATURE, Signer
from tests.integration.services import Echo
from tests.support import BrokerContext, WorkerProcess

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
NEW, OLD = "s3cret-new-key", "s3cret-old-key"
SETTINGS = {"signing_keys": f"{NEW},{OLD}"}


@pytest.fixture(scope="module")
def worker(broker: BrokerContext) -> WorkerProcess:
    return broker.start_worker(Pool("probe", ("commands.probe",), concurrency=1))


def send(
    broker: BrokerContext, payload: dict[str, object], sign_with: str | None, tamper: bool = False
) -> Envelope:
    envelope = Envelope.new("probe.Echo", 1, source="tests")
    headers = envelope.to_headers()
    if sign_with:
        headers[SIGNATURE] = Signer([sign_with]).sign("probe.Echo", payload, headers)
    if tamper:
        payload = {**payload, "text": "changed in flight"}
    broker.app.send_task(
        "probe.Echo",
        kwargs=payload,
        task_id=envelope.correlation_id,
        headers=headers,
        queue="commands.probe",
    )
    return envelope


def dead_letter_reason(broker: BrokerContext, envelope: Envelope) -> str:
    store = reliability(broker.app).dead_letters
    for letter_id in store.ids():
        letter = store.get(letter_id)
        if letter and letter.headers.get(PREFIX + "message_id") == envelope.message_id:
            return letter.error_message
    raise AssertionError(f"no dead letter for {envelope.message_id}")


def test_the_bus_signs_and_the_worker_accepts(broker: BrokerContext, worker: WorkerProcess) -> None:
    assert MessageBus(broker.app).send(Echo(text="signed")).reply(timeout=30).ok


def test_a_message_signed_with_the_previous_key_is_still_accepted(
    broker: BrokerContext, worker: WorkerProcess
) -> None:
    envelope = send(broker, {"text": "old key"}, sign_with=OLD)
    assert MessageBus(broker.app).reply_for(envelope.correlation_id, timeout=30).ok


@pytest.mark.parametrize(
    ("sign_with", "tamper", "reason"),
    [(None, False, "unsigned"), (NEW, True, "tampered"), ("another-key", False, "unknown key")],
    ids=["unsigned", "tampered", "unknown-key"],
)
def test_unsigned_tampered_or_foreign_messages_are_dead_lettered(
    broker: BrokerContext, worker: WorkerProcess, sign_with: str | None, tamper: bool, reason: str
) -> None:
    envelope = send(broker, {"text": uuid.uuid4().hex}, sign_with=sign_with, tamper=tamper)
    reply = MessageBus(broker.app).reply_for(envelope.correlation_id, timeout=30)
    assert reply.status == "rejected"
    assert reason in dead_letter_reason(broker, envelope)


def test_secrets_never_reach_the_logs_or_reprs(
    broker: BrokerContext, worker: WorkerProcess
) -> None:
    log = worker.output()
    assert "Connected to" in log or "ready" in log
    for secret in (NEW, OLD, "guest:guest@"):
        assert secret not in log
        assert secret not in repr(broker.settings)
        assert secret not in repr(broker.app.conf.postroom.signer)
