"""How long a transient failure waits before its next attempt, and how many attempts it gets."""

from __future__ import annotations

import random
from dataclasses import dataclass

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc

from postroom.errors import TransientError

#: failures worth retrying besides TransientError: the broker, a Redis store or the database went
#: away for a moment (a PostgreSQL restart, a connection dropped mid-commit; postroom.stores.sql
#: turns any other error of a lost connection into a TransientError)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
    sqlalchemy.exc.OperationalError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a message runs at most ``max_retries + 1`` times in all."""

    max_retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    retry_on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS

    def delay(self, retries_so_far: int) -> float:
        """Seconds before the next attempt: half fixed, half random, so retries do not stampede."""
        ceiling = min(self.backoff_max, self.backoff * 2.0**retries_so_far)
        return ceiling / 2 + random.uniform(0, ceiling / 2)
