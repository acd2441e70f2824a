"""The geofence service over real workers, on Redis and RabbitMQ: one crossing, one notification.

Positions go to the real geofence pool; its AssetEnteredGeofence / AssetExitedGeofence events go
to the real notifications pool, and the tests count what arrived there through ListNotifications,
the way a user would check. Each test uses its own spot on the map, so geofences of one test never
contain another test's positions.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from config.pools import pool_named
from postroom import MessageBus, Reply
from tasks.geofence import (
    Circle,
    DefineGeofence,
    GetAssetGeofences,
    LatLon,
    Polygon,
    RecordPosition,
    RemoveGeofence,
)
from tasks.notifications import ListNotifications
from tests.support import BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def bus(broker: BrokerContext) -> MessageBus:
    broker.start_worker(pool_named("notifications"))  # its queue must exist before events flow
    broker.start_worker(pool_named("geofence"))
    return MessageBus(broker.app, source="tests")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def define(bus: MessageBus, geofence_id: str, shape: Circle | Polygon) -> None:
    reply = bus.send(DefineGeofence(geofence_id=geofence_id, name=geofence_id, shape=shape))
    assert reply.reply(timeout=30).status == "succeeded"


def record(bus: MessageBus, asset: uuid.UUID, point: LatLon, when: datetime) -> Reply:
    position = RecordPosition(asset_id=asset, lat=point.lat, lon=point.lon, at=when)
    reply = bus.send(position).reply(timeout=30)
    assert reply.status == "succeeded", reply.error
    return reply


def notes(bus: MessageBus, asset: uuid.UUID) -> list[dict[str, Any]]:
    reply = bus.ask(ListNotifications(asset_id=asset), timeout=30)
    assert reply.ok, reply.error
    return list(reply.value)


def settle(bus: MessageBus, asset: uuid.UUID, expected: int) -> list[dict[str, Any]]:
    """The asset's notifications once ``expected`` arrived, and a moment more to catch extras."""
    wait_for(lambda: len(notes(bus, asset)) >= expected, timeout=60, interval=0.2)
    time.sleep(1.5)
    return notes(bus, asset)


def inside(bus: MessageBus, asset: uuid.UUID) -> list[str]:
    return list(bus.ask(GetAssetGeofences(asset_id=asset), timeout=30).value["inside"])


def test_one_entry_and_one_exit_each_notify_once_and_stale_positions_change_nothing(
    bus: MessageBus,
) -> None:
    center = LatLon(lat=52.52, lon=13.405)
    near, far = LatLon(lat=52.5201, lon=13.4052), LatLon(lat=52.53, lon=13.405)  # ~20 m, ~1.1 km
    fence, asset = f"depot-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    define(bus, fence, Circle(center=center, radius_m=500))

    assert record(bus, asset, far, at(0)).value["entered"] == []
    entered = record(bus, asset, near, at(5))
    assert (entered.value["entered"], entered.value["inside"]) == ([fence], [fence])
    assert inside(bus, asset) == [fence]
    exited = record(bus, asset, far, at(10))
    assert (exited.value["exited"], exited.value["inside"]) == ([fence], [])

    duplicate = record(bus, asset, far, at(10))
    older_inside = record(bus, asset, near, at(7))  # out of order: it would re-enter
    for stale in (duplicate, older_inside):
        assert stale.value["applied"] is False
        assert "stale" in stale.value["reason"]
    assert inside(bus, asset) == []

    arrived = settle(bus, asset, 2)
    assert sorted(n["text"] for n in arrived) == [
        f"Entered geofence {fence!r} at {at(5).isoformat()}",
        f"Exited geofence {fence!r} at {at(10).isoformat()}",
    ]
    by_conversation = {n["correlation_id"]: n["text"] for n in arrived}
    assert by_conversation[entered.correlation_id].startswith("Entered")
    assert by_conversation[exited.correlation_id].startswith("Exited")


def test_a_polygon_geofence_travels_and_a_removed_one_is_forgotten_without_an_exit(
    bus: MessageBus,
) -> None:
    yard = f"yard-{uuid.uuid4().hex[:8]}"
    square = [(48.0, 11.0), (48.0, 11.01), (48.01, 11.01), (48.01, 11.0)]
    define(bus, yard, Polygon(vertices=tuple(LatLon(lat=a, lon=o) for a, o in square)))
    asset = uuid.uuid4()
    assert record(bus, asset, LatLon(lat=48.005, lon=11.005), at(0)).value["entered"] == [yard]
    assert settle(bus, asset, 1)[0]["text"].startswith(f"Entered geofence {yard!r}")

    assert bus.send(RemoveGeofence(geofence_id=yard)).reply(timeout=30).status == "succeeded"
    assert inside(bus, asset) == []
    moved_out = record(bus, asset, LatLon(lat=48.5, lon=11.5), at(1))
    assert (moved_out.value["entered"], moved_out.value["exited"]) == ([], [])
    assert len(settle(bus, asset, 1)) == 1
    again = bus.send(RemoveGeofence(geofence_id=yard)).reply(timeout=30)
    assert again.status == "rejected"
    assert again.error is not None
    assert "does not exist" in again.error.message


def test_a_burst_of_shuffled_positions_crosses_only_as_the_applied_ones_say(
    bus: MessageBus,
) -> None:
    """Competing workers get one asset's positions at once and out of order: whatever subset is
    applied, it is applied in time order, each against the one before, with no spurious crossing."""
    center = LatLon(lat=40.0, lon=-3.7)
    near, far = LatLon(lat=40.0001, lon=-3.7), LatLon(lat=40.02, lon=-3.7)
    fence, asset = f"plaza-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    define(bus, fence, Circle(center=center, radius_m=300))
    positions = [
        RecordPosition(asset_id=asset, lat=p.lat, lon=p.lon, at=at(i))
        for i, p in enumerate([near, far] * 15)
    ]
    random.Random(6).shuffle(positions)
    replies = [p.reply(timeout=120) for p in bus.send_many(positions)]
    assert all(r.status == "succeeded" for r in replies), [r.error for r in replies]

    applied = sorted(
        (position.at, position.lat == near.lat, reply.value)
        for position, reply in zip(positions, replies, strict=True)
        if reply.value["applied"]
    )
    was_inside, expected = False, []
    for when, is_inside, value in applied:
        entered = [fence] if is_inside and not was_inside else []
        exited = [fence] if was_inside and not is_inside else []
        assert (value["entered"], value["exited"]) == (entered, exited), when
        if entered or exited:
            verb = "Entered" if entered else "Exited"
            expected.append(f"{verb} geofence {fence!r} at {when.isoformat()}")
        was_inside = is_inside
    assert applied[-1][0] == at(len(positions) - 1)  # the newest position always applies
    assert inside(bus, asset) == ([fence] if was_inside else [])
    if expected:
        assert sorted(n["text"] for n in settle(bus, asset, len(expected))) == sorted(expected)
    else:
        time.sleep(1.5)
        assert notes(bus, asset) == []
