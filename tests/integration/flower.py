"""``postroom flower`` run as a user runs it, for the tests that read what Flower shows."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

from tests.support import ROOT, BrokerContext, wait_for

AUTH = "watcher:correct-horse"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Flower:
    """``postroom flower`` on the module's broker context, behind basic auth."""

    def __init__(self, broker: BrokerContext) -> None:
        self.port = free_port()
        self.log = broker.workdir / "flower.log"
        env = dict(broker.env, POSTROOM_FLOWER_PORT=str(self.port), POSTROOM_FLOWER_BASIC_AUTH=AUTH)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "flower"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, *, auth: str | None = AUTH) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.read().decode())

    def api(self, path: str) -> Any:
        return json.loads(self.get(path))

    def answers(self) -> bool:
        assert self.proc.poll() is None, self.output()
        try:
            self.get("/healthcheck", auth=None)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def running_flower(broker: BrokerContext) -> Iterator[Flower]:
    """A module fixture's body: Flower started and answering before anything is sent (so it sees
    every task event), stopped after the module."""
    running = Flower(broker)
    try:
        wait_for(running.answers, timeout=60, interval=0.3)
        yield running
    finally:
        running.stop()
