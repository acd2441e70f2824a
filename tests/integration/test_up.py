"""`postroom up` as a user runs it: pools and Flower, commands from a plain shell, a clean stop.

On RabbitMQ it is given two `;`-separated broker URLs, the first one's node down, as a cluster
with a dead node: every process it starts connects to the next."""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.pools import POOLS, Pool
from postroom import MessageBus
from tasks.analytics import GetAssetStats
from tasks.notifications import ListNotifications
from tasks.search import SearchAssets
from tests.integration.services import Echo
from tests.support import (
    ROOT,
    BrokerContext,
    broker_context,
    last_line,
    run_python,
    wait_for,
)
from workers.launcher import wait_until_ready, worker_argv

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

AUTH = "watcher:correct-horse"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Up:
    def __init__(self, broker: BrokerContext, log: Path) -> None:
        self.port = _free_port()
        self.api_port = _free_port()
        self.metrics_port = _free_port()
        self.env = dict(
            broker.env,
            POSTROOM_FLOWER_PORT=str(self.port),
            POSTROOM_API_PORT=str(self.api_port),
            POSTROOM_METRICS_PORT=str(self.metrics_port),
            POSTROOM_API_REPLY_WAIT="30",  # a POST answers 201 even on a busy machine
            POSTROOM_FLOWER_BASIC_AUTH=AUTH,
            POSTROOM_IMPORTS="",
        )
        if broker.kind == "rabbitmq":
            # a cluster's URLs, the first node down: the pools, Flower, the API, the exporter, the
            # demo and a user's shell all go on with the next
            self.env["POSTROOM_BROKER_URL"] = (
                f"amqp://guest:guest@127.0.0.1:{_free_port()}/{broker.vhost};"
                f"{broker.settings.broker_url}"
            )
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "up", "--demo"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def flower(self, path: str, auth: str | None = AUTH) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def up(broker: BrokerContext) -> Iterator[Up]:
    running = Up(broker, broker.workdir / "up.log")
    try:
        wait_for(
            lambda: "demo done" in running.output() or running.proc.poll() is not None, timeout=120
        )
        assert running.proc.poll() is None, running.output()
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.send_signal(signal.SIGTERM)
            running.proc.wait(60)


def test_up_prints_where_flower_is_and_the_demo_shows_a_reply_and_three_reactions(up: Up) -> None:
    out = up.output()
    assert f"Flower at http://127.0.0.1:{up.port}/" in out
    assert "<- reply: succeeded {'asset_id':" in out
    assert "search        SearchAssets('Truck 12') <- 1 match(es)" in out
    assert "analytics     GetAssetStats() <- {'assets_registered': 1, 'devices_bound': 1}" in out
    assert "notifications Asset 'Truck 12' was registered" in out
    assert "Traceback" not in out


def test_the_demos_orders_end_completed_and_compensated_and_their_steps_are_traced(
    up: Up,
) -> None:
    out = up.output()
    done = re.search(r"greengrocer +order (\S+): completed; charged 1x, refunded 0x", out)
    undone = re.search(
        r"night_market +order (\S+): cancelled \(vendor night_market did not confirm within "
        r"3 s\); charged 1x, refunded 1x",
        out,
    )
    assert done, out
    assert undone, out
    traced = run_python(up.env, "-m", "workers.cli", "trace", "--process", "fulfilment", undone[1])
    assert f"process fulfilment:{undone[1]}: compensated" in traced
    assert re.search(r"├─ \S+ orders\.OrderPaid \S+: started", traced), traced
    assert re.search(r"sent vendors\.NotifyVendor \S+, fulfilment\.VendorSilent \S+ \(due", traced)
    assert re.search(r"└─ \S+ fulfilment\.VendorSilent \S+: compensated", traced), traced
    assert "sent orders.CancelOrder" in traced
    assert "payments.RefundPayment" in traced
    ended = run_python(up.env, "-m", "workers.cli", "processes", "fulfilment", "--ended")
    assert {done[1], undone[1]} <= set(re.findall(r"fulfilment +(\S+) ", ended)), ended
    assert run_python(up.env, "-m", "workers.cli", "processes").strip() == ""  # none running


SHELL = """
import config
from postroom import bus
from tasks.assets import RegisterAsset
pending = bus.send(RegisterAsset(name="Forklift 7", attributes={"site": "dock 4"}))
print(pending.correlation_id)
"""

FETCH = """
import sys
import config
from postroom import bus
print(bus.reply_for(sys.argv[1], timeout=30).model_dump_json())
"""


def _shell(up: Up, code: str, *args: str) -> str:
    return last_line(run_python(up.env, "-c", code, *args))


