"""Fixtures shared by the modules that send probe commands whose events fan out to POOLS, and by
the modules that receive callbacks."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from config.pools import Pool
from postroom import MessageBus
from tests.integration.receiver import Receiver
from tests.integration.services import POOLS
from tests.support import BrokerContext


@pytest.fixture(scope="module")
def pools(request: pytest.FixtureRequest, broker: BrokerContext) -> dict[str, Pool]:
    """The probe service (``PROBE_CONCURRENCY`` processes, a module attribute, default 1) and one
    single-process pool per subscriber in POOLS, each on its own events queue."""
    concurrency = getattr(request.module, "PROBE_CONCURRENCY", 1)
    started = {name: Pool(name, ("events." + name,), concurrency=1) for name in POOLS}
    broker.start_workers(
        Pool("probe", ("commands.probe",), concurrency=concurrency), *started.values()
    )
    return started


@pytest.fixture
def bus(broker: BrokerContext, pools: dict[str, Pool]) -> MessageBus:
    return MessageBus(broker.app, source="tests")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """A real HTTP receiver of callbacks (tests/integration/receiver.py), serving in a thread."""
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
