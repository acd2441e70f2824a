"""The worker pools of this deployment: which queues each consumes, and how many processes.

A pool is one service's (or one subscriber's) competing consumers: every process of a pool reads
the same queues, and a message goes to exactly one of them. A subscriber pool reads its own events
queue (its copy of every event it subscribes to) and the command queue its queries arrive on.
"""

from __future__ import annotations

from dataclasses import dataclass

from postroom.topology import command_queue_name, event_queue_name


@dataclass(frozen=True)
class Pool:
    name: str
    queues: tuple[str, ...]
    concurrency: int = 2
    pool: str = "prefork"  # Celery's -P: prefork, threads, solo, ...
    prefetch_multiplier: int = 1  # take one message at a time, so a slow one holds up nothing


def service_pool(name: str, concurrency: int = 2) -> Pool:
    """A pool that owns commands and queries: ``commands.<name>``."""
    return Pool(name, (command_queue_name(name),), concurrency)


def subscriber_pool(name: str, concurrency: int = 1) -> Pool:
    """A pool that subscribes to events (``events.<name>``) and answers queries on its read model."""
    return Pool(name, (event_queue_name(name), command_queue_name(name)), concurrency)


POOLS: tuple[Pool, ...] = (
    service_pool("assets"),
    # positions are handled in order per asset: one message at a time per worker (see partitions)
    service_pool("geofence", concurrency=1),
    subscriber_pool("search"),
    subscriber_pool("analytics"),
    subscriber_pool("notifications"),
)


def pool_named(name: str) -> Pool:
    for pool in POOLS:
        if pool.name == name:
            return pool
    known = ", ".join(p.name for p in POOLS)
    raise KeyError(f"no pool named {name!r}; the pools of config/pools.py are: {known}")
