"""A deployment outside this repository: its own package, app, contracts and pools, run with
``postroom -A``, on Redis and RabbitMQ.

The package is written into a temporary directory, away from this repository's ``config`` and
``tasks``: a Celery app calling ``postroom.install(app, imports=[...])``, a partitioned command
whose handler publishes an event, and a subscriber pool answering a query from what it saw. Its
pools are derived from its handlers; `postroom -A fleetapp up` starts them; a separate process
imports the app and talks to them through ``postroom.bus``.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import BrokerContext, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

POSTROOM = str(Path(sys.executable).parent / "postroom")
AUTH = "fleet:manager"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, auth: str | None = None) -> str:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


PACKAGE = {
    "__init__.py": '"""A fleet: trucks are dispatched, and a report keeps what was dispatched."""\n',
    "celery.py": """
from celery import Celery

import postroom
from fleetapp.audit import AuditLog

settings = postroom.Settings()
app = Celery("fleetapp")
postroom.install(
    app,
    settings,
    imports=["fleetapp.dispatch", "fleetapp.reports"],
    steps=[AuditLog(settings.state, f"{settings.namespace}:audit")],
)
""",
    "audit.py": """
import redis

from postroom import Delivery, Outcome, Step
from postroom.pipeline import Next


class AuditLog(Step):
    \"\"\"A user's own pipeline step: every handling, with its outcome, in a Redis list.\"\"\"

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        outcome = call_next(delivery)
        with redis.Redis.from_url(self.url) as db:
            db.rpush(self.key, f"{delivery.name} {outcome.status}")
        return outcome
""",
    "contracts.py": """
from postroom import Command, Event, Query


class DispatchTruck(Command, service="dispatch", partition_key="truck"):
    truck: str
    route: str


class TruckDispatched(Event, service="dispatch"):
    truck: str
    route: str


class GetDispatches(Query, service="reports"):
    truck: str
""",
    "dispatch.py": """
from postroom import HandlerContext, handles

from fleetapp.contracts import DispatchTruck, TruckDispatched


@handles(DispatchTruck)
def dispatch(cmd: DispatchTruck, ctx: HandlerContext) -> dict[str, str]:
    ctx.publish(TruckDispatched(truck=cmd.truck, route=cmd.route))
    return {"truck": cmd.truck, "route": cmd.route}
""",
    "reports.py": """
import redis
from celery import current_app

from postroom import HandlerContext, handles, installation, subscribes

from fleetapp.contracts import GetDispatches, TruckDispatched


def _key(truck: str) -> str:
    return f"{installation(current_app).settings.namespace}:reports:{truck}"


@subscribes(TruckDispatched, pool="reports")
def record(event: TruckDispatched, ctx: HandlerContext) -> None:
    ctx.transaction().rpush(_key(event.truck), event.route)


@handles(GetDispatches)
def dispatches(query: GetDispatches, ctx: HandlerContext) -> list[str]:
    settings = installation(current_app).settings
    with redis.Redis.from_url(settings.state, decode_responses=True) as db:
        return db.lrange(_key(query.truck), 0, -1)
""",
}

SENDER = """
import json
import time

import redis

import fleetapp.celery  # makes the app, with postroom installed, the current one
from fleetapp.contracts import DispatchTruck, GetDispatches
from postroom import bus, installation

reply = bus.send(DispatchTruck(truck="T-7", route="north")).reply(timeout=30)
deadline = time.monotonic() + 30
while not (seen := bus.ask(GetDispatches(truck="T-7"), timeout=30).value):
    assert time.monotonic() < deadline, "the reports pool never saw TruckDispatched"
    time.sleep(0.2)
settings = installation(fleetapp.celery.app).settings
with redis.Redis.from_url(settings.state, decode_responses=True) as db:
    audit = db.lrange(f"{settings.namespace}:audit", 0, -1)
print(json.dumps({"status": reply.status, "value": reply.value, "seen": seen, "audit": audit}))
"""

FORGETFUL = """
from fleetapp.contracts import DispatchTruck
from postroom import bus

