"""The geofence service: it owns DefineGeofence, RemoveGeofence, RecordPosition and
GetAssetGeofences, and publishes AssetEnteredGeofence / AssetExitedGeofence.

```
  RecordPosition(asset, lat, lon, at) ──> ( commands.geofence ) ──> pool "geofence"
                                                                        │ newer than the last
                                                                        │ applied position?
                                                                        ▼
              AssetEnteredGeofence / AssetExitedGeofence ──> [ postroom.events ] ──> subscribers
```

Positions may arrive late, twice, or out of order (retries and competing workers reorder messages).
The service keeps, per asset, the time of the last position it applied and the geofences the asset
was inside then. A position no later than that is old news: it is ignored, so it can never cause an
enter or an exit that did not happen. The geometry is pure functions, testable without a broker.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, cast

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from postroom import Command, Event, HandlerContext, Query, Rejected, handles
from tasks.state import client, key

SERVICE = "geofence"
#: mean Earth radius (IUGG), in metres: the sphere haversine distances are measured on
EARTH_RADIUS_M = 6_371_008.8

Latitude = Annotated[float, Field(ge=-90, le=90, allow_inf_nan=False)]
Longitude = Annotated[float, Field(ge=-180, le=180, allow_inf_nan=False)]


class LatLon(BaseModel):
    """A point on the Earth, in decimal degrees (WGS 84)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lat: Latitude
    lon: Longitude


class Circle(BaseModel):
    """Every point within ``radius_m`` metres (great-circle distance) of ``center``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["circle"] = "circle"
    center: LatLon
    radius_m: float = Field(gt=0, allow_inf_nan=False)


class Polygon(BaseModel):
    """The area inside a ring of at least three vertices (the ring closes itself).

    Containment is tested by ray casting on raw latitude and longitude, as if they were plane
    coordinates: edges are straight lines in degrees, not great circles. That is accurate enough
    for polygons a few kilometres across, away from the poles; a polygon may not cross the
    antimeridian (split it in two).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["polygon"] = "polygon"
    vertices: tuple[LatLon, ...] = Field(min_length=3)

    @field_validator("vertices")
    @classmethod
    def _not_across_the_antimeridian(cls, vertices: tuple[LatLon, ...]) -> tuple[LatLon, ...]:
        for a, b in _edges(vertices):
            if abs(a.lon - b.lon) > 180:
                raise ValueError(
                    f"the edge from ({a.lat}, {a.lon}) to ({b.lat}, {b.lon}) spans more than 180° "
                    "of longitude, so the polygon crosses the antimeridian, which ray casting on "
                    "raw longitudes cannot handle: split it into one polygon on each side"
                )
        return vertices


#: a geofence's area; ``kind`` says which, on the wire and in storage
Shape = Annotated[Circle | Polygon, Field(discriminator="kind")]
_SHAPE: TypeAdapter[Circle | Polygon] = TypeAdapter(Shape)


class DefineGeofence(Command):
    """Create the geofence ``geofence_id``, or replace its name and shape if it exists."""

    geofence_id: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1, max_length=200)
    shape: Shape


class RemoveGeofence(Command):
    """Delete a geofence; assets inside it are forgotten there, without an exit event."""

    geofence_id: str = Field(min_length=1, max_length=100)


class RecordPosition(Command, partition_key="asset_id"):
    """Where an asset was at ``at`` (timezone-aware); positions of one asset belong in order."""

    asset_id: uuid.UUID
    lat: Latitude
    lon: Longitude
    at: AwareDatetime


class GetAssetGeofences(Query):
    """Which geofences the asset was inside at its last applied position."""

    asset_id: uuid.UUID


class _GeofenceCrossing(Event, abstract=True):
    asset_id: uuid.UUID
    geofence_id: str
    at: datetime
    lat: float
    lon: float


class AssetEnteredGeofence(_GeofenceCrossing):
    """The asset's position at ``at`` was inside the geofence; the one before was not."""


class AssetExitedGeofence(_GeofenceCrossing):
    """The asset's position at ``at`` was outside the geofence; the one before was inside."""


