"""Topology: derived from the registry; every pool has its queues and a compose service."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml

from config.celery import app
from config.pools import POOLS
from workers.launcher import node_name

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


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_every_postroom_process_in_docker_compose_reads_the_same_broker_backend_and_database() -> (
    None
):
    """One place to switch brokers: Flower and the API used to carry settings of their own (a
    YAML merge does not merge ``environment``), and stayed on Redis when the pools moved."""
    compose = _compose()
    shared = compose["x-postroom-env"]
    assert shared["POSTROOM_BROKER_URL"].startswith("${POSTROOM_BROKER_URL:-redis://")
    processes = [n for n, s in compose["services"].items() if s.get("image") == "postroom:latest"]
    assert {"migrate", "flower", "api", *(f"pool-{p.name}" for p in POOLS)} <= set(processes)
    for name in processes:
        environment = compose["services"][name]["environment"]
        for key, value in shared.items():
            assert environment.get(key) == value, f"{name}: {key}={environment.get(key)!r}"


def test_docker_compose_pools_scale_out_with_replicas_that_compete_for_their_queues() -> None:
    """``docker compose up --scale pool-assets=3``: a replica must not claim a fixed container
    name or host port, and the worker's node name is <pool>@<its container's hostname>."""
    services = _compose()["services"]
    for pool in POOLS:
        service = services[f"pool-{pool.name}"]
        assert "container_name" not in service
        assert "ports" not in service
        assert "hostname" not in service
    assert node_name(POOLS[0]) == f"{POOLS[0].name}@{socket.gethostname()}"


def test_docker_compose_cluster_profile_runs_three_rabbitmq_nodes_that_form_one_cluster() -> None:
    services = _compose()["services"]
    nodes = {name: s for name, s in services.items() if "cluster" in s.get("profiles", [])}
    assert sorted(nodes) == ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
    config = (ROOT / "deploy/rabbitmq/cluster.conf").read_text()
    cookies = set()
    for name, node in nodes.items():
        assert node["hostname"] == name
        assert f"= rabbit@{name}" in config  # every node is a peer of classic_config discovery
        mounted = [v for v in node["volumes"] if v.startswith("./deploy/rabbitmq/cluster.conf:")]
        assert mounted == [
            "./deploy/rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/20-postroom-cluster.conf:ro"
        ]
        cookies.add(node["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"])
        assert (
            node["environment"]["RABBITMQ_CTL_ERL_ARGS"]
            == node["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
        )
    assert len(cookies) == 1
    assert "-setcookie" in cookies.pop()
    assert "cluster_formation.peer_discovery_backend = classic_config" in config
    assert "cluster_partition_handling = pause_minority" in config
    host_ports = [p.split(":")[0] for n in nodes.values() for p in n["ports"]]
    assert len(host_ports) == len(set(host_ports))  # no two nodes publish the same host port
