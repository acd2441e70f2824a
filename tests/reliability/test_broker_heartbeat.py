"""A RabbitMQ node that goes silent without closing its sockets (cut off by the network, a frozen
VM) is given up after POSTROOM_BROKER_HEARTBEAT seconds, by a worker and by a sender, which go on
with the next `;`-separated broker URL. Before, a publish waiting for its confirm blocked for as
long as the operating system kept the socket open: a sender's `bus.send`, and a worker's whole
event loop (its heartbeat events are published with confirms too), so its AMQP heartbeats never
ran and it handled nothing more."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.celery import create_app
from config.pools import Pool
from config.settings import Settings
from postroom import MessageBus
from postroom.topology import command_queue_name
from tests.integration.services import SERVICE, Echo
from tests.support import broker_context

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
POOL = Pool("probe", (command_queue_name(SERVICE),), concurrency=1)
RABBITMQ = ("127.0.0.1", 5672)


class SilentLink:
    """A TCP relay to RabbitMQ that can go silent: once ``silence()`` is called it forwards
    nothing more, either way, and answers no new connection, yet closes no socket, as a network
    cut does."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._silent = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self._silent.set()

    def close(self) -> None:
        self._closed.set()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            if self._silent.is_set():
                continue  # accepted and left unanswered
            upstream = socket.create_connection(RABBITMQ)
            self._sockets.append(upstream)
            self.connections += 1
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        while not self._silent.is_set() and not self._closed.is_set():
            try:
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for sock in ready:
                    if self._silent.is_set():
                        return
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
            except OSError:
                return


@pytest.fixture
def link() -> Iterator[SilentLink]:
    relay = SilentLink()
    yield relay
    relay.close()


def test_a_worker_leaves_a_silent_broker_node_for_the_next_url_within_its_heartbeat(
    link: SilentLink, tmp_path: Path
) -> None:
    context = broker_context("rabbitmq", tmp_path, broker_heartbeat="2")
    direct = context.settings.broker_url
    context.env["POSTROOM_BROKER_URL"] = (
        f"amqp://guest:guest@127.0.0.1:{link.port}/{context.vhost};{direct}"
    )
    bus = MessageBus(context.app, source="tests")  # the test itself sends straight to the node
    try:
        context.start_worker(POOL)
        assert link.connections > 0  # the worker reached the broker through the relay
        assert bus.send(Echo(text="before")).reply(timeout=30).status == "succeeded"

        link.silence()
        reply = bus.send(Echo(text="after")).reply(timeout=40)
        assert reply.status == "succeeded"
        assert reply.value["text"] == "after"
    finally:
        context.close()


def test_a_send_to_a_silent_broker_node_goes_to_the_next_url_within_its_heartbeat(
    link: SilentLink, tmp_path: Path
) -> None:
    context = broker_context("rabbitmq", tmp_path, broker_heartbeat="2")
    direct = context.settings.broker_url
    env = {
        **context.env,
        "POSTROOM_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{link.port}/{context.vhost};{direct}",
    }
    sender = create_app(Settings.from_env(env))
    bus = MessageBus(sender, source="tests")
    try:
        context.start_worker(POOL)  # on the direct URL
        assert bus.send(Echo(text="before")).reply(timeout=30).status == "succeeded"
        assert link.connections > 0  # that send went through the relay

        link.silence()
        started = time.monotonic()
        reply = bus.send(Echo(text="after")).reply(timeout=40)
        assert reply.status == "succeeded"
        assert time.monotonic() - started < 30
    finally:
        sender.close()
        context.close()