# --- geometry: pure functions ---------------------------------------------------------------


def haversine_m(a: LatLon, b: LatLon) -> float:
    """Great-circle distance in metres on a sphere of the Earth's mean radius (error < 0.5 %)."""
    lat_a, lat_b = math.radians(a.lat), math.radians(b.lat)
    half_dlat = (lat_b - lat_a) / 2
    half_dlon = math.radians(b.lon - a.lon) / 2
    h = math.sin(half_dlat) ** 2 + math.cos(lat_a) * math.cos(lat_b) * math.sin(half_dlon) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _edges(vertices: Sequence[LatLon]) -> Iterator[tuple[LatLon, LatLon]]:
    return zip(vertices, [*vertices[1:], vertices[0]], strict=True)


def point_in_polygon(point: LatLon, vertices: Sequence[LatLon]) -> bool:
    """Ray casting on (lon, lat) as plane coordinates: inside if a ray crosses an odd number of edges.

    A planar approximation, acceptable for small polygons (see Polygon). A point exactly on an edge
    may land on either side.
    """
    inside = False
    for a, b in _edges(vertices):
        if (a.lat > point.lat) != (b.lat > point.lat):
            crossing_lon = a.lon + (point.lat - a.lat) * (b.lon - a.lon) / (b.lat - a.lat)
            if point.lon < crossing_lon:
                inside = not inside
    return inside


def contains(shape: Circle | Polygon, point: LatLon) -> bool:
    """Whether ``point`` is inside ``shape``; a circle includes its boundary."""
    if isinstance(shape, Circle):
        return haversine_m(shape.center, point) <= shape.radius_m
    return point_in_polygon(point, shape.vertices)


def geofences_containing(point: LatLon, shapes: Mapping[str, Circle | Polygon]) -> frozenset[str]:
    return frozenset(geofence_id for geofence_id, s in shapes.items() if contains(s, point))


# --- the decision: pure functions -------------------------------------------------------------


@dataclass(frozen=True)
class AssetState:
    """What the service remembers of an asset: its last applied position's time, and where it was."""

    at: datetime
    inside: frozenset[str]


@dataclass(frozen=True)
class Decision:
    """What one position does: nothing (stale), or a new inside-set and the crossings to publish."""

    stale: bool
    inside: frozenset[str]
    entered: tuple[str, ...] = ()
    exited: tuple[str, ...] = ()


def is_stale(at: datetime, last_applied: datetime | None) -> bool:
    """A position no later than the last applied one is a duplicate or arrived out of order.

    Applying it would move the asset back in time, and report crossings that did not happen.
    """
    return last_applied is not None and at <= last_applied


def decide(
    last: AssetState | None, point: LatLon, at: datetime, shapes: Mapping[str, Circle | Polygon]
) -> Decision:
    """The effect of the position (``point`` at ``at``) on an asset last seen as ``last``.

    Geofences removed since the last position are dropped from the old inside-set rather than
    reported as exits: the asset did not move out, the fence went away. Crossings come sorted, so
    a re-run of the handler publishes the same events in the same order (and the same event IDs).
    """
    if last is not None and is_stale(at, last.at):
        return Decision(stale=True, inside=last.inside)
    before = (last.inside if last else frozenset()) & shapes.keys()
    inside = geofences_containing(point, shapes)
    return Decision(
        stale=False,
        inside=inside,
        entered=tuple(sorted(inside - before)),
        exited=tuple(sorted(before - inside)),
    )


# --- state in Redis ---------------------------------------------------------------------------


def _fences_key() -> str:
    return key(SERVICE, "fences")


def _asset_key(asset_id: uuid.UUID) -> str:
    return key(SERVICE, "asset", str(asset_id))


def _hash(name: str) -> dict[str, str]:
    return cast("dict[str, str]", client().hgetall(name))  # the client decodes responses