def test_a_command_from_a_plain_shell_gets_its_reply_by_correlation_id_and_fans_out(
    up: Up, broker: BrokerContext
) -> None:
    correlation_id = _shell(up, SHELL)
    reply = json.loads(_shell(up, FETCH, correlation_id))
    assert (reply["status"], reply["correlation_id"]) == ("succeeded", correlation_id)
    asset_id = reply["value"]["asset_id"]

    bus = MessageBus(broker.app)
    wait_for(
        lambda: any(a["asset_id"] == asset_id for a in bus.ask(SearchAssets(text="forklift")).value)
    )
    wait_for(lambda: len(bus.ask(ListNotifications(asset_id=asset_id)).value) == 1)
    wait_for(lambda: bus.ask(GetAssetStats()).value["assets_registered"] == 2)

    tasks = {}

    def seen_in_flower() -> bool:
        tasks.update(up.flower("/api/tasks"))
        names = {t["name"] for t in tasks.values() if t.get("root_id") == correlation_id}
        return {
            "assets.RegisterAsset",
            "assets.AssetRegistered@search",
            "assets.AssetRegistered@analytics",
            "assets.AssetRegistered@notifications",
        } <= names

    wait_for(seen_in_flower, timeout=30)
    command = tasks[correlation_id]
    assert command["name"] == "assets.RegisterAsset"
    assert "Forklift 7" in command["kwargs"]
    deliveries = [
        t
        for t in tasks.values()
        if t["name"].startswith("assets.AssetRegistered@") and t["root_id"] == correlation_id
    ]
    assert len({t["uuid"] for t in deliveries}) == 3  # one task per pool, not one for all
    for task in deliveries:
        assert f"correlation_id={correlation_id}" in task["args"]
        assert "message_id=" in task["args"]
        assert task["state"] == "SUCCESS"


@pytest.mark.parametrize("path", ["/api/tasks", "/api/workers", "/tasks", "/metrics"])
def test_flower_refuses_requests_without_credentials(up: Up, path: str) -> None:
    for auth in (None, "watcher:wrong"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            up.flower(path, auth=auth)
        assert refused.value.code == 401, (path, auth)


def test_flower_metrics_answer_with_credentials(up: Up) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{up.port}/metrics")
    request.add_header("Authorization", "Basic " + base64.b64encode(AUTH.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        assert b"flower_events_total" in response.read()


def test_up_serves_the_http_api_and_its_docs(up: Up) -> None:
    assert f"HTTP API at http://127.0.0.1:{up.api_port}/" in up.output()
    with urllib.request.urlopen(f"http://127.0.0.1:{up.api_port}/docs", timeout=10) as response:
        assert b"swagger-ui" in response.read()
    request = urllib.request.Request(
        f"http://127.0.0.1:{up.api_port}/assets",
        data=json.dumps({"name": "Crane 3"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 201
        assert response.headers["Location"] == f"/assets/{json.loads(response.read())['asset_id']}"


def test_up_serves_prometheus_metrics_that_counted_the_demo(up: Up) -> None:
    url = f"http://127.0.0.1:{up.metrics_port}/metrics"
    assert f"Prometheus metrics at {url}" in up.output()

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    counted = 'postroom_messages_handled_total{message_type="assets.RegisterAsset",pool="assets"}'
    wait_for(lambda: counted in scrape(), timeout=30)
    delivered = 'message_type="assets.AssetRegistered",pool="search"'
    wait_for(lambda: delivered in scrape(), timeout=30)


def test_sigterm_stops_every_pool_and_flower(up: Up, broker: BrokerContext) -> None:
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert not broker.app.control.ping(timeout=1.0)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", up.port)) != 0
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", up.api_port)) != 0
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", up.metrics_port)) != 0
    assert AUTH.split(":")[1] not in up.output()
    assert len(POOLS) == up.output().count("Warm shutdown")


def test_a_worker_on_a_terminal_prints_one_pretty_line_per_message(tmp_path: Path) -> None:
    """As under `postroom up` in a terminal: no banner, no Celery task lines, one line per message."""
    broker = broker_context("redis", tmp_path)
    pool = Pool("probe", ("commands.probe",), concurrency=1)
    terminal, worker_side = pty.openpty()
    env = {k: v for k, v in broker.env.items() if k != "NO_COLOR"}
    proc = subprocess.Popen(
        worker_argv(pool, broker.settings), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
        stdout=worker_side, stderr=worker_side, start_new_session=True,
    )  # fmt: skip
    os.close(worker_side)
    seen = b""
    try:
        wait_until_ready(broker.app, [pool], timeout=30)
        pending = MessageBus(broker.app, source="tests").send(Echo(text="on a terminal"))
        assert pending.reply(timeout=30).status == "succeeded"
        line = re.compile(rf"probe +probe\.Echo +succeeded +{pending.correlation_id[:4]}…")
        deadline = time.monotonic() + 15
        while not line.search(re.sub(r"\x1b\[[0-9;]*m", "", seen.decode(errors="replace"))):
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([terminal], [], [], 0.5)[0]:
                seen += os.read(terminal, 4096)
        assert b"\x1b[" in seen  # coloured: NO_COLOR is not set
        assert b"received" not in seen  # Celery's task lines are left out
        assert b"-------------- " not in seen  # and so is its banner
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(terminal)
        broker.close()


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_a_worker_told_to_stop_shuts_down_warm_and_exits_cleanly(kind: str, tmp_path: Path) -> None:
    """SIGTERM, as `postroom up`, systemd or Kubernetes send it: every postroom thread of the
    worker (delay promoter, heartbeat, outbox sweep, partition leases) stops, and the worker
    exits 0 with no traceback."""
    broker = broker_context(kind, tmp_path)
    try:
        workers = [
            broker.start_worker(Pool("probe", ("commands.probe",), concurrency=1)),
            broker.start_worker(Pool("ordered", ("commands.ordered",), concurrency=1)),
        ]
        for worker in workers:
            worker.stop(timeout=20)
            assert worker.proc.returncode == 0, worker.output()[-3000:]
            assert "Traceback" not in worker.output(), worker.output()[-3000:]
    finally:
        broker.close()
