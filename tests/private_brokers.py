"""Private servers, started and stopped by a test: for tests that restart their broker or database.

The machine's shared Redis, RabbitMQ and PostgreSQL are never touched: each server here is a process of the
test's own, listening on free loopback ports, keeping its data in a temporary directory that is
removed with it. A RabbitMQ node also gets its own epmd, Erlang cookie (its ``HOME`` is the
temporary directory) and environment file, so nothing is read from /etc/rabbitmq or /var/lib.

Use them as context managers: on the way out the server is stopped (killed if it does not stop in
time) and its directory removed, whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# The real scripts: /usr/sbin's wrappers su to the rabbitmq user and read /var/lib/rabbitmq.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


def _end(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Wait for a process to end; SIGKILL its process group if it is still running after ``timeout``.

    Each server is started in a session of its own, so its group holds its processes only; and the
    group is signalled only while its leader is alive, so its ID cannot belong to anyone else.
    """
    if proc is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class _Managed:
    """Started on the way in; on the way out (or if the start fails) closed, whatever happened."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Server(_Managed):
    port: int

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exit_codes: list[int | None] = []  # one per stop: 0 when the server stopped cleanly

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, user: str | None = None
    ) -> None:
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=self.root, env=env, user=user, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.starts += 1

    def _await(self, answers: Callable[[], bool], timeout: float, *logs: Path) -> None:
        """Until the server ``answers()``; if it exits or does not answer in time, it is killed
        and the error ends with its logs."""
        deadline = time.monotonic() + timeout
        while not answers():
            if not self.running or time.monotonic() > deadline:
                _end(self.proc, 0)
                tails = "\n".join(_tail(log) for log in logs)
                raise AssertionError(
                    f"private {type(self).__name__} on port {self.port} did not start in "
                    f"{timeout}s:\n{tails}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        raise NotImplementedError

    def _stopped(self, timeout: float) -> None:
        _end(self.proc, timeout)
        if self.proc is not None:
            self.exit_codes.append(self.proc.returncode)

    def restart(self) -> None:
        """Stop cleanly, then start again on the same port with the same data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop (or kill) the server and remove its directory; safe to call more than once."""
        try:
            if self.running:
                self.stop()
        finally:
            _end(self.proc, 0)
            self._end_helpers()
            shutil.rmtree(self.root, ignore_errors=True)

    def _end_helpers(self) -> None:
        """Processes started alongside the server, ended after it."""


class PrivateRedis(_Server):
    """A redis-server with an fsync-always append-only file and no RDB snapshots."""

    def __init__(self) -> None:
        super().__init__("postroom-redis-")
        self.port = free_port()
        self.data = self.root / "data"
        self.data.mkdir()
        self.log = self.root / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        # no retries: a server that is down must say so at once (SHUTDOWN, the start-up poll)
        return redis.Redis(
            host=LOOPBACK, port=self.port, socket_timeout=10, retry=Retry(NoBackoff(), 0)
        )

    def start(self, timeout: float = 30.0) -> None:
        self._spawn(
            [
                "redis-server", "--bind", LOOPBACK, "--port", str(self.port),
                "--dir", str(self.data), "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.log),
            ],
            self.root / "stdout.log",
        )  # fmt: skip
        self._await(self._answers, timeout, self.log, self.root / "stdout.log")

    def _answers(self) -> bool:
        try:
            with self.client() as db:
                # LOADING until the append-only file is read back: that raises BusyLoadingError
                return bool(db.ping())
        except redis.exceptions.RedisError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SHUTDOWN: Redis fsyncs its append-only file and exits."""
        if not self.running:
            return
        # the server closes the connection while going away
        with self.client() as db, contextlib.suppress(redis.exceptions.ConnectionError):
            db.shutdown()
        self._stopped(timeout)

    def queued(self, key: str) -> int:
        """Messages in a kombu Redis queue (its list, with any priority sub-lists)."""
        with self.client() as db:
            return sum(int(db.llen(k)) for k in db.scan_iter(match=f"{key}*", count=1000))


