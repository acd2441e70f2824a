"""The assets service from the seeds: it owns RegisterAsset, BindDevice and GetAsset.

Its contracts live here, next to their owner: the service defines the schema of the commands it
accepts. Senders import these classes and nothing else.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import Field

from postroom import Command, Event, HandlerContext, Query, Rejected, handles
from tasks.state import client, key

SERVICE = "assets"
#: asset IDs derive from the command's message ID, so a redelivered command finds its own asset
_ASSET_IDS = uuid.UUID("6d0f8a52-2f4e-4d8e-9b1c-3a7f0e6b5c21")


class RegisterAsset(Command):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    attributes: dict[str, str] = Field(default_factory=dict)


class BindDevice(Command):
    asset_id: uuid.UUID
    device_id: uuid.UUID


class GetAsset(Query):
    asset_id: uuid.UUID


class AssetRegistered(Event):
    asset_id: uuid.UUID
    name: str
    description: str | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    registered_at: datetime


class DeviceBound(Event):
    asset_id: uuid.UUID
    device_id: uuid.UUID
    bound_at: datetime


def _asset_key(asset_id: uuid.UUID | str) -> str:
    return key(SERVICE, "asset", str(asset_id))


def _load(asset_id: uuid.UUID) -> dict[str, Any] | None:
    raw = client().get(_asset_key(asset_id))
    return None if raw is None else dict(json.loads(raw))


@handles(RegisterAsset, service=SERVICE)
def register_asset(cmd: RegisterAsset, ctx: HandlerContext) -> dict[str, str]:
    """Store the asset, then tell whoever cares; the reply carries the new asset's ID.

    The event goes out before the write commits (together with the inbox mark, in one
    transaction): a crash in between runs the handler again, which publishes the same event ID
    again, and subscribers drop the repeat. The other order could lose the event.
    """
    asset_id = uuid.uuid5(_ASSET_IDS, ctx.message_id)
    record = _load(asset_id) or {
        "asset_id": str(asset_id),
        "name": cmd.name,
        "description": cmd.description,
        "attributes": cmd.attributes,
        "registered_at": datetime.now(UTC).isoformat(),
    }
    ctx.transaction().set(_asset_key(asset_id), json.dumps(record), nx=True)
    ctx.publish(
        AssetRegistered(
            asset_id=asset_id,
            name=record["name"],
            description=record["description"],
            attributes=record["attributes"],
            registered_at=record["registered_at"],
        )
    )
    return {"asset_id": str(asset_id)}


@handles(BindDevice, service=SERVICE)
def bind_device(cmd: BindDevice, ctx: HandlerContext) -> dict[str, str]:
    if _load(cmd.asset_id) is None:
        raise Rejected(f"asset {cmd.asset_id} does not exist: register it first")
    device_key = key(SERVICE, "device", str(cmd.device_id))
    owner = client().get(device_key)
    if owner is not None and owner != str(cmd.asset_id):
        raise Rejected(f"device {cmd.device_id} is already bound to asset {owner}")
    tx = ctx.transaction()
    tx.set(device_key, str(cmd.asset_id))
    tx.sadd(key(SERVICE, "devices", str(cmd.asset_id)), str(cmd.device_id))
    ctx.publish(
        DeviceBound(asset_id=cmd.asset_id, device_id=cmd.device_id, bound_at=datetime.now(UTC))
    )
    return {"asset_id": str(cmd.asset_id), "device_id": str(cmd.device_id)}


@handles(GetAsset, service=SERVICE)
def get_asset(query: GetAsset, ctx: HandlerContext) -> dict[str, Any]:
    asset = _load(query.asset_id)
    if asset is None:
        raise Rejected(f"asset {query.asset_id} does not exist")
    asset["devices"] = sorted(client().smembers(key(SERVICE, "devices", str(query.asset_id))))
    return asset
