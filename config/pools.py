"""The worker pools of this deployment: which queues each consumes, and how many processes.

A pool is one service's (or one subscriber's) competing consumers: every process of a pool reads
the same queues, and a message goes to exactly one of them. A subscriber pool reads its own events
queue (its copy of every event it subscribes to) and the command queue its queries arrive on.
``postroom`` uses these rather than the pools it would derive from the registry
(workers/deployment.py), for their concurrency and because the test services add pools of
their own that are started by the tests alone.
"""

from __future__ import annotations

from workers.deployment import Pool, service_pool, subscriber_pool

__all__ = ["POOLS", "Pool", "pool_named", "service_pool", "subscriber_pool"]

POOLS: tuple[Pool, ...] = (
    service_pool("assets"),
    # positions are handled in order per asset: one message at a time per worker (see partitions)
    service_pool("geofence", concurrency=1),
    subscriber_pool("search"),
    subscriber_pool("analytics"),
    subscriber_pool("notifications"),
    # seed 004's marketplace: orders, their payments and vendors, and the fulfilment process
    # manager across them (its events on events.fulfilment, its timeouts on commands.fulfilment)
    service_pool("orders"),
    service_pool("payments"),
    service_pool("vendors"),
    subscriber_pool("fulfilment", concurrency=2),
    # POSTs the replies of commands sent with a callback URL (postroom.webhook_handler): a pool
    # of its own, so a slow receiver holds up callbacks only
    service_pool("webhooks"),
)


def pool_named(name: str) -> Pool:
    for pool in POOLS:
        if pool.name == name:
            return pool
    known = ", ".join(p.name for p in POOLS)
    raise KeyError(f"no pool named {name!r}; the pools of config/pools.py are: {known}")
