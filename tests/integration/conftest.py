"""Fixtures shared by the modules that send probe commands whose events fan out to POOLS."""

from __future__ import annotations

import pytest

from config.pools import Pool
from postroom import MessageBus
from tests.integration.services import POOLS
from tests.support import BrokerContext


@pytest.fixture(scope="module")
def pools(request: pytest.FixtureRequest, broker: BrokerContext) -> dict[str, Pool]:
    """The probe service (``PROBE_CONCURRENCY`` processes, a module attribute, default 1) and one
    single-process pool per subscriber in POOLS, each on its own events queue."""
    concurrency = getattr(request.module, "PROBE_CONCURRENCY", 1)
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=concurrency))
    started = {name: Pool(name, ("events." + name,), concurrency=1) for name in POOLS}
    for pool in started.values():
        broker.start_worker(pool)
    return started


@pytest.fixture
def bus(broker: BrokerContext, pools: dict[str, Pool]) -> MessageBus:
    return MessageBus(broker.app, source="tests")
