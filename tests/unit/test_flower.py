"""Flower's view of the brokers: the URLs workers/flower.py hands it (the brokers' side is in
tests/integration/test_flower_queues.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workers.flower import MANAGEMENT_PORT, flower_broker_url, management_api

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("broker_url", "api"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", "http://guest:guest@127.0.0.1:15672/api/"),
        ("amqp://ops:p%40ss@rabbit:5672/prod", "http://ops:p%40ss@rabbit:15672/api/"),
        ("amqps://rabbit", "http://guest:guest@rabbit:15672/api/"),
        ("amqp://u:p@[::1]:5672/", "http://u:p@[::1]:15672/api/"),
        ("redis://127.0.0.1:6379/0", None),
    ],
)
def test_the_management_api_is_the_brokers_host_and_credentials_on_its_port(
    broker_url: str, api: str | None
) -> None:
    assert management_api(broker_url) == api


def test_a_transport_named_by_class_path_reaches_flower_as_its_driver() -> None:
    url = "kombu.transport.redis:Transport://:secret@127.0.0.1:6379/3"
    assert flower_broker_url(url) == "redis://:secret@127.0.0.1:6379/3"
    assert flower_broker_url("rediss://127.0.0.1:6380/0") == "rediss://127.0.0.1:6380/0"
    assert flower_broker_url("amqp://h:5672//") == "amqp://h:5672//"


def test_docker_compose_rabbitmq_serves_the_management_api_flower_reads() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    rabbitmq = services["rabbitmq"]
    assert str(rabbitmq["image"]).endswith("-management"), rabbitmq["image"]
    assert f"{MANAGEMENT_PORT}:{MANAGEMENT_PORT}" in rabbitmq["ports"]
