"""Starts worker pools and Flower as plain Celery processes, and stops them cleanly together.

Each pool is one ``celery -A <module> worker`` process (with its own children), consuming only
that pool's queues, so what runs here is exactly what a user could type by hand. Every process is
given the same app module (``postroom -A``; ``config``, this repository's deployment, by default).
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
from collections.abc import Callable, Iterable

from celery import Celery

from postroom.settings import Settings
from workers.deployment import APP_VARIABLE, DEFAULT_APP, Pool

STOP_GRACE_SECONDS = 30.0


def worker_argv(pool: Pool, settings: Settings, module: str = DEFAULT_APP) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", module, "worker",
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
        # args too: a task's args are its envelope's IDs, so the list shows each correlation ID
        "--tasks_columns=name,uuid,state,args,received,runtime,worker",
    ]  # fmt: skip


def flower_env(settings: Settings, module: str = DEFAULT_APP) -> dict[str, str]:
    """Credentials go to Flower through its environment, never its command line (visible in ps);
    so does the app module (workers/flower.py runs ``celery -A $POSTROOM_APP flower``)."""
    env = dict(os.environ, **{APP_VARIABLE: module})
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
    url = flower_url(settings)
    _wait_for_http(url + "healthcheck", "Flower", url, timeout, any_status=True)


def api_argv(settings: Settings, module: str = DEFAULT_APP) -> list[str]:
    """The HTTP API (workers/api.py) of ``module``'s app, at the address of ``settings``."""
    return [
        sys.executable, "-m", "workers.api", "-A", module,
        "--host", settings.api_host, "--port", str(settings.api_port),
    ]  # fmt: skip


def api_url(settings: Settings) -> str:
    return f"http://{settings.api_host}:{settings.api_port}/"


def wait_for_api(
    settings: Settings, process: subprocess.Popen[bytes] | None = None, timeout: float = 60.0
) -> None:
    """Block until the HTTP API serves its OpenAPI document; TimeoutError saying where it was not.

    With its ``process``, an API that exited (its port taken, say) is reported at once, rather
    than after the timeout, or never when something else answers on that port.
    """

    def exited() -> None:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the HTTP API exited with code {process.returncode}; if its port is taken, set "
                f"POSTROOM_API_PORT (now {settings.api_port}) or pass --no-api"
            )

    url = api_url(settings)
    _wait_for_http(url + "openapi.json", "the HTTP API", url, timeout, check=exited)


def metrics_argv(settings: Settings, module: str = DEFAULT_APP) -> list[str]:
    """The Prometheus exporter (workers/metrics.py) of ``module``'s app, at ``settings``' address."""
    return [
        sys.executable, "-m", "workers.metrics", "-A", module,
        "--host", settings.metrics_address, "--port", str(settings.metrics_port),
    ]  # fmt: skip


def metrics_url(settings: Settings) -> str:
    return f"http://{settings.metrics_address}:{settings.metrics_port}/metrics"


def wait_for_metrics(settings: Settings, timeout: float = 60.0) -> None:
    """Block until the exporter answers a scrape; TimeoutError saying where it did not."""
    url = metrics_url(settings)
    _wait_for_http(url, "the metrics exporter", url, timeout, request_timeout=5.0)


def _wait_for_http(
    url: str,
    what: str,
    where: str,
    timeout: float,
    *,
    any_status: bool = False,
    check: Callable[[], None] | None = None,
    request_timeout: float = 2.0,
) -> None:
    """Poll ``url`` until it answers (with any HTTP status if ``any_status``), calling ``check``
    before each try; TimeoutError naming ``what`` and ``where`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        try:
            with urllib.request.urlopen(url, timeout=request_timeout):
                return
        except urllib.error.HTTPError:
            if any_status:
                return
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer at {where} in {timeout}s") from None
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
