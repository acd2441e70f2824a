from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import BROKERS, BrokerContext, broker_context


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session", autouse=True)
def _brokers_answer(request: pytest.FixtureRequest) -> None:
    """A broker test on a machine without brokers fails at once, saying what to start."""
    if not any(item.get_closest_marker("broker") for item in request.session.items):
        return
    for name, port in (("Redis", 6379), ("RabbitMQ", 5672)):
        if not _answers(port):
            pytest.fail(f"{name} does not answer on 127.0.0.1:{port}: start it (see .ci/run)")


@pytest.fixture(scope="module", params=BROKERS)
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerContext]:
    """An isolated context on each broker in turn; the module's workers are started from it."""
    workdir: Path = tmp_path_factory.mktemp(f"{request.module.__name__}-{request.param}")
    overrides = getattr(request.module, "SETTINGS", {})
    ctx = broker_context(request.param, workdir, **overrides)
    yield ctx
    ctx.close()
