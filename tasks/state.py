"""Where the reference services keep their state: a real Redis, each service under its own keys."""

from __future__ import annotations

from functools import cache

import redis

from config.settings import settings


@cache
def client() -> redis.Redis:
    """One client per process; redis-py's pool notices a fork and reconnects in the child."""
    return redis.Redis.from_url(settings.state, decode_responses=True)


def key(service: str, *parts: str) -> str:
    return ":".join((settings.namespace, service, *parts))
