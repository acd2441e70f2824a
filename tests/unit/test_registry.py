"""Exactly one owner per command or query; any number of pools per event."""

from __future__ import annotations

import pytest

from config.celery import app
from postroom import Command, ContractError, DuplicateHandler, Event, handles, subscribes
from postroom.registry import registry
from tasks.assets import AssetRegistered, RegisterAsset


def test_a_handler_becomes_a_celery_task_named_after_its_contract() -> None:
    assert "assets.RegisterAsset" in app.tasks
    task = app.tasks["assets.RegisterAsset"]
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True


def test_a_second_handler_for_a_command_fails_naming_both() -> None:
    with pytest.raises(DuplicateHandler) as caught:

        @handles(RegisterAsset, service="assets")
        def register_again(cmd: RegisterAsset, ctx: object) -> None: ...

    assert "tasks.assets.register_asset" in str(caught.value)
    assert "register_again" in str(caught.value)


def test_a_handler_must_belong_to_the_contracts_service() -> None:
    class ParkTruck(Command, service="fleet"):
        pass

    with pytest.raises(ContractError, match="belongs to service 'fleet'"):
        handles(ParkTruck, service="assets")


def test_events_are_subscribed_to_not_handled() -> None:
    with pytest.raises(ContractError, match="@subscribes"):
        handles(AssetRegistered)  # type: ignore[arg-type]
    with pytest.raises(ContractError, match="@handles"):
        subscribes(RegisterAsset, pool="search")  # type: ignore[arg-type]


def test_an_event_may_have_many_pools_but_one_handler_per_pool() -> None:
    class TruckParked(Event, service="fleet"):
        pass

    assert registry.pools_subscribed(TruckParked.__message_type__) == []
    for pool in ("p1", "p2", "p3"):
        subscribes(TruckParked, pool=pool)(lambda event, ctx: None)
    assert registry.pools_subscribed(TruckParked.__message_type__) == ["p1", "p2", "p3"]

    def other(event: TruckParked, ctx: object) -> None: ...

    with pytest.raises(DuplicateHandler, match=r"pool 'p1' already handles fleet\.TruckParked"):
        subscribes(TruckParked, pool="p1")(other)
