"""`postroom metrics` scraped over HTTP while real workers run, on Redis and RabbitMQ.

One scene per broker: a command pool and a subscriber pool run; the exporter runs as a user starts
it; commands that succeed, retry, get rejected and fail go through, an event is retried in its
pool, and commands wait in a queue no worker reads. Then /metrics must say exactly that.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.pools import Pool
from postroom import MessageBus
from postroom.topology import command_queue_name, event_queue_name
from tasks.assets import RegisterAsset
from tasks.search import SearchAssets
from tests.integration.services import Crash, Echo, Flaky, ProbeHappened, Refuse
from tests.support import ROOT, BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

PARKED = 4  # RegisterAsset commands sent to commands.assets, which no worker of this test reads
#: SearchAssets queries parked in commands.search: it sorts after queues RabbitMQ has never seen,
#: so its depth is read on a channel that a refused passive declare closed (and py-amqp reopened)
PARKED_QUERIES = 2

Samples = dict[tuple[tuple[str, str], ...], float]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Exporter:
    """``postroom metrics`` as a subprocess, with the broker context's settings."""

    def __init__(self, broker: BrokerContext, log: Path) -> None:
        self.port = _free_port()
        env = dict(
            broker.env, POSTROOM_METRICS_PORT=str(self.port), POSTROOM_METRICS_ADDRESS="127.0.0.1"
        )
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "metrics"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def text(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def scrape(self) -> dict[str, Samples]:
        """Every sample, by sample name (``..._total``, ``..._bucket``), then by its labels."""
        samples: dict[str, Samples] = {}
        for family in text_string_to_metric_families(self.text()):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[labels] = sample.value
        return samples

    def answers(self) -> bool:
        try:
            self.text()
        except OSError:
            return False
        return True

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def by_type_and_pool(samples: Samples) -> dict[tuple[str, str], float]:
    return {(dict(k)["message_type"], dict(k)["pool"]): v for k, v in samples.items()}


@pytest.fixture(scope="module")
def exporter(broker: BrokerContext) -> Iterator[Exporter]:
    """The scene: workers, the exporter, and every message sent and settled before any test."""
    broker.start_worker(Pool("probe", (command_queue_name("probe"),), concurrency=2))
    broker.start_worker(Pool("pool_a", (event_queue_name("pool_a"),), concurrency=1))
    running = Exporter(broker, broker.workdir / "metrics.log")
    try:
        wait_for(lambda: running.answers() or running.proc.poll() is not None, timeout=90)
        assert running.proc.poll() is None, running.output()
        # the stream is live once a worker's heartbeat came through it (one every 2 s)
        wait_for(lambda: running.scrape().get("postroom_exporter_events_total"), timeout=60)
        _send_the_scene(broker)
        yield running
    finally:
        running.stop()


def _send_the_scene(broker: BrokerContext) -> None:
    bus = MessageBus(broker.app, source="tests")
    replies = [bus.send(Echo(text=f"hello {n}")) for n in range(3)]
    flaky = bus.send(Flaky(key="twice", failures=2))  # two transient failures, then success
    refused = bus.send(Refuse(reason="not today"))
    crashed = bus.send(Crash(key="bug"))  # fails at once; publishes CommandFailed to pool_a
    bus.publish(ProbeHappened(key="wobbly", fail_pool="pool_a", fail_times=1))
    for _ in range(PARKED):
        bus.send(RegisterAsset(name="parked"))
    for _ in range(PARKED_QUERIES):
        bus.send(SearchAssets(text="parked"))
    assert [p.reply(timeout=60).status for p in replies] == ["succeeded"] * 3
    flaky_reply = flaky.reply(timeout=60)
    assert (flaky_reply.status, flaky_reply.attempts) == ("succeeded", 3)
    assert refused.reply(timeout=60).status == "rejected"
    assert crashed.reply(timeout=60).status == "failed"
    done = broker.state()
    wait_for(lambda: done.llen(broker.key("probe", "wobbly", "done", "pool_a")) == 1, timeout=60)
    wait_for(lambda: done.llen(broker.key("probe", "faults")) == 1, timeout=60)


def settled(exporter: Exporter, name: str, expected: dict[tuple[str, str], float]) -> None:
    """Until the exporter shows ``expected`` for metric ``name`` (its events arrive a moment
    after the replies), then exactly that: no other label set either."""
    with contextlib.suppress(AssertionError):  # the assertion below shows the difference
        wait_for(lambda: by_type_and_pool(exporter.scrape().get(name, {})) == expected, timeout=30)
    assert by_type_and_pool(exporter.scrape().get(name, {})) == expected


def test_handled_messages_are_counted_by_message_type_and_pool(exporter: Exporter) -> None:
    settled(
        exporter,
        "postroom_messages_handled_total",
        {
            ("probe.Echo", "probe"): 3,
            ("probe.Flaky", "probe"): 1,
            ("probe.ProbeHappened", "pool_a"): 1,  # the event's delivery, named <type>@<pool>
            ("postroom.CommandFailed", "pool_a"): 1,  # published when Crash failed for good
        },
    )


def test_retries_are_counted_for_commands_and_for_a_pools_event_delivery(
    exporter: Exporter,
) -> None:
    settled(
        exporter,
        "postroom_messages_retried_total",
        {("probe.Flaky", "probe"): 2, ("probe.ProbeHappened", "pool_a"): 1},
    )


def test_a_rejection_is_not_counted_as_a_failure(exporter: Exporter) -> None:
    settled(exporter, "postroom_messages_rejected_total", {("probe.Refuse", "probe"): 1})
    settled(exporter, "postroom_messages_failed_total", {("probe.Crash", "probe"): 1})


def test_the_duration_histogram_counts_each_handled_message(exporter: Exporter) -> None:
    settled(
        exporter,
        "postroom_message_duration_seconds_count",
        {
            ("probe.Echo", "probe"): 3,
            ("probe.Flaky", "probe"): 1,
            ("probe.ProbeHappened", "pool_a"): 1,
            ("postroom.CommandFailed", "pool_a"): 1,
        },
    )
    samples = exporter.scrape()
    echo = ("message_type", "probe.Echo"), ("pool", "probe")
    assert samples["postroom_message_duration_seconds_sum"][echo] > 0
    buckets = {
        dict(k)["le"]: v
        for k, v in samples["postroom_message_duration_seconds_bucket"].items()
        if dict(k)["message_type"] == "probe.Echo"
    }
    assert buckets["+Inf"] == 3
    assert buckets["10.0"] == 3  # a no-op handler takes milliseconds


def test_queue_depth_counts_messages_parked_in_a_queue_no_worker_reads(
    exporter: Exporter,
) -> None:
    depth = {dict(k)["queue"]: v for k, v in exporter.scrape()["postroom_queue_depth"].items()}
    assert depth[command_queue_name("assets")] == PARKED
    assert depth[command_queue_name("search")] == PARKED_QUERIES
    assert depth[command_queue_name("probe")] == 0  # drained by its pool
    assert depth[event_queue_name("pool_b")] == 0  # never declared: no pool of it ran
    assert set(depth) >= {command_queue_name("geofence"), event_queue_name("search")}


def test_dead_letters_are_counted_by_type_owner_and_reason(exporter: Exporter) -> None:
    letters = {
        tuple(v for _, v in k): n
        for k, n in exporter.scrape().get("postroom_dead_letters", {}).items()
    }
    assert letters == {("probe.Crash", "probe", "failed"): 1}  # labels: message_type,owner,reason


def test_sigterm_stops_the_exporter(exporter: Exporter) -> None:
    assert exporter.stop() == 0
    assert "Traceback" not in exporter.output()