bus.send(DispatchTruck(truck="T-8", route="south"))
"""


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    flower_port: int
    metrics_port: int

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def project(broker: BrokerContext) -> Project:
    root = broker.workdir / "project"
    (root / "fleetapp").mkdir(parents=True)
    for name, text in PACKAGE.items():
        (root / "fleetapp" / name).write_text(text.lstrip(), encoding="utf-8")
    flower, metrics = _free_port(), _free_port()
    env = dict(
        broker.env,
        POSTROOM_IMPORTS="",
        PYTHONPATH=str(root),
        POSTROOM_FLOWER_PORT=str(flower),
        POSTROOM_METRICS_PORT=str(metrics),
        POSTROOM_FLOWER_BASIC_AUTH=AUTH,  # Flower 2 serves its API to a signed-in user only
    )
    env.pop("POSTROOM_APP", None)
    return Project(root, env, flower, metrics)


@pytest.fixture(scope="module")
def up(project: Project) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = project.root / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [POSTROOM, "-A", "fleetapp", "up", "--no-api"],
            cwd=project.root, env=project.env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(
            lambda: "every pool is ready" in log.read_text() or proc.poll() is not None, timeout=90
        )
        assert proc.poll() is None, log.read_text()
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_its_pools_are_derived_from_its_handlers(project: Project) -> None:
    done = project.run(POSTROOM, "-A", "fleetapp", "pools")
    assert done.returncode == 0, done.stderr
    pools = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(pools) == {"dispatch", "reports"}
    # partitioned: one message at a time per worker, so a truck's commands stay in order
    assert "queues=commands.dispatch concurrency=1" in pools["dispatch"]
    # a subscriber pool that answers queries reads both of its queues
    assert "queues=events.reports,commands.reports" in pools["reports"]


def test_a_command_from_another_process_gets_its_reply_and_the_pool_its_event(
    project: Project, up: tuple[subprocess.Popen[bytes], Path]
) -> None:
    done = project.run(sys.executable, "-c", SENDER)
    assert done.returncode == 0, done.stderr + up[1].read_text()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    audit = result.pop("audit")
    assert result == {
        "status": "succeeded",
        "value": {"truck": "T-7", "route": "north"},
        "seen": ["north"],
    }
    # the deployment's own pipeline step ran in its workers, around every handling
    assert "dispatch.DispatchTruck succeeded" in audit
    assert "dispatch.TruckDispatched@reports handled" in audit
    assert "reports.GetDispatches succeeded" in audit


def test_flower_and_the_metrics_exporter_watch_the_same_app(
    project: Project, up: tuple[subprocess.Popen[bytes], Path]
) -> None:
    queues = json.loads(_get(f"http://127.0.0.1:{project.flower_port}/api/queues/length", AUTH))
    names = {q["name"] for q in queues["active_queues"]}
    assert {"commands.dispatch", "events.reports", "commands.reports"} <= names
    assert "commands.assets" not in names  # not this repository's deployment
    metrics = _get(f"http://127.0.0.1:{project.metrics_port}/metrics")
    assert 'postroom_queue_depth{queue="commands.dispatch"}' in metrics


def test_a_sender_that_forgot_the_app_is_told_to_install_postroom(project: Project) -> None:
    done = project.run(sys.executable, "-c", FORGETFUL)
    assert done.returncode != 0
    assert "postroom.errors.NotInstalled" in done.stderr
    assert "postroom.install(app" in done.stderr
    assert "amqp://" not in done.stderr  # it never tried Celery's default broker
    assert "Connection refused" not in done.stderr


def test_a_module_without_an_app_is_refused_saying_what_to_do(project: Project) -> None:
    done = project.run(POSTROOM, "-A", "fleetapp.contracts", "worker", "dispatch")
    assert done.returncode == 2
    assert "fleetapp.contracts has no Celery app" in done.stderr
    assert "postroom.install(app)" in done.stderr


def test_sigterm_stops_both_pools(up: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, log = up
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert log.read_text().count("Warm shutdown") == 2
