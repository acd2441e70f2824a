"""Redis round trips per command round trip, by process: what a round trip's time is spent on.

Counted from Redis's MONITOR feed while sequential round trips run (after the timed ones: MONITOR
slows the server). Only the clients of the measured processes count, found by their connections'
ports: the sender (this process), the pool's main process (fetch, acknowledgement, Flower's task
events) and its child processes (the handler's store, the result). A pipelined write shows in the
feed as consecutive commands of one client, microseconds apart, and counts as one round trip; a
Lua script's own calls (client ``lua``) are part of the script's. What the same processes do
idle for as long (their timers) is subtracted.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import psutil  # type: ignore[import-untyped]
import redis

#: consecutive commands of one client closer than this came in one write (a pipeline, MULTI/EXEC).
#: Measured here under MONITOR: a write's commands run up to 0.3 ms apart (the feed formats each
#: one, a 1.5 KB message body too), while a second round trip, which needs the reply read and a
#: new call made in Python, comes 1.5 ms or more later. A count is a heuristic, right when those
#: two stay apart.
PIPELINED_S = 0.0005
ROLES = ("sender", "worker", "worker_child")


def roundtrips_per_message(
    redis_url: str, roundtrip: Callable[[], Any], count: int, pool_pid: int
) -> dict[str, float]:
    """Round trips to the Redis server at ``redis_url`` per ``roundtrip()``, by role; less those
    the same processes make idle in as long (timers: delay promotion, heartbeats, result polls)."""

    def run() -> None:
        for _ in range(count):
            roundtrip()

    busy, elapsed = _watched(redis_url, run)
    idle, _ = _watched(redis_url, lambda: time.sleep(elapsed))
    roles = _roles(redis_url, pool_pid)
    working, resting = _trips(busy, roles), _trips(idle, roles)
    return {role: max(0.0, working[role] - resting[role]) / count for role in ROLES}


def _watched(redis_url: str, action: Callable[[], None]) -> tuple[list[dict[str, Any]], float]:
    """The MONITOR feed while ``action()`` runs (and half a second more, for what follows a
    reply: the pool's acknowledgement, its last task events), and how long ``action`` took."""
    feed: list[dict[str, Any]] = []
    done = threading.Event()
    with redis.Redis.from_url(redis_url) as client, client.monitor() as monitor:
        listening = threading.Thread(target=_listen, args=(monitor, feed, done), daemon=True)
        listening.start()
        time.sleep(0.2)
        started = time.perf_counter()
        action()
        elapsed = time.perf_counter() - started
        time.sleep(0.5)
        done.set()
        client.ping()  # one more line, so the listener sees the flag
        listening.join(5)
    return feed, elapsed


def _trips(feed: list[dict[str, Any]], roles: dict[int, str]) -> Counter[str]:
    trips: Counter[str] = Counter()
    last: dict[int, tuple[float, int]] = {}  # client port: its last command's time and position
    calls = [line for line in feed if line.get("client_type") != "lua"]
    for position, line in enumerate(calls):
        port = int(line["client_port"])
        role = roles.get(port)
        if role is None:
            continue
        previous = last.get(port)
        if (
            previous is None
            or previous[1] != position - 1
            or line["time"] - previous[0] > PIPELINED_S
        ):
            trips[role] += 1
        last[port] = (line["time"], position)
    return trips


def _listen(monitor: Any, feed: list[dict[str, Any]], done: threading.Event) -> None:
    for line in monitor.listen():
        if done.is_set():
            return
        feed.append(line)


def _roles(redis_url: str, pool_pid: int) -> dict[int, str]:
    """Each client port of the measured processes connected to that server, with its role."""
    server_port = urlsplit(redis_url).port or 6379
    pool = psutil.Process(pool_pid)
    pids = {os.getpid(): "sender", pool_pid: "worker"}
    pids.update({child.pid: "worker_child" for child in pool.children(recursive=True)})
    return {
        conn.laddr.port: pids[conn.pid]
        for conn in psutil.net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == server_port and conn.pid in pids
    }
