"""The exporter's counting rules, and the dashboard and scrape config that rely on its names."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from config.celery import app
from config.settings import Settings
from postroom import CircuitBreaker, Command, handles
from postroom.breakers import Breakers, MemoryBreakers
from postroom.ratelimits import MemoryRateLimits
from workers.metrics import BreakerStates, Exporter, RateLimitWaits, TaskMetrics, labels_of

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "postroom.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
#: the labels of the exporter's series (``le``: a histogram bucket's bound)
LABELS = {"le", "message_type", "pool", "owner", "reason", "queue"}


def _counts(metrics: TaskMetrics, name: str) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    for metric in metrics.metrics:
        registry.register(metric)
    text = generate_latest(registry).decode()
    return {
        (s.labels["message_type"], s.labels["pool"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def _task(metrics: TaskMetrics, uuid: str, name: str, host: str, *outcomes: dict[str, Any]) -> None:
    metrics({"type": "task-received", "uuid": uuid, "name": name, "hostname": host})
    for outcome in outcomes:
        metrics({"uuid": uuid, "hostname": host, **outcome})


@pytest.mark.parametrize(
    ("task_name", "hostname", "labels"),
    [
        ("assets.RegisterAsset", "assets@box", ("assets.RegisterAsset", "assets")),
        ("assets.AssetRegistered@search", "search@box", ("assets.AssetRegistered", "search")),
        ("assets.RegisterAsset", "box", ("assets.RegisterAsset", "box")),
    ],
)
def test_the_pool_comes_from_the_delivery_name_or_else_the_worker_node_name(
    task_name: str, hostname: str, labels: tuple[str, str]
) -> None:
    assert labels_of(task_name, hostname) == labels


def test_outcomes_are_counted_under_the_name_their_task_arrived_with() -> None:
    metrics = TaskMetrics()
    retried = {"type": "task-retried", "exception": "TransientError('run 1')"}
    again = {"type": "task-received", "name": "probe.Flaky"}  # the retry arrives
    _task(metrics, "1", "probe.Flaky", "probe@box", retried, again)
    metrics({"type": "task-succeeded", "uuid": "1", "hostname": "probe@box", "runtime": 0.02})
    rejected = {"type": "task-failed", "exception": "RejectedReply('rejected: Rejected: no')"}
    _task(metrics, "2", "probe.Refuse", "probe@box", rejected)
    _task(metrics, "3", "probe.Crash", "probe@box", {"type": "task-failed", "exception": "Fa()"})
    metrics({"type": "task-succeeded", "uuid": "9", "hostname": "probe@box", "runtime": 0.1})

    assert _counts(metrics, "postroom_messages_retried_total") == {("probe.Flaky", "probe"): 1}
    assert _counts(metrics, "postroom_messages_handled_total") == {
        ("probe.Flaky", "probe"): 1,
        ("unknown", "probe"): 1,  # received before the exporter started
    }
    assert _counts(metrics, "postroom_messages_rejected_total") == {("probe.Refuse", "probe"): 1}
    assert _counts(metrics, "postroom_messages_failed_total") == {("probe.Crash", "probe"): 1}
    assert _counts(metrics, "postroom_message_duration_seconds_count") == {
        ("probe.Flaky", "probe"): 1,
        ("unknown", "probe"): 1,
    }


def test_a_query_its_open_breakers_fallback_could_not_answer_counts_as_failed() -> None:
    metrics = TaskMetrics()
    unanswered = {"type": "task-failed", "exception": "CircuitOpenReply('failed: CircuitOpen')"}
    _task(metrics, "1", "probe.GetReading", "probe@box", unanswered)
    assert _counts(metrics, "postroom_messages_failed_total") == {("probe.GetReading", "probe"): 1}


def test_tasks_whose_outcome_never_comes_are_forgotten_oldest_first() -> None:
    metrics = TaskMetrics(remembered=2)
    for n in range(3):
        _task(metrics, str(n), f"probe.T{n}", "probe@box")
    for n in range(3):
        metrics({"type": "task-succeeded", "uuid": str(n), "hostname": "probe@box"})
    assert _counts(metrics, "postroom_messages_handled_total") == {
        ("unknown", "probe"): 1,
        ("probe.T1", "probe"): 1,
        ("probe.T2", "probe"): 1,
    }


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return list(dashboard["panels"])


def test_every_dashboard_query_names_only_metrics_the_exporter_exports() -> None:
    exported = Exporter(app).metric_names()
    seen = set()
    for panel in _panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b(postroom_\w+)", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= exported, (panel["title"], names - exported)
            seen |= names
    assert {
        "postroom_messages_handled_total",
        "postroom_messages_failed_total",
        "postroom_messages_retried_total",
        "postroom_message_duration_seconds_bucket",
        "postroom_queue_depth",
        "postroom_dead_letters",
        "postroom_breaker_open",
    } <= seen


def test_every_dashboard_query_groups_by_labels_the_metrics_have() -> None:
    for panel in _panels():
        for target in panel["targets"]:
            for grouped in re.findall(r"by \(([^)]*)\)", target["expr"]):
                labels = {label.strip() for label in grouped.split(",")}
                assert labels <= LABELS, (panel["title"], labels - LABELS)


def test_the_scrape_config_targets_the_default_ports_and_flower_with_basic_auth() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    defaults = Settings.from_env({})
    assert jobs["postroom"]["static_configs"][0]["targets"] == [
        f"{defaults.metrics_address}:{defaults.metrics_port}"
    ]
    flower = jobs["flower"]
    assert flower["static_configs"][0]["targets"] == [
        f"{defaults.flower_address}:{defaults.flower_port}"
    ]
    assert flower["metrics_path"] == "/metrics"
    assert set(flower["basic_auth"]) == {"username", "password_file"}


class Gauged(Command, service="gauged"):
    n: int


@handles(Gauged, breaker=CircuitBreaker(failures=2, cooldown=30))
def gauged(cmd: Gauged, ctx: object) -> None: ...


def test_a_breaker_is_exported_as_open_while_it_holds_its_messages() -> None:
    store = MemoryBreakers()
    collector = BreakerStates(lambda: Breakers(store))

    def series() -> dict[tuple[str, str], float]:
        (family,) = collector.collect()
        return {(s.labels["message_type"], s.labels["owner"]): s.value for s in family.samples}

    assert series()[("gauged.Gauged", "gauged")] == 0.0
    store.force("gauged:gauged.Gauged", time.time() + 60)
    assert series()[("gauged.Gauged", "gauged")] == 1.0
    assert ("probe.Echo", "probe") not in series()  # no breaker, no series


class Throttled(Command, service="gauged"):
    n: int


@handles(Throttled, rate_limit="10/s")
def throttled(cmd: Throttled, ctx: object) -> None: ...


def test_a_rate_limit_is_exported_as_the_wait_a_message_arriving_now_would_have() -> None:
    store = MemoryRateLimits()
    collector = RateLimitWaits(lambda: store)

    def series() -> dict[tuple[str, str], float]:
        (family,) = collector.collect()
        return {(s.labels["message_type"], s.labels["owner"]): s.value for s in family.samples}

    assert series()[("gauged.Throttled", "gauged")] == 0.0
    now = time.time()
    for _ in range(30):  # 30 slots taken at 10 a second: the next free one is 3 s away
        store.take("gauged:gauged.Throttled", now, 0.1, "", 0.0)
    assert series()[("gauged.Throttled", "gauged")] == pytest.approx(3.0, abs=0.05)
    assert ("gauged.Gauged", "gauged") not in series()  # no limit, no series
