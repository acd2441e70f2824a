"""The bus refuses a message handed to the wrong verb before anything is sent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from celery import Celery

from postroom import MessageBus, WrongMessageKind
from tasks.assets import AssetRegistered, GetAsset, RegisterAsset

# An app whose broker does not exist: a refused call must fail before it tries to connect.
bus = MessageBus(Celery(broker="redis://127.0.0.1:1/0"))
event = AssetRegistered(asset_id=uuid.uuid4(), name="x", registered_at=datetime.now(UTC))


def test_sending_an_event_says_to_publish_it() -> None:
    with pytest.raises(WrongMessageKind, match=r"use bus.publish\(event\)"):
        bus.send(event)  # type: ignore[arg-type]


def test_publishing_a_command_says_to_send_it() -> None:
    with pytest.raises(WrongMessageKind, match=r"bus.send\(command\)"):
        bus.publish(RegisterAsset(name="x"))  # type: ignore[arg-type]


def test_asking_takes_queries_only() -> None:
    with pytest.raises(WrongMessageKind, match="takes a Query"):
        bus.ask(RegisterAsset(name="x"))  # type: ignore[arg-type]
    assert GetAsset.kind == "query"
