"""Which RabbitMQ delay level a message waits in: never one that would deliver it late by more
than the smallest level, and never early."""

from __future__ import annotations

import pytest

from postroom._celery.delays import LEVELS, level_for


@pytest.mark.parametrize(
    ("remaining", "level"),
    [(0.0, 100), (0.05, 100), (0.1, 100), (0.15, 100), (2.5, 1600), (60.0, 51200)],
)
def test_a_delay_waits_in_the_longest_level_that_does_not_overshoot_it(
    remaining: float, level: int
) -> None:
    assert level_for(remaining) == level


def test_a_delay_longer_than_every_level_waits_in_the_longest_and_comes_back() -> None:
    assert level_for(10**7) == LEVELS[-1]
    assert LEVELS[-1] / 3_600_000 > 48  # two days in one hop