def _load_shapes() -> dict[str, Circle | Polygon]:
    """Every geofence's shape; all of them are tested against each position (fine for hundreds)."""
    raw = _hash(_fences_key())
    return {fid: _SHAPE.validate_python(json.loads(v)["shape"]) for fid, v in raw.items()}


def _load_state(asset_id: uuid.UUID) -> AssetState | None:
    raw = _hash(_asset_key(asset_id))
    if not raw:
        return None
    return AssetState(datetime.fromisoformat(raw["at"]), frozenset(json.loads(raw["inside"])))


# --- handlers ---------------------------------------------------------------------------------


@handles(DefineGeofence, service=SERVICE)
def define_geofence(cmd: DefineGeofence, ctx: HandlerContext) -> dict[str, str]:
    """Store the geofence; it applies from the next position of each asset on, not retroactively."""
    fence = {"name": cmd.name, "shape": cmd.shape.model_dump(mode="json")}
    ctx.transaction().hset(_fences_key(), cmd.geofence_id, json.dumps(fence))
    return {"geofence_id": cmd.geofence_id}


@handles(RemoveGeofence, service=SERVICE)
def remove_geofence(cmd: RemoveGeofence, ctx: HandlerContext) -> dict[str, str]:
    if not client().hexists(_fences_key(), cmd.geofence_id):
        raise Rejected(f"geofence {cmd.geofence_id!r} does not exist: nothing to remove")
    ctx.transaction().hdel(_fences_key(), cmd.geofence_id)
    return {"geofence_id": cmd.geofence_id}


@handles(RecordPosition, service=SERVICE)
def record_position(cmd: RecordPosition, ctx: HandlerContext) -> dict[str, Any]:
    """Apply a position unless it is stale; publish a crossing for each geofence entered or exited.

    RecordPosition is partitioned by asset: one asset's positions are handled one at a time, in
    the order they were sent, so reading the last state and writing the next cannot interleave.

    The events go out before the new state commits (with the inbox mark, in one transaction): a
    crash in between runs the handler again on the old state, which publishes the same events
    with the same IDs, and subscribers drop the repeats.
    """
    last = _load_state(cmd.asset_id)
    point = LatLon(lat=cmd.lat, lon=cmd.lon)
    decision = decide(last, point, cmd.at, _load_shapes())
    if decision.stale and last is not None:  # only a position after another can be stale
        return {
            "asset_id": str(cmd.asset_id),
            "applied": False,
            "reason": f"stale: the position at {cmd.at.isoformat()} is not after the last "
            f"applied one at {last.at.isoformat()} (a duplicate or out of order); ignored",
        }
    crossings = (
        (AssetExitedGeofence, decision.exited),
        (AssetEnteredGeofence, decision.entered),
    )
    for event_type, geofence_ids in crossings:
        for geofence_id in geofence_ids:
            ctx.publish(
                event_type(
                    asset_id=cmd.asset_id,
                    geofence_id=geofence_id,
                    at=cmd.at,
                    lat=cmd.lat,
                    lon=cmd.lon,
                )
            )
    state = {
        "at": cmd.at.astimezone(UTC).isoformat(),
        "lat": cmd.lat,
        "lon": cmd.lon,
        "inside": json.dumps(sorted(decision.inside)),
    }
    ctx.transaction().hset(_asset_key(cmd.asset_id), mapping=state)

    return {
        "asset_id": str(cmd.asset_id),
        "applied": True,
        "inside": sorted(decision.inside),
        "entered": list(decision.entered),
        "exited": list(decision.exited),
    }


@handles(GetAssetGeofences, service=SERVICE)
def get_asset_geofences(query: GetAssetGeofences, ctx: HandlerContext) -> dict[str, Any]:
    """The geofences (still defined) the asset was inside at its last applied position."""
    state = _load_state(query.asset_id)
    if state is None:
        return {"asset_id": str(query.asset_id), "inside": [], "as_of": None}
    defined = set(client().hkeys(_fences_key()))
    return {
        "asset_id": str(query.asset_id),
        "inside": sorted(state.inside & defined),
        "as_of": state.at.isoformat(),
    }
