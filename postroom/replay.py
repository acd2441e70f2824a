"""Replay: re-deliver logged events to one pool, and bootstrap a new pool from history.

```
  event log ──(the types the pool subscribes to, since T)──> ( events.<pool> ) ──> pool <pool>
                                                                  ▲
  bus.publish ──> [postroom.events] ──(live, once bound)──────────┘
```

A replayed event is the same message: its original message ID and headers, so the pool's inbox
skips the ones the pool already handled. Copies go straight into that pool's queue by name, never
through the events exchange, so no other pool sees one. ``force`` adds ``postroom.replay`` (a
fresh ID per replay run): the pool's worker then treats each copy as a delivery of its own (see
subscribers.replayed_id) and runs the handler again.

Bootstrapping a pool that never ran: its queue is declared and bound first, so every event
published from then on gets a live copy; only then is the log's newest position read, and history
is replayed up to it. The bus logs an event before publishing it, so an event logged after that
position was published after the binding existed and has a live copy; one logged before it is
replayed. No event falls between the two. The few in flight at that moment get both copies, and
the pool's inbox runs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery.utils.nodenames import anon_nodename
from kombu import Queue

from postroom._celery.queue_types import queue_types_checked
from postroom._celery.wire import CHUNK, TaskMessage, event_message, publish_many
from postroom.errors import InvalidMessage, PostroomError
from postroom.eventlog import EventStore, LoggedEvent, event_log
from postroom.headers import REPLAY, Envelope, uuid7
from postroom.install import installation
from postroom.registry import registry
from postroom.signing import SIGNATURE, Signer, signer
from postroom.topology import event_queue


class ReplayError(PostroomError, ValueError):
    """A replay that cannot be done as asked: an unknown pool, or a type it does not subscribe to."""


@dataclass(frozen=True)
class Replayed:
    """What a replay did: how many events went into which queue, up to which log position."""

    pool: str
    queue: str
    event_types: tuple[str, ...]
    count: int
    until: str  # the log position read up to: later events reach the pool live
    replay_id: str | None  # set when forced: the postroom.replay header of every copy
    refused: tuple[str, ...]  # message IDs not replayed: their signature does not verify
    oldest: datetime | None  # when the oldest replayed event was logged


def subscriptions(pool: str) -> list[str]:
    """The event types a pool subscribes to; ReplayError naming the known pools if none."""
    types = registry.subscriptions(pool)
    if not types:
        known = ", ".join(sorted(registry.pools())) or "none"
        raise ReplayError(
            f"pool {pool!r} subscribes to no event type this process knows (subscriber pools: "
            f"{known}): check the name, and that the module holding its @subscribes handlers is "
            "imported (POSTROOM_IMPORTS)"
        )
    return types


def replay(
    app: Any,
    pool: str,
    *,
    since: datetime | None = None,
    event_type: str | None = None,
    force: bool = False,
    store: EventStore | None = None,
) -> Replayed:
    """Put the logged events ``pool`` subscribes to into its queue, declaring the queue first.

    Works on a pool whose queue does not exist yet (bootstrap, see the module docstring).
    """
    types = subscriptions(pool)
    if event_type is not None and event_type not in types:
        raise ReplayError(
            f"pool {pool!r} does not subscribe to {event_type!r}, so it would ignore it; "
            f"it subscribes to: {', '.join(types)}"
        )
    wanted = {event_type} if event_type else set(types)
    store = event_log(app) if store is None else store
    installed = installation(app)
    queue = event_queue(pool, types, installed.queue_type, delivery_limit=installed.delivery_limit)
    replay_id = uuid7() if force else None
    sign, origin = signer(app), anon_nodename()
    count, refused, oldest = 0, [], None
    with queue_types_checked(), app.producer_or_acquire() as producer:
        queue.bind(producer.channel).declare()  # first, so live copies accumulate from now on
        until = store.position()  # then history up to this moment, and not one event later
        batch: list[tuple[Queue, TaskMessage]] = []
        for logged in store.read(since, event_type, until=until):
            if logged.message_type not in wanted:
                continue
            message = _message(app, logged, replay_id, sign, origin)
            if message is None:
                refused.append(logged.message_id)
                continue
            batch.append((queue, message))
            oldest = oldest or logged.logged_at
            if len(batch) >= CHUNK:
                publish_many(producer, batch)
                count, batch = count + len(batch), []
        publish_many(producer, batch)
        count += len(batch)
    return Replayed(pool, queue.name, tuple(types), count, until, replay_id, tuple(refused), oldest)


def _message(
    app: Any, logged: LoggedEvent, replay_id: str | None, sign: Signer | None, origin: str
) -> TaskMessage | None:
    """The task message the bus published for this event (with REPLAY added when forced).

    With signing on, a logged event must still verify: whoever can write to the log's Redis
    must not get a message signed by replaying it. A forced copy is re-signed, since the replay
    header is part of the signed envelope.
    """
    headers = dict(logged.headers)
    try:
        envelope = Envelope.from_headers(headers)
        if sign is not None:
            sign.verify(logged.message_type, logged.payload, headers)
    except InvalidMessage:
        return None
    if replay_id is not None:
        headers[REPLAY] = replay_id
        if sign is not None:
            headers[SIGNATURE] = sign.sign(logged.message_type, logged.payload, headers)
    return event_message(app, envelope, logged.payload, headers, origin)
