"""A real HTTP receiver of callbacks, for the tests of `postroom api`'s callbacks (test_webhooks.py,
test_orders.py): an ``http.server`` in a thread of the test's process, on a free port the
allow-list (``SETTINGS``) names. Each path's second segment says how it answers: ``ok`` 200,
``flaky`` 500 twice then 200, ``down`` always 500, ``moved`` a redirect to ``ok``, ``slow`` its
first request after the callback timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PORT = _free_port()
SECRET = "receiver-shared-secret"
ALLOWED = f"http://127.0.0.1:{PORT}/hooks/"
TIMEOUT, SLOW = 2.0, 3.0  # seconds: the callback timeout, and how late ``slow`` answers first
#: what a test module's SETTINGS need for callbacks to this receiver
SETTINGS = {
    "callback_allow": ALLOWED,
    "callback_secret": SECRET,
    "callback_timeout": str(TIMEOUT),
    # the sweep sends what a killed worker committed after a second (see test_outbox.py)
    "outbox_grace": "1",
    "outbox_sweep": "0.5",
}
#: what a request the receiver answered too late was answered with, as the sender saw it
TIMED_OUT = 0


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(self.body)["reply"]
        return reply


class Receiver(ThreadingHTTPServer):
    """Records every POST; answers by the path's second segment (ok, flaky, down)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", PORT), _Handler)
        self.lock = threading.Lock()
        self.requests: list[Received] = []

    def answer(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, float]:
        """The status to answer and how long to wait first."""
        with self.lock:
            earlier = sum(r.path == path for r in self.requests)
            kind = path.split("/")[2]
            code = {"ok": 200, "flaky": 500 if earlier < 2 else 200, "down": 500, "moved": 302}
            late = kind == "slow" and not earlier
            answered = TIMED_OUT if late else code.get(kind, 200)
            self.requests.append(Received(path, headers, body, answered))
            return (200 if late else answered), (SLOW if late else 0.0)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A late answer to a sender that timed out cannot be sent: expected, not logged."""

    def to(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        code, wait = self.server.answer(
            self.path, body, {k.lower(): v for k, v in self.headers.items()}
        )
        time.sleep(wait)
        self.send_response(code)
        if code == 302:
            self.send_header("Location", self.path.replace("/moved/", "/ok/"))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what was received, not a log."""


def verified(received: Received) -> dict[str, Any]:
    """The reply, once its signature checks out as a receiver checks it (see the README)."""
    timestamp = received.headers["postroom-timestamp"]
    expected = hmac.new(
        SECRET.encode(), timestamp.encode() + b"." + received.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(expected, received.headers["postroom-signature"])
    assert abs(time.time() - int(timestamp)) < 120
    return received.reply


def path_to(kind: str) -> str:
    return f"/hooks/{kind}/{uuid.uuid4().hex[:8]}"
