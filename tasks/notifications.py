"""Pool 'notifications': records a notification per event, and answers ListNotifications."""

from __future__ import annotations

import json
import uuid

from postroom import HandlerContext, Query, handles, subscribes
from tasks.assets import AssetRegistered, DeviceBound
from tasks.geofence import AssetEnteredGeofence, AssetExitedGeofence
from tasks.state import client, key

POOL = "notifications"


class ListNotifications(Query):
    asset_id: uuid.UUID


def _record(asset_id: uuid.UUID, text: str, ctx: HandlerContext) -> None:
    note = {
        "text": text,
        "message_id": ctx.message_id,
        "correlation_id": ctx.correlation_id,
        "at": ctx.envelope.created_at,
    }
    ctx.transaction().rpush(key(POOL, "asset", str(asset_id)), json.dumps(note))  # once per event


@subscribes(AssetRegistered, pool=POOL)
def notify_registered(event: AssetRegistered, ctx: HandlerContext) -> None:
    _record(event.asset_id, f"Asset {event.name!r} was registered", ctx)


@subscribes(DeviceBound, pool=POOL)
def notify_bound(event: DeviceBound, ctx: HandlerContext) -> None:
    _record(event.asset_id, f"Device {event.device_id} was bound", ctx)


@subscribes(AssetEnteredGeofence, pool=POOL)
def notify_entered(event: AssetEnteredGeofence, ctx: HandlerContext) -> None:
    _record(
        event.asset_id, f"Entered geofence {event.geofence_id!r} at {event.at.isoformat()}", ctx
    )


@subscribes(AssetExitedGeofence, pool=POOL)
def notify_exited(event: AssetExitedGeofence, ctx: HandlerContext) -> None:
    _record(event.asset_id, f"Exited geofence {event.geofence_id!r} at {event.at.isoformat()}", ctx)


@handles(ListNotifications, service=POOL)
def list_notifications(query: ListNotifications, ctx: HandlerContext) -> list[dict[str, str]]:
    raw = client().lrange(key(POOL, "asset", str(query.asset_id)), 0, -1)
    return [json.loads(item) for item in raw]
