"""Topology: derived from the registry; every pool has its queues and a compose service."""

from __future__ import annotations

from pathlib import Path

import yaml

from config.celery import app
from config.pools import POOLS

ROOT = Path(__file__).resolve().parents[2]


def test_a_subscriber_pool_queue_is_bound_under_each_event_type_it_subscribes_to() -> None:
    bound = {q.name: sorted(b.routing_key for b in q.bindings) for q in app.conf.task_queues}
    assert bound["events.search"] == ["assets.AssetRegistered"]
    assert bound["events.analytics"] == ["assets.AssetRegistered", "assets.DeviceBound"]
    assert bound["events.notifications"] == [
        "assets.AssetRegistered",
        "assets.DeviceBound",
        "geofence.AssetEnteredGeofence",
        "geofence.AssetExitedGeofence",
    ]


def test_every_queue_a_pool_consumes_is_declared_durable() -> None:
    declared = {q.name: q for q in app.conf.task_queues}
    for pool in POOLS:
        for queue in pool.queues:
            assert queue in declared, f"pool {pool.name} consumes {queue}, which nothing declares"
            assert declared[queue].durable


def test_only_json_is_accepted() -> None:
    assert app.conf.accept_content == ["json"]
    assert app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == app.conf.result_serializer == "json"


def test_docker_compose_runs_every_pool_and_flower_on_both_brokers() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "rabbitmq", "flower"} <= set(services)
    for pool in POOLS:
        service = services.get(f"pool-{pool.name}")
        assert service, f"docker-compose.yml has no service for pool {pool.name}"
        assert service["command"] == ["postroom", "worker", pool.name]
        assert "redis" in service["depends_on"]
    flower = services["flower"]
    assert flower["command"] == ["postroom", "flower"]
    assert any(str(p).endswith(":5555") for p in flower["ports"])
    api = services["api"]
    assert api["command"] == ["postroom", "api"]
    assert api["environment"]["POSTROOM_API_HOST"] == "0.0.0.0"  # reachable from the host
    assert any(str(p).endswith(":8000") for p in api["ports"])


def test_docker_compose_runs_postgresql_and_migrates_it_before_any_pool_starts() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    migrate = services["migrate"]
    assert migrate["command"] == ["postroom", "migrate"]
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    user, password = (
        postgres["environment"]["POSTGRES_USER"],
        postgres["environment"]["POSTGRES_PASSWORD"],
    )
    database = postgres["environment"]["POSTGRES_DB"]
    url = f"postgresql+psycopg://{user}:{password}@postgres:5432/{database}"
    for pool in POOLS:
        service = services[f"pool-{pool.name}"]
        assert service["environment"]["POSTROOM_DATABASE_URL"] == url
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert migrate["environment"]["POSTROOM_DATABASE_URL"] == url
