"""Taking a message off a Redis queue and recording it as unacknowledged, in one step.

kombu's consumer pops a message with ``BRPOP`` and records it in its ``unacked`` hash and
``unacked_index`` sorted set one round trip later (``QoS.append``): a worker killed in between
loses the message (celery/celery#7950). FETCH does both inside one Lua script, and writes exactly
what ``QoS.append`` writes (``[payload, exchange, routing_key]`` under the delivery tag, indexed by
delivery time), so kombu's acks, ``restore_visible``, Flower and older workers treat it as their
own.

A blocking pop cannot run inside a script, so a consumer that found its queues empty blocks
(``BZPOPMIN``) on their doorbells instead: one tiny sorted set per queue, which every postroom path
putting a message on a queue rings after the push. The consumer sends its next FETCH right behind
the wait, in the same write, and Redis runs it the moment a doorbell rings or the wait times out
(kombu's ``brpop_timeout``, one second): a woken consumer gets the message in the same round trip,
and the timeout is what finds the messages of a publisher that does not ring, such as a stock
kombu client, so theirs wait up to that second longer. The delivery time such a fetch records is
when the consumer sent it, so up to that second early: kombu's sweep may count the message as
overdue that much sooner.

A ring wakes one consumer. FETCH rings again when it leaves messages behind in the queue, so a
burst wakes the idle consumers one after another, and it silences the doorbells of queues it finds
empty, so a stale ring costs at most one extra fetch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

#: the one member of a doorbell: ringing twice before anyone wakes is ringing once
RING = "ring"
#: a ring only has to outlive the moment between a consumer's empty fetch and its wait; this
#: bounds the doorbells of queues nobody consumes any more (a Celery client's reply queue, say)
DOORBELL_TTL_MS = 60_000

#: KEYS: the unacked hash, its index, the n lists to try in order, then one doorbell per queue.
#: ARGV: the time now, n, each list's queue (its doorbell's position), then per queue '1' if a
#: message taken from it is recorded as unacknowledged ('0' for a no-ack consumer's queue).
#: Returns {list position, payload, 1 if recorded} or nil. The pop comes first: once a script has
#: written, Redis lets it finish even over maxmemory, so it never pops without recording. A
#: payload it cannot read (not kombu's JSON) is handed over unrecorded, for kombu to deal with as
#: it always has.
FETCH = f"""
local n = tonumber(ARGV[2])
local bells = 2 + n
for i = 1, n do
    local raw = redis.call('RPOP', KEYS[2 + i])
    if raw then
        local queue = tonumber(ARGV[2 + i])
        local recorded = 0
        if ARGV[2 + n + queue] == '1' then
            local ok, message = pcall(cjson.decode, raw)
            local properties = ok and type(message) == 'table' and message.properties
            if type(properties) == 'table' then
                local tag, info = properties.delivery_tag, properties.delivery_info
                if type(tag) == 'string' and type(info) == 'table'
                        and info.exchange ~= nil and info.routing_key ~= nil then
                    redis.call('ZADD', KEYS[2], ARGV[1], tag)
                    redis.call('HSET', KEYS[1], tag, '[' .. raw .. ', '
                        .. cjson.encode(info.exchange) .. ', '
                        .. cjson.encode(info.routing_key) .. ']')
                    recorded = 1
                end
            end
        end
        for j = 1, n do
            if tonumber(ARGV[2 + j]) == queue and redis.call('LLEN', KEYS[2 + j]) > 0 then
                redis.call('ZADD', KEYS[bells + queue], 0, '{RING}')
                redis.call('PEXPIRE', KEYS[bells + queue], {DOORBELL_TTL_MS})
                break
            end
        end
        return {{i, raw, recorded}}
    end
end
for q = bells + 1, #KEYS do
    redis.call('DEL', KEYS[q])
end
return false
"""
FETCH_SHA = hashlib.sha1(FETCH.encode()).hexdigest()


def doorbell(queue: str) -> str:
    """The key of ``queue``'s doorbell (before kombu's global key prefix)."""
    return f"_postroom.doorbell.{queue}"


def ring(add: Callable[..., Any], queue: str) -> None:
    """Ring ``queue``'s doorbell through ``add(command, *args)``: a pipeline's or a kombu publish
    batch's, queued after the push so no consumer wakes before the message is there."""
    bell = doorbell(queue)
    add("zadd", bell, {RING: 0})
    add("pexpire", bell, DOORBELL_TTL_MS)


def fetch_command(
    prefix: str,
    unacked: tuple[str, str],
    *,
    lists: Sequence[tuple[str, int]],
    queues: Sequence[str],
    recorded: Sequence[bool],
    now: float,
) -> list[Any]:
    """``EVALSHA`` of FETCH trying ``lists`` in order, each given with its queue's position in
    ``queues``; keys are prefixed here since kombu's client prefixes only a script's first key."""
    keys = [*unacked, *(name for name, _ in lists), *(doorbell(q) for q in queues)]
    return [
        "EVALSHA",
        FETCH_SHA,
        len(keys),
        *(prefix + key for key in keys),
        now,
        len(lists),
        *(position + 1 for _, position in lists),
        *("1" if r else "0" for r in recorded),
    ]


def wait_command(prefix: str, queues: Sequence[str], timeout: float) -> list[Any]:
    """``BZPOPMIN`` on the doorbells of ``queues`` (0: no timeout), to send before a fetch."""
    return ["BZPOPMIN", *(prefix + doorbell(q) for q in queues), timeout]
