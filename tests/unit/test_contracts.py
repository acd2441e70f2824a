"""Contracts: immutable, validated, named and versioned; events are named as facts."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from postroom import Command, ContractError, Event, Query
from postroom.messages import Message, contract_for
from tasks.assets import AssetRegistered, RegisterAsset


def test_a_message_cannot_be_changed_after_it_is_created() -> None:
    cmd = RegisterAsset(name="Truck 12")
    with pytest.raises(ValidationError, match="frozen"):
        cmd.name = "Truck 13"  # type: ignore[misc]


def test_a_message_is_validated_when_it_is_built() -> None:
    with pytest.raises(ValidationError, match="name"):
        RegisterAsset(name="")
    with pytest.raises(ValidationError, match="extra"):
        RegisterAsset(name="x", colour="red")  # type: ignore[call-arg]


def test_type_name_is_service_dot_class_and_service_defaults_to_the_module() -> None:
    assert RegisterAsset.__message_type__ == "assets.RegisterAsset"
    assert AssetRegistered.__service__ == "assets"
    assert contract_for("assets.RegisterAsset") is RegisterAsset


def test_service_and_schema_version_can_be_declared() -> None:
    class RenameFleet(Command, service="fleet", version=3):
        name: str

    assert RenameFleet.__message_type__ == "fleet.RenameFleet"
    assert RenameFleet.__message_version__ == 3


def test_the_payload_holds_the_fields_only_as_json_data() -> None:
    asset_id = uuid.uuid4()
    event = AssetRegistered(asset_id=asset_id, name="x", registered_at="2026-01-01T00:00:00Z")
    payload = event.payload()
    assert payload["asset_id"] == str(asset_id)
    assert set(payload) == {"asset_id", "name", "description", "attributes", "registered_at"}


def test_an_event_named_like_a_command_is_refused_at_class_definition() -> None:
    with pytest.raises(ContractError, match="past tense"):

        class RegisterTruck(Event, service="fleet"):
            pass


def test_an_oddly_named_event_can_be_allowed_explicitly() -> None:
    class Heartbeat(Event, service="fleet", allow_any_name=True):
        pass

    assert Heartbeat.__message_type__ == "fleet.Heartbeat"


@pytest.mark.parametrize("name", ["TruckArrived", "DeviceBound", "AssetEnteredGeofence", "FeePaid"])
def test_past_tense_names_are_accepted(name: str) -> None:
    type(name, (Event,), {"__module__": "tests.unit.fleet"})


def test_two_contracts_cannot_share_a_type_name() -> None:
    with pytest.raises(ContractError, match=r"assets\.RegisterAsset"):
        type("RegisterAsset", (Command,), {"__module__": "elsewhere.assets", "__annotations__": {}})


def test_a_contract_in_main_must_name_its_service() -> None:
    with pytest.raises(ContractError, match="service="):
        type("Ping", (Query,), {"__module__": "__main__"})


def test_a_contract_must_say_whether_it_is_a_command_query_or_event() -> None:
    with pytest.raises(ContractError, match="Command, Query or Event"):
        type("Thing", (Message,), {"__module__": "tests.unit.fleet"})
