"""The HTTP front door's mapping of replies and idempotency keys, without a broker.

The reference assets service never rejects nor fails a RegisterAsset that passed the HTTP
validation, so the HTTP answers to those outcomes are checked here on real Reply objects.
"""

from __future__ import annotations

import json
import uuid

import celery
import pytest

from postroom import MessageBus
from postroom.messages import ErrorInfo, Reply
from postroom.settings import Settings
from tasks.assets import BindDevice, RegisterAsset
from workers.api import create_api, message_id_for, unsuccessful


def _reply(status: str, error_type: str, message: str) -> Reply:
    return Reply(
        status=status,  # type: ignore[arg-type]
        error=ErrorInfo(type=error_type, message=message),
        correlation_id=str(uuid.uuid4()),
        message_id=str(uuid.uuid4()),
    )


@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        ("rejected", "Rejected", 409),
        ("rejected", "InvalidMessage", 422),
        ("failed", "TransientError", 502),
        ("failed", "KeyError", 502),
    ],
)
def test_an_unsuccessful_reply_answers_with_its_status_and_error(
    status: str, error_type: str, code: int
) -> None:
    reply = _reply(status, error_type, "why it went wrong")
    response = unsuccessful(reply)
    assert response.status_code == code
    body = json.loads(response.body)
    assert body["status"] == status
    assert body["error"] == {"type": error_type, "message": "why it went wrong"}
    assert body["correlation_id"] == reply.correlation_id
    assert response.headers["x-correlation-id"] == reply.correlation_id


def test_an_idempotency_key_is_one_message_id_per_command_type() -> None:
    first = message_id_for("order-17", RegisterAsset)
    assert first == message_id_for("order-17", RegisterAsset)
    assert uuid.UUID(first).version == 5
    assert first != message_id_for("order-18", RegisterAsset)
    assert first != message_id_for("order-17", BindDevice)


def test_a_polled_reply_says_whether_a_querys_fallback_gave_it() -> None:
    document = create_api(MessageBus(celery.Celery()), Settings()).openapi()
    answered = document["paths"]["/commands/{correlation_id}"]["get"]["responses"]["200"]
    assert answered["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Reply"
    }
    fallback = document["components"]["schemas"]["Reply"]["properties"]["fallback"]
    assert (fallback["type"], fallback["default"]) == ("boolean", False)
