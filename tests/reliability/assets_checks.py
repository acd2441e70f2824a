"""What the outbox tests check of the assets service once its commands ran: one row per command
in its PostgreSQL, one AssetRegistered delivery per subscriber pool, nothing left in an outbox."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence

from sqlalchemy import Engine, text

from postroom import MessageBus, PendingReply
from tasks.assets import RegisterAsset
from tests.support import BrokerContext, wait_for

#: asset IDs derive from the command's message ID (tasks/assets.py)
ASSET_IDS = uuid.UUID("6d0f8a52-2f4e-4d8e-9b1c-3a7f0e6b5c21")
SUBSCRIBERS = ("search", "analytics", "notifications")


def asset_id(pending: PendingReply) -> uuid.UUID:
    return uuid.uuid5(ASSET_IDS, pending.message_id)


def register(bus: MessageBus, run: str, n: int) -> list[PendingReply]:
    return bus.send_many([RegisterAsset(name=f"crate {run} n{i}") for i in range(n)])


def rows(db: Engine, broker: BrokerContext, ids: Sequence[uuid.UUID]) -> dict[str, int]:
    """How many rows of the assets table each of ``ids`` has (absent: none)."""
    query = text(
        f'SELECT asset_id::text, count(*) FROM "{broker.settings.database_schema}".assets '
        "WHERE asset_id = ANY(:ids) GROUP BY asset_id"
    )
    with db.connect() as conn:
        return {row[0]: row[1] for row in conn.execute(query, {"ids": list(ids)})}


def sql_outbox(db: Engine, broker: BrokerContext) -> int:
    query = f'SELECT count(*) FROM "{broker.settings.database_schema}".postroom_outbox'
    with db.connect() as conn:
        return int(conn.scalar(text(query)) or 0)


def registered(broker: BrokerContext) -> int:
    return int(broker.state().hget(broker.key("analytics", "counts"), "assets_registered") or 0)


def announced_once(db: Engine, broker: BrokerContext, before: int, names: dict[str, str]) -> None:
    """Each asset's AssetRegistered (``names``: asset ID to name) reached every subscriber pool
    once, and no outbox holds anything any more."""
    inbox = broker.app.conf.postroom.reliability.inbox

    def drained() -> bool:
        return (
            registered(broker) - before >= len(names)
            and sql_outbox(db, broker) == 0
            and inbox.pending() == 0
        )

    try:
        wait_for(drained, timeout=60)
    except AssertionError:
        raise AssertionError(
            f"analytics counted {registered(broker) - before} of {len(names)}; outboxes: "
            f"SQL {sql_outbox(db, broker)}, Redis {inbox.pending()}"
        ) from None
    time.sleep(3)  # a late second copy (a sweep of an entry already sent) would arrive by now
    assert registered(broker) - before == len(names)  # one delivery per pool per event
    assert sql_outbox(db, broker) == 0
    assert inbox.pending() == 0

    state = broker.state()
    ids = list(names)
    notes = [state.lrange(broker.key("notifications", "asset", i), 0, -1) for i in ids]
    assert [len(n) for n in notes] == [1] * len(ids)  # one notification per asset
    texts = [json.loads(n[0])["text"] for n in notes]
    assert texts == [f"Asset {names[i]!r} was registered" for i in ids]
    indexed = state.hmget(broker.key("search", "names"), ids)
    assert indexed == [names[i] for i in ids]  # each asset indexed under its name
