"""The reference services' handlers, tested in-process with postroom.testing: fast, no broker.

The integration tests prove the same flows through real workers on Redis and RabbitMQ.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import select

import tasks.state
from postroom.testing import Harness
from tasks.analytics import GetAssetStats
from tasks.assets import AssetRegistered, BindDevice, DeviceBound, GetAsset, RegisterAsset, assets
from tasks.geofence import (
    AssetEnteredGeofence,
    Circle,
    DefineGeofence,
    GetAssetGeofences,
    LatLon,
    RecordPosition,
)
from tasks.notifications import ListNotifications
from tasks.search import SearchAssets


def _register(harness: Harness, name: str) -> str:
    reply = harness.send(RegisterAsset(name=name, attributes={"fleet": "north"})).reply()
    assert reply.status == "succeeded"
    return str(reply.value["asset_id"])


def test_a_registered_asset_can_be_read_found_counted_and_is_announced(harness: Harness) -> None:
    asset_id = _register(harness, "Truck 12")
    asset = harness.ask(GetAsset(asset_id=uuid.UUID(asset_id))).value
    assert (asset["name"], asset["attributes"], asset["devices"]) == (
        "Truck 12",
        {"fleet": "north"},
        [],
    )
    [event] = harness.events(AssetRegistered)
    assert str(event.asset_id) == asset_id
    assert harness.ask(SearchAssets(text="truck")).value == [
        {"asset_id": asset_id, "name": "Truck 12"}
    ]
    assert harness.ask(GetAssetStats()).value == {"assets_registered": 1, "devices_bound": 0}
    notes = harness.ask(ListNotifications(asset_id=uuid.UUID(asset_id))).value
    assert [n["text"] for n in notes] == ["Asset 'Truck 12' was registered"]


def test_binding_a_device_to_an_unknown_asset_is_rejected_and_announces_nothing(
    harness: Harness,
) -> None:
    reply = harness.send(BindDevice(asset_id=uuid.uuid4(), device_id=uuid.uuid4())).reply()
    assert reply.status == "rejected"
    assert reply.error is not None
    assert "does not exist" in reply.error.message
    assert harness.events() == []


def test_a_device_bound_to_one_asset_cannot_be_bound_to_another(harness: Harness) -> None:
    first, second = _register(harness, "Crane 1"), _register(harness, "Crane 2")
    device = uuid.uuid4()
    bound = harness.send(BindDevice(asset_id=uuid.UUID(first), device_id=device)).reply()
    assert bound.status == "succeeded"
    again = harness.send(BindDevice(asset_id=uuid.UUID(second), device_id=device)).reply()
    assert again.status == "rejected"
    assert len(harness.events(DeviceBound)) == 1
    assert harness.ask(GetAssetStats()).value == {"assets_registered": 2, "devices_bound": 1}


def test_a_repeated_register_command_registers_one_asset(harness: Harness) -> None:
    sent = harness.send(RegisterAsset(name="Forklift 7"))
    first = sent.reply()
    harness.deliver_again(sent)
    assert sent.reply() == first
    assert len(harness.events(AssetRegistered)) == 1
    assert harness.ask(GetAssetStats()).value["assets_registered"] == 1


def test_a_position_inside_a_geofence_enters_it_and_notifies(harness: Harness) -> None:
    depot = Circle(center=LatLon(lat=52.52, lon=13.405), radius_m=500)
    defined = harness.send(DefineGeofence(geofence_id="depot", name="Depot", shape=depot))
    assert defined.reply().status == "succeeded"
    truck = uuid.uuid4()

    def at(lat: float, lon: float, minute: int) -> RecordPosition:
        when = datetime(2026, 11, 23, 9, minute, tzinfo=UTC)
        return RecordPosition(asset_id=truck, lat=lat, lon=lon, at=when)

    assert harness.send(at(52.53, 13.405, 0)).reply().value["inside"] == []
    entered = harness.send(at(52.5201, 13.4052, 5)).reply().value
    assert (entered["inside"], entered["entered"]) == (["depot"], ["depot"])
    late = harness.send(at(52.53, 13.405, 3)).reply().value
    assert late["applied"] is False
    [event] = harness.events(AssetEnteredGeofence)
    assert event.geofence_id == "depot"
    assert harness.ask(GetAssetGeofences(asset_id=truck)).value["inside"] == ["depot"]
    notes = harness.ask(ListNotifications(asset_id=truck)).value
    assert [n["text"] for n in notes] == ["Entered geofence 'depot' at 2026-11-23T09:05:00+00:00"]


def test_the_assets_service_commits_its_row_and_inbox_mark_in_postgresql(harness: Harness) -> None:
    sent = harness.send(RegisterAsset(name="Tug 4"))
    asset_id = uuid.UUID(sent.reply().value["asset_id"])
    store = tasks.state.database()
    with store.engine.connect() as conn:
        name = conn.scalar(select(assets.c.name).where(assets.c.asset_id == asset_id))
    assert name == "Tug 4"
    assert store.outcome("assets", sent.envelope.message_id) == sent.reply().model_dump(mode="json")
    assert store.pending() == 0  # the event was dispatched, so its outbox entry is gone
    refused = harness.send(BindDevice(asset_id=uuid.uuid4(), device_id=uuid.uuid4()))
    assert refused.reply().status == "rejected"
    marked = store.outcome("assets", refused.envelope.message_id)
    assert marked is not None
    assert marked["status"] == "rejected"
