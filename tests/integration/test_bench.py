"""The benchmark suite runs end to end on a tiny size (its numbers are not checked: no timing here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_benchmark_measures_every_system_on_both_brokers(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "bench", "--size", "tiny", "--rounds", "1",
                    "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=880,
                   capture_output=True)  # fmt: skip
    for broker in ("redis", "rabbitmq"):
        results = json.loads((tmp_path / f"{broker}.json").read_text())
        for system in ("postroom", "celery", "dramatiq"):
            assert results[f"drain_per_s|{system}"]["median"] > 0, (broker, system)
            assert results[f"enqueue_per_s|{system}"]["median"] > 0, (broker, system)
        assert results["roundtrip_p50_ms|postroom"]["median"] > 0
        for system in ("postroom", "celery"):  # one PostgreSQL row and one event per command
            for metric in ("sql_drain_per_s", "sql_roundtrip_p50_ms", "sql_roundtrip_p99_ms"):
                assert results[f"{metric}|{system}"]["median"] > 0, (broker, metric, system)
        assert results["fanout_deliveries_per_s|6 pools"]["median"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| drain_per_s |" in table
    assert "| sql_drain_per_s |" in table
    assert "#### rabbitmq" in table


def test_only_measures_the_parts_asked_for(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "bench", "--broker", "redis", "--size", "tiny",
                    "--rounds", "1", "--only", "growth", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, timeout=280, capture_output=True)  # fmt: skip
    results = json.loads((tmp_path / "redis.json").read_text())
    assert {key.split("|")[0] for key in results} == {"drain_per_s_with_backlog"}
    assert "--only growth" in (tmp_path / "results.md").read_text()


def test_the_profile_sets_postroom_s_worker_beside_bare_celery_s_step_by_step(
    tmp_path: Path,
) -> None:
    subprocess.run([sys.executable, "-m", "bench.profile", "--broker", "redis", "--messages",
                    "30", "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=280,
                   capture_output=True)  # fmt: skip
    rows = json.loads((tmp_path / "profile-redis.json").read_text())
    assert rows["postroom"]["busy, all told"] > 0
    assert rows["celery"]["busy, all told"] > 0
    assert rows["postroom"]["inbox claim, before the handler"] > 0
    assert rows["celery"]["inbox claim, before the handler"] == 0  # bare Celery has no inbox
    assert (
        "| step | postroom | bare Celery | difference |"
        in (tmp_path / "profile-redis.md").read_text()
    )
