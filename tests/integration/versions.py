"""A contract at its third version, with upcasters from the first and second, for the upcasting
tests. Version 1 had flat ``lat``/``lon``; version 2 nested them in ``position``; version 3 added
``note``. The handler records exactly what it was given."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from postroom import Command, Event, HandlerContext, handles, subscribes, upcaster
from tasks.state import key


class Position(BaseModel):
    lat: float
    lon: float


class Relocate(Command, service="versioned", version=3):
    asset: str
    position: Position
    note: str


class Relocated(Event, service="versioned", version=2):
    asset: str
    position: Position


@upcaster(Relocate, from_version=1)
def nest_position(payload: dict[str, Any]) -> dict[str, Any]:
    payload["position"] = {"lat": payload.pop("lat"), "lon": payload.pop("lon")}
    return payload


@upcaster(Relocate, from_version=2)
def add_note(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "note": "(written before notes existed)"}


@upcaster(Relocated, from_version=1)
def nest_event_position(payload: dict[str, Any]) -> dict[str, Any]:
    return {"asset": payload["asset"], "position": {"lat": payload["lat"], "lon": payload["lon"]}}


@handles(Relocate)
def relocate(cmd: Relocate, ctx: HandlerContext) -> dict[str, Any]:
    ctx.transaction().set(key("versioned", "got", cmd.asset), cmd.model_dump_json())
    return cmd.model_dump(mode="json")


@subscribes(Relocated, pool="versioned_sub")
def relocated(event: Relocated, ctx: HandlerContext) -> None:
    ctx.transaction().set(key("versioned", "event", event.asset), json.dumps(event.payload()))
