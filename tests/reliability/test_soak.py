"""The soak run, small: 2,000 commands and 2,000 events, nothing lost, nothing doubled."""

from __future__ import annotations

import pytest

from bench.soak import run
from tests.support import BrokerContext

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(400)]
SETTINGS = {"imports": "bench.services"}


def test_2000_commands_and_2000_events_each_have_exactly_one_effect(broker: BrokerContext) -> None:
    result = run(broker, commands=2000, events=2000, timeout=300)
    print(result.report())
    for owner in result.sent:
        assert result.lost(owner) == 0, owner
        assert result.doubled(owner) == 0, owner
    assert result.ok, result.report()