def start_epmd(port: int, log: Path) -> subprocess.Popen[bytes]:
    """An Erlang port mapper of a test's own, on loopback, answering when this returns."""
    with log.open("ab") as out:
        epmd = subprocess.Popen(
            ["epmd", "-port", str(port), "-address", LOOPBACK],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return epmd
        if epmd.poll() is not None or time.monotonic() > deadline:
            _end(epmd, 0)
            raise AssertionError(f"private epmd did not start:\n{_tail(log)}")
        time.sleep(0.05)


class PrivateRabbitMQ(_Server):
    """A RabbitMQ node of its own: own node name, ports, epmd, cookie, config, plugins and data."""

    def __init__(
        self, *, epmd_port: int | None = None, cookie: str | None = None, advanced: str = ""
    ) -> None:
        """A node on its own, or (given ``epmd_port`` and ``cookie``) one of a cluster whose
        epmd is started and stopped by the cluster; ``advanced`` is its advanced.config (Erlang
        terms), for the settings rabbitmq.conf has no key for."""
        super().__init__("postroom-rabbitmq-")
        self.node = f"postroom-test-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self._owns_epmd = epmd_port is None
        self.epmd_port = epmd_port or free_port()
        self.epmd: subprocess.Popen[bytes] | None = None
        self.log = self.root / "server.log"
        cookie_file = self.root / ".erlang.cookie"
        cookie_file.write_text(cookie or secrets.token_hex(16).upper())
        cookie_file.chmod(0o400)
        (self.root / "rabbitmq.conf").write_text(
            "loopback_users.guest = true\ndisk_free_limit.absolute = 50MB\n"
        )
        (self.root / "rabbitmq-env.conf").write_text("# private test node: no settings\n")
        if advanced:
            (self.root / "advanced.config").write_text(advanced)
        (self.root / "enabled_plugins").write_text("[].\n")
        loopback_dist = "-kernel inet_dist_use_interface {127,0,0,1}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        self.env = {
            **inherited,
            "HOME": str(self.root),  # where Erlang reads the cookie, for the node and the CLI
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.root / "plugins-expand"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback_dist,
            "RABBITMQ_CTL_ERL_ARGS": loopback_dist,
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}//"

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> ...``; never reaches the shared node."""
        return subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, "-q", *args],
            env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip

    def start(self, timeout: float = 120.0) -> None:
        self.launch()
        self.await_startup(timeout)

    def launch(self) -> None:
        """Start the node's process without waiting for it (a cluster starts its nodes together)."""
        if self._owns_epmd and (self.epmd is None or self.epmd.poll() is not None):
            self.epmd = start_epmd(self.epmd_port, self.root / "epmd.log")
        self._spawn([str(RABBITMQ_BIN / "rabbitmq-server")], self.log, self.env)

    def await_startup(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            # await_startup fails at once while the node has not yet registered with epmd
            left = max(1, int(deadline - time.monotonic()))
            done = self.ctl("await_startup", "--timeout", str(min(left, 10)), timeout=left + 30)
            if done.returncode == 0:
                return
            if not self.running or time.monotonic() > deadline:
                _end(self.proc, 0)
                raise AssertionError(
                    f"private RabbitMQ node {self.node} did not start in {timeout}s:\n"
                    f"{done.stdout}{done.stderr}\n{_tail(self.log)}"
                )
            time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> None:
        """``rabbitmqctl stop``: the node shuts down cleanly (queues and message store to disk)."""
        if not self.running:
            return
        self.ctl("stop", timeout=timeout)
        self._stopped(timeout)

    def kill(self) -> None:
        """SIGKILL the node's processes (the Erlang VM and its helpers: the group it leads), as a
        lost machine ends them: nothing is written or said to the other nodes."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._stopped(30)

    def _end_helpers(self) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.terminate()
            _end(self.epmd, 10)

    def queues(self) -> dict[str, dict[str, str]]:
        """Every queue of the node's default vhost: name -> type, durable, messages."""
        columns = ("name", "type", "durable", "messages")
        done = self.ctl("list_queues", "--no-table-headers", *columns)
        assert done.returncode == 0, done.stdout + done.stderr
        rows = [line.split("\t") for line in done.stdout.splitlines() if line.strip()]
        return {row[0]: dict(zip(columns[1:], row[1:], strict=True)) for row in rows}


class PrivatePostgres(_Server):
    """A PostgreSQL server of its own: own data directory (initdb, trust auth), port and socket
    directory. Run as the ``postgres`` user when the test runs as root, as PostgreSQL refuses to
    run as root."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__("postroom-postgres-")
        self.port = port or free_port()
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not found:
            raise AssertionError("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
        self.bin = Path(found[-1])
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                   "--no-sync", "-E", "UTF8"])  # fmt: skip

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(
            argv, cwd=self.root, user=self.user, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"{argv[0]} failed:\n{done.stdout}{done.stderr}")

    @property
    def url(self) -> str:
        """SQLAlchemy's URL of the server's ``postgres`` database."""
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/postgres"

    def _answers(self) -> bool:
        done = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", LOOPBACK, "-p", str(self.port), "-t", "1"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        return done.returncode == 0

    def start(self, timeout: float = 60.0) -> None:
        argv = [
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", f"listen_addresses={LOOPBACK}", "-c", f"unix_socket_directories={self.root}",
            "-c", "max_connections=100",
        ]  # fmt: skip
        self._spawn(argv, self.log, user=self.user)
        self._await(self._answers, timeout, self.log)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT), as ``pg_ctl stop`` and a service manager's restart do: open
        sessions are ended, their transactions rolled back, the server checkpoints and exits."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self._stopped(timeout)

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT), the nearest to a power cut: no checkpoint, so the next
        start replays the write-ahead log."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGQUIT)
        self._stopped(30)


class PrivateRabbitMQCluster(_Managed):
    """``size`` private RabbitMQ nodes joined in one cluster: one epmd and one Erlang cookie for
    all, each node with its own name, ports and data. As a context manager, every node and the
    epmd are stopped (killed if need be, by the PIDs started here) on the way out."""

    def __init__(self, size: int = 3, *, advanced: str = "") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="postroom-rabbitmq-cluster-"))
        self.epmd_port = free_port()
        cookie = secrets.token_hex(16).upper()
        self.nodes = [
            PrivateRabbitMQ(epmd_port=self.epmd_port, cookie=cookie, advanced=advanced)
            for _ in range(size)
        ]
        self.epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Every node's URL, ``;``-separated (Celery's and kombu's failover convention)."""
        return ";".join(node.url for node in self.nodes)

    def start(self, timeout: float = 180.0) -> None:
        self.epmd = start_epmd(self.epmd_port, self.root / "epmd.log")
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.await_startup(timeout)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            for step in (("stop_app",), ("join_cluster", first.node), ("start_app",)):
                done = node.ctl(*step)
                assert done.returncode == 0, f"{node.node} {step}: {done.stdout}{done.stderr}"
        status = first.ctl("cluster_status", "--formatter", "json")
        assert status.returncode == 0, status.stdout + status.stderr
        running = set(json.loads(status.stdout)["running_nodes"])
        assert running == {node.node for node in self.nodes}, running

    def close(self) -> None:
        try:
            for node in reversed(self.nodes):
                node.close()
        finally:
            if self.epmd is not None and self.epmd.poll() is None:
                self.epmd.terminate()
                _end(self.epmd, 10)
            shutil.rmtree(self.root, ignore_errors=True)
