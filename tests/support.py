"""Real brokers, real workers: an isolated broker context per test module, and worker subprocesses.

Each context gets its own namespace (a Redis key prefix for the broker and the services' state) or
its own RabbitMQ vhost, and uses Redis DBs 11 (broker) and 12 (replies, state) rather than the
defaults, so tests never see each other's messages nor touch a developer's data. The assets
service's tables go to a PostgreSQL schema named after the namespace, in the database ``test``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from celery import Celery

from config.celery import create_app
from config.pools import Pool
from config.settings import Settings
from tasks.state import database
from workers.launcher import wait_until_ready, worker_argv

ROOT = Path(__file__).resolve().parents[1]
REDIS = "redis://127.0.0.1:6379"
BROKER_DB, STATE_DB = 11, 12
BROKERS = ["redis", "rabbitmq"]
TEST_SERVICES = "tests.integration.services"
DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _vhost(method: str, vhost: str) -> None:
    """Create or delete a vhost of the shared RabbitMQ, guest allowed everything in it, through
    the management API (scripts/brokers.sh makes sure it answers): rabbitmqctl boots an Erlang
    VM per call, about 0.6 s of CPU each, three times per test module."""
    api = "http://127.0.0.1:15672/api"
    with httpx.Client(auth=("guest", "guest"), timeout=60) as client:
        client.request(method, f"{api}/vhosts/{vhost}").raise_for_status()
        if method == "PUT":
            grant = {"configure": ".*", "write": ".*", "read": ".*"}
            client.put(f"{api}/permissions/{vhost}/guest", json=grant).raise_for_status()


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a worker's pool processes; not one killed and not
    reaped yet)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split() if _alive(int(p))]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in {"Z", "X"}


@dataclass
class WorkerProcess:
    pool: Pool
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_9(self) -> None:
        """SIGKILL the main process, then its children, as the OOM killer or a lost machine ends
        a worker; returns once the main process is gone."""
        for pid in [self.proc.pid, *children(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class BrokerContext:
    kind: str
    env: dict[str, str]
    settings: Settings
    app: Celery
    workdir: Path
    vhost: str | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    _state: redis.Redis | None = None

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    def state(self) -> redis.Redis:
        if self._state is None:
            self._state = redis.Redis.from_url(f"{REDIS}/{STATE_DB}", decode_responses=True)
        return self._state

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def queue_size(self, name: str) -> int:
        """Messages ready in a queue (Redis forgets an empty list, so only RabbitMQ is asked
        passively)."""
        with self.app.connection_for_write() as conn:
            ok = conn.default_channel.queue_declare(
                queue=name, passive=self.kind == "rabbitmq", durable=True
            )
            return int(ok.message_count)

    def spawn_worker(self, pool: Pool) -> WorkerProcess:
        """Start a worker process for ``pool`` without waiting for it; it is stopped on close()."""
        log = self.workdir / f"{pool.name}-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                worker_argv(pool, self.settings), cwd=ROOT, env=self.env,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        worker = WorkerProcess(pool, proc, log)
        self.workers.append(worker)
        return worker

    def start_worker(self, pool: Pool, *, ready_timeout: float = 60.0) -> WorkerProcess:
        return self.start_workers(pool, ready_timeout=ready_timeout)[0]

    def start_workers(self, *pools: Pool, ready_timeout: float = 60.0) -> list[WorkerProcess]:
        """Start a worker per pool, all at once, and return when every one answers a ping."""
        workers = [self.spawn_worker(pool) for pool in pools]
        try:
            wait_until_ready(self.app, pools, timeout=ready_timeout)
        except TimeoutError as late:
            for worker in workers:
                worker.stop()
            logs = "\n".join(f"{w.pool.name}:\n{w.output()}" for w in workers)
            raise AssertionError(f"{late}:\n{logs}") from None
        return workers

    def close(self) -> None:
        # Killed, not stopped: what a worker still holds goes with the namespace, vhost and schema
        # dropped below, and a warm shutdown takes 2-3 s a worker (the tests of shutdown itself
        # stop theirs with stop()).
        for worker in self.workers:
            if worker.proc.poll() is None:  # a reaped worker's PID may be another process's now
                worker.kill_9()
        self.app.close()
        if self._state is not None:
            self._state.close()
        for db in (BROKER_DB, STATE_DB):
            with redis.Redis.from_url(f"{REDIS}/{db}") as client:
                keys = list(client.scan_iter(f"{self.namespace}:*", count=1000))
                for start in range(0, len(keys), 1000):
                    client.delete(*keys[start : start + 1000])
        if self.vhost:
            _vhost("DELETE", self.vhost)
        store = database(self.settings)
        store.engine.dispose()  # a connection a test terminated is not pinged back to life
        store.drop_schema()
        store.engine.dispose()


def broker_context(kind: str, workdir: Path, **overrides: str) -> BrokerContext:
    """A fresh, isolated broker context; ``overrides`` are POSTROOM_* settings by field name."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    vhost = None
    if kind == "redis":
        broker = f"{REDIS}/{BROKER_DB}"
    elif "broker_url" in overrides:  # a private RabbitMQ (a cluster, say): its own default vhost
        broker = overrides["broker_url"]
    else:
        vhost = f"postroom-test-{namespace}"
        _vhost("PUT", vhost)
        broker = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    values = {
        "broker_url": broker,
        "result_backend": f"{REDIS}/{STATE_DB}",
        "namespace": namespace,
        "imports": TEST_SERVICES,
        "max_retries": "3",
        "retry_backoff": "0.05",
        "retry_backoff_max": "0.2",
        "reply_ttl": "900",
        "log_level": "INFO",
        "database_url": DATABASE,
        "database_schema": namespace,
        **overrides,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update({f"POSTROOM_{name.upper()}": value for name, value in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    settings = Settings.from_env(env)
    database(settings).migrate()
    return BrokerContext(kind, env, settings, create_app(settings), workdir, vhost)


def run_python(env: dict[str, str], *argv: str) -> str:
    """Run ``python *argv`` in the repository as a user's own process would; its standard output."""
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def wait_for(predicate: object, timeout: float = 30.0, interval: float = 0.1) -> None:
    """Until ``predicate()`` is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
