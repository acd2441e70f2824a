"""The assets service from the seeds: it owns RegisterAsset, BindDevice and GetAsset.

Its contracts live here, next to their owner: the service defines the schema of the commands it
accepts. Senders import these classes and nothing else. Its state lives in PostgreSQL (the tables
below, created by tasks/migrations with postroom's own): a command's handler reads and writes
through ``ctx.transaction()``, a SQLAlchemy Session that commits with the inbox mark and the
events it published (config/celery.py gives the service its SQL store).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    select,
)
from sqlalchemy.dialects.postgresql import insert

from postroom import Command, Event, HandlerContext, Query, Rejected, handles
from tasks.state import database

SERVICE = "assets"
#: asset IDs derive from the command's message ID, so a redelivered command finds its own asset
_ASSET_IDS = uuid.UUID("6d0f8a52-2f4e-4d8e-9b1c-3a7f0e6b5c21")

#: as tasks/migrations creates them (in POSTROOM_DATABASE_SCHEMA)
metadata = MetaData()
assets = Table(
    "assets",
    metadata,
    Column("asset_id", Uuid, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("description", Text),
    Column("attributes", JSON, nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False),
)
devices = Table(
    "asset_devices",
    metadata,
    Column("device_id", Uuid, primary_key=True),
    Column("asset_id", Uuid, ForeignKey("assets.asset_id"), nullable=False, index=True),
)


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


@handles(RegisterAsset, service=SERVICE)
def register_asset(cmd: RegisterAsset, ctx: HandlerContext) -> dict[str, str]:
    """Store the asset and announce it; the reply carries the new asset's ID.

    The row, the inbox mark and the event commit together; the event leaves once they have.
    Two copies of the command running at once both get here; the one whose mark commits first
    wins, and the other's insert is a no-op dropped with its transaction.
    """
    session = ctx.transaction()
    asset_id = uuid.uuid5(_ASSET_IDS, ctx.message_id)
    record = session.execute(select(assets).filter_by(asset_id=asset_id)).mappings().first()
    if record is None:
        record = {
            "asset_id": asset_id,
            "name": cmd.name,
            "description": cmd.description,
            "attributes": cmd.attributes,
            "registered_at": datetime.now(UTC),
        }
        session.execute(insert(assets).values(record).on_conflict_do_nothing())
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
    session = ctx.transaction()
    if session.scalar(select(assets.c.asset_id).filter_by(asset_id=cmd.asset_id)) is None:
        raise Rejected(f"asset {cmd.asset_id} does not exist: register it first")
    # a binding of the same device in flight elsewhere makes this wait, then see its asset
    session.execute(
        insert(devices)
        .values(device_id=cmd.device_id, asset_id=cmd.asset_id)
        .on_conflict_do_nothing()
    )
    owner = session.scalar(select(devices.c.asset_id).filter_by(device_id=cmd.device_id))
    if owner != cmd.asset_id:
        raise Rejected(f"device {cmd.device_id} is already bound to asset {owner}")
    ctx.publish(
        DeviceBound(asset_id=cmd.asset_id, device_id=cmd.device_id, bound_at=datetime.now(UTC))
    )
    return {"asset_id": str(cmd.asset_id), "device_id": str(cmd.device_id)}


@handles(GetAsset, service=SERVICE)
def get_asset(query: GetAsset, ctx: HandlerContext) -> dict[str, Any]:
    """A query changes nothing: it reads on a connection of its own, not ctx.transaction()."""
    with database().engine.connect() as conn:
        found = conn.execute(select(assets).filter_by(asset_id=query.asset_id)).mappings().first()
        if found is None:
            raise Rejected(f"asset {query.asset_id} does not exist")
        bound = conn.scalars(select(devices.c.device_id).filter_by(asset_id=query.asset_id))
        asset = dict(found)
        asset["devices"] = sorted(str(device_id) for device_id in bound)
    asset["asset_id"] = str(asset["asset_id"])
    asset["registered_at"] = asset["registered_at"].astimezone(UTC).isoformat()
    return asset
