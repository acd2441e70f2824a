"""Where the reference services keep their state: a real Redis, each service under its own keys."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from config.settings import Settings


def _settings() -> Settings:
    # Imported when first used, not at import: ``config`` imports the services, which import this.
    from config.settings import settings  # noqa: PLC0415

    return settings


@cache
def client() -> redis.Redis:
    """One client per process; redis-py's pool notices a fork and reconnects in the child."""
    return redis.Redis.from_url(_settings().state, decode_responses=True)


def key(service: str, *parts: str) -> str:
    return ":".join((_settings().namespace, service, *parts))
