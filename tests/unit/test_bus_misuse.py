"""The bus refuses a message handed to the wrong verb before anything is sent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from celery import Celery

from postroom import InvalidSchedule, MessageBus, WrongMessageKind
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


@pytest.mark.parametrize(
    ("when", "problem"),
    [
        ({"delay": -1.0}, "delay must be a number of seconds >= 0"),
        ({"delay": float("nan")}, "delay must be a number of seconds >= 0"),
        ({"not_before": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"delay": 1.0, "not_before": datetime.now(UTC)}, "not both"),
    ],
)
def test_a_bad_schedule_is_refused_before_anything_is_sent(
    when: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidSchedule, match=problem):
        bus.send(GetAsset(asset_id=uuid.uuid4()), **when)
    with pytest.raises(InvalidSchedule, match=problem):
        bus.publish(event, **when)
