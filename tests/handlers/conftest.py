"""The reference services under postroom.testing: their state in a Redis DB of the tests' own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

import tasks.state
from postroom.settings import Settings
from postroom.testing import Harness

STATE = "redis://127.0.0.1:6379/13"


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """A harness whose handlers keep their state under a namespace of this test's own."""
    namespace = f"h{uuid.uuid4().hex[:10]}"
    settings = Settings(state_url=STATE, namespace=namespace)
    monkeypatch.setattr(tasks.state, "_settings", lambda: settings)
    tasks.state.client.cache_clear()
    client = tasks.state.client()
    yield Harness(state=client)
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    tasks.state.client.cache_clear()
