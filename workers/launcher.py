"""Starts worker pools and Flower as plain Celery processes, and stops them cleanly together.

Each pool is one ``celery -A config worker`` process (with its own children), consuming only that
pool's queues, so what runs here is exactly what a user could type by hand.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable

from celery import Celery

from config.pools import Pool
from config.settings import Settings

STOP_GRACE_SECONDS = 30.0


def worker_argv(pool: Pool, settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "config", "worker",
        "-Q", ",".join(pool.queues),
        "-c", str(pool.concurrency),
        "-P", pool.pool,
        "-n", node_name(pool),
        "--prefetch-multiplier", str(pool.prefetch_multiplier),
        "-E",
        "-l", settings.log_level,
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def node_name(pool: Pool) -> str:
    return f"{pool.name}@{socket.gethostname()}"


def flower_argv(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "workers.flower",
        f"--port={settings.flower_port}", f"--address={settings.flower_address}",
        f"--logging={settings.log_level.lower()}",
    ]  # fmt: skip


def flower_env(settings: Settings) -> dict[str, str]:
    """Credentials go to Flower through its environment, never its command line (visible in ps)."""
    env = dict(os.environ)
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    return env


def flower_url(settings: Settings) -> str:
    return f"http://{settings.flower_address}:{settings.flower_port}/"


def wait_until_ready(app: Celery, pools: Iterable[Pool], timeout: float = 60.0) -> None:
    """Block until every pool's worker answers a ping; TimeoutError naming the ones that did not."""
    waiting = {node_name(p) for p in pools}
    deadline = time.monotonic() + timeout
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"worker(s) {', '.join(sorted(waiting))} did not start in {timeout}s"
            )
        try:
            answers = app.control.ping(destination=sorted(waiting), timeout=1.0) or []
        except (OSError, *app.connection_for_write().connection_errors):
            # The broker went away since the pool's connections were made (a restart): drop
            # them and ask again, as a sender does.
            app.pool.force_close_all()
            time.sleep(0.5)
            continue
        for answer in answers:
            waiting -= set(answer)


def wait_for_flower(settings: Settings, timeout: float = 60.0) -> None:
    """Block until Flower answers HTTP (a 401 counts: it is up, and asking for credentials)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(flower_url(settings) + "healthcheck", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Flower did not answer at {flower_url(settings)} in {timeout}s"
                ) from None
            time.sleep(0.3)


class Supervisor:
    """Runs several processes in the foreground; stops all of them when one stops or on a signal."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping = False

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        # A session of its own: Ctrl-C reaches the supervisor only, which stops children in order.
        self.procs[name] = subprocess.Popen(argv, env=env, start_new_session=True)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def wait(self) -> int:
        """Until a signal arrives (exit 0) or a process dies on its own (exit 1); then stop all."""
        died = None
        while not self._stopping and died is None:
            died = next((n for n, p in self.procs.items() if p.poll() is not None), None)
            time.sleep(0.2)
        if died is not None:
            print(
                f"postroom: {died} exited with code {self.procs[died].returncode}; "
                "stopping the others",
                file=sys.stderr,
            )
        self.stop()
        return 0 if died is None else 1

    def stop(self) -> None:
        """Warm shutdown (SIGTERM: finish the current message) with a grace period, then SIGKILL."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
