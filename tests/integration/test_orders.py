"""Seed 004's marketplace with real workers, on Redis and on RabbitMQ: 500 orders through the
orders, payments and vendors pools and the fulfilment process manager, two fulfilment workers
sharing its instances and timeouts, one of them killed with ``kill -9`` mid-flow; and orders
placed over HTTP whose replies a real receiver gets once each, signed.

The vendors are the simulated ones of tasks/vendors.py: the greengrocer confirms at once, the
bakery after 2 s, the slow deli after 16 s (past the 10 s each order here gives its vendor), the
night market never. So greengrocer and bakery orders complete, unless the machine is too busy to
bring the confirmation in time; night market and slow deli orders are cancelled and refunded,
the slow deli's confirmation arriving after that and ignored.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from config.pools import Pool, pool_named
from postroom import MessageBus
from postroom.instances import Instance
from postroom.reliability import reliability
from tasks.orders import PlaceOrder, orders
from tasks.state import database
from tests.integration import receiver as callbacks
from tests.integration.receiver import ALLOWED, PORT, Receiver, path_to, verified
from tests.integration.test_api import ApiServer
from tests.support import BrokerContext, WorkerProcess, wait_for
from workers.launcher import wait_until_ready

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

SETTINGS = {
    **callbacks.SETTINGS,  # the receiver's allow-list and secret; a killed worker's outbox swept at 1 s
    # on Redis a killed worker's messages come back after this, not after the default 30 s
    "visibility_timeout": "3",
    "restore_interval": "1",
}
CONFIRM_WITHIN = 10.0  # seconds each order gives its vendor
ORDERS = 500
#: the vendor of the n-th order, by n % 20: confirms most, ignores some, confirms some late
MIX = ["greengrocer"] * 12 + ["bakery"] * 3 + ["night_market"] * 3 + ["slow_deli"] * 2
FULFILMENT = ("events.fulfilment", "commands.fulfilment")


@dataclass
class Marketplace:
    broker: BrokerContext
    fulfilment: list[WorkerProcess]
    bus: MessageBus


@pytest.fixture(scope="module")
def market(broker: BrokerContext) -> Iterator[Marketplace]:
    """The four services' pools and the webhooks pool, started together; two fulfilment workers."""
    pools = [
        pool_named("orders"),
        Pool("payments", ("commands.payments",), concurrency=1),
        Pool("vendors", ("commands.vendors",), concurrency=1),
        Pool("webhooks", ("commands.webhooks",), concurrency=1),
        Pool("fulfilment-a", FULFILMENT, concurrency=1),
        Pool("fulfilment-b", FULFILMENT, concurrency=1),
    ]
    started = [broker.spawn_worker(pool) for pool in pools]
    wait_until_ready(broker.app, pools, timeout=120)
    yield Marketplace(broker, started[-2:], MessageBus(broker.app, source="tests"))
    for worker in broker.workers:
        assert "Traceback" not in worker.output(), worker.output()


@dataclass(frozen=True)
class Ending:
    """How one order ended, as each service and its process instance recorded it."""

    vendor: str
    status: str
    instance: Instance | None
    payment: dict[str, str]
    vendor_side: dict[str, str]

    def results(self) -> list[str]:
        return [] if self.instance is None else [s["result"] for s in self.instance.steps]

    def handled(self, message_type: str) -> int:
        steps = self.instance.steps if self.instance else ()
        return sum(s["message_type"] == message_type for s in steps)


def _endings(broker: BrokerContext, customer: str) -> dict[str, Ending]:
    store = database(broker.settings)
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(orders.c.order_id, orders.c.vendor, orders.c.status).where(
                orders.c.customer == customer
            )
        ).all()
    instances = {
        i.key: i
        for running in (True, False)
        for i in store.instances("fulfilment", running=running, limit=10 * ORDERS)
    }
    state = broker.state()
    with state.pipeline(transaction=False) as pipe:
        for row in rows:
            pipe.hgetall(broker.key("payments", "order", str(row.order_id)))
            pipe.hgetall(broker.key("vendors", "order", str(row.order_id)))
        found = pipe.execute()
    return {
        str(row.order_id): Ending(
            row.vendor,
            row.status,
            instances.get(str(row.order_id)),
            found[2 * n],
            found[2 * n + 1],
        )
        for n, row in enumerate(rows)
    }


def _settled(broker: BrokerContext, customer: str, count: int) -> bool:
    """Every order ended, every timeout fired, every late confirmation arrived."""
    endings = _endings(broker, customer)
    return len(endings) == count and all(
        e.status in {"completed", "cancelled"}
        and e.instance is not None
        and e.instance.ended
        and e.handled("fulfilment.VendorSilent") == 1
        and (e.vendor != "slow_deli" or e.handled("vendors.VendorConfirmed") == 1)
        for e in endings.values()
    )


def test_five_hundred_orders_each_end_once_completed_or_compensated_through_a_kill(
    market: Marketplace,
) -> None:
    """Orders arrive at 20 a second. Whichever of the vendor's confirmation and the timeout
    reaches an order's instance first decides how it ends, and the other is ignored: on a busy
    machine a prompt vendor's confirmation may lose to the timeout, and the order is then
    compensated as the flow says, never both. The night market never confirms, so its orders
    are always compensated."""
    broker = market.broker
    started = time.monotonic()
    placed = [
        PlaceOrder(
            customer="bulk",
            vendor=MIX[n % len(MIX)],
            amount_cents=100 + n,
            confirm_within=CONFIRM_WITHIN,
        )
        for n in range(ORDERS)
    ]
    at_kill = 0
    for n in range(0, ORDERS, 10):
        market.bus.send_many(placed[n : n + 10])
        if n == ORDERS // 2:  # mid-flow: the replacement joins the survivor
            market.fulfilment[0].kill_9()
            at_kill = _started(broker)
            broker.spawn_worker(Pool("fulfilment-c", FULFILMENT, concurrency=1))
        time.sleep(0.5)
    wait_for(lambda: _settled(broker, "bulk", ORDERS), timeout=180, interval=1)
    took = time.monotonic() - started
    time.sleep(2)  # a doubled message would show within this

    endings = _endings(broker, "bulk")
    assert len(endings) == ORDERS
    assert 0 < at_kill < ORDERS, at_kill
    for order_id, e in endings.items():
        assert e.instance is not None
        completed = e.instance.status == "completed"
        # exactly one of completed / compensated, the rest of its messages ignored
        assert e.status == ("completed" if completed else "cancelled"), order_id
        assert [r for r in e.results() if not r.startswith("ignored")] == [
            "started",
            e.instance.status,
        ], e.results()
        # the first of the confirmation and the timeout decided; the timeout fired once,
        # whichever of the workers held it
        [decisive] = [s for s in e.instance.steps if s["result"] == e.instance.status]
        assert decisive["message_type"] == (
            "vendors.VendorConfirmed" if completed else "fulfilment.VendorSilent"
        )
        assert e.handled("fulfilment.VendorSilent") == 1, e.results()
        assert e.handled("vendors.VendorConfirmed") == int(e.vendor != "night_market")
        # each command took effect once: charged, told, refunded only if compensated
        assert (e.payment["charges"], e.payment.get("refunds", "0")) == (
            "1",
            "0" if completed else "1",
        ), order_id
        assert e.vendor_side.get("notified") == "1", order_id
        confirmed = "0" if e.vendor == "night_market" else "1"
        assert e.vendor_side.get("confirmed", "0") == confirmed, order_id
    assert reliability(broker.app).dead_letters.ids() == []
    ends = Counter((e.vendor, e.instance.status) for e in endings.values() if e.instance)
    assert ends[("night_market", "compensated")] == ORDERS * MIX.count("night_market") // len(MIX)
    print(f"{ORDERS} orders settled in {took:.1f}s; {at_kill} instances had started at the kill")
    print(f"how they ended, by vendor: {dict(sorted(ends.items()))}")


def _started(broker: BrokerContext) -> int:
    store = database(broker.settings)
    return sum(
        len(store.instances("fulfilment", running=running, limit=10 * ORDERS))
        for running in (True, False)
    )


@pytest.fixture(scope="module")
def api(market: Marketplace, receiver: Receiver) -> Iterator[httpx.Client]:
    server = ApiServer(market.broker, "orders", reply_wait="20")
    try:
        server.wait_until_serving()
        yield server.http
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()


def test_orders_placed_over_http_call_back_once_each_signed_and_complete(
    api: httpx.Client, receiver: Receiver, market: Marketplace
) -> None:
    paths = [path_to("ok") for _ in range(10)]
    responses = [
        api.post(
            "/orders",
            json={"customer": "web", "vendor": "greengrocer", "amount_cents": 990},
            headers={"Postroom-Callback-Url": f"http://127.0.0.1:{PORT}{path}"},
        )
        for path in paths
    ]
    assert [r.status_code for r in responses] == [201] * len(paths), responses[0].text
    wait_for(lambda: all(receiver.to(path) for path in paths), timeout=60)
    time.sleep(2)  # a second POST of a reply would come within this
    for path, response in zip(paths, responses, strict=True):
        [received] = receiver.to(path)
        reply = verified(received)
        placed = response.json()
        assert (reply["status"], reply["value"]) == ("succeeded", placed)
        assert response.headers["Location"] == f"/orders/{placed['order_id']}"
    order_id = responses[0].json()["order_id"]
    wait_for(lambda: api.get(f"/orders/{order_id}").json()["status"] == "completed", timeout=60)
    order: dict[str, Any] = api.get(f"/orders/{order_id}").json()
    assert (order["vendor"], order["amount_cents"], order["reason"]) == ("greengrocer", 990, None)


def test_an_order_with_a_callback_off_the_allow_list_is_refused_and_never_placed(
    api: httpx.Client, market: Marketplace
) -> None:
    before = _count(market.broker, "refused")
    response = api.post(
        "/orders",
        json={"customer": "refused", "vendor": "greengrocer", "amount_cents": 990},
        headers={"Postroom-Callback-Url": f"http://127.0.0.1:{PORT}/elsewhere/{uuid.uuid4()}"},
    )
    assert response.status_code == 422
    assert ALLOWED in response.json()["detail"]
    time.sleep(1)
    assert _count(market.broker, "refused") == before == 0
    assert api.get(f"/orders/{uuid.uuid4()}").status_code == 404


def _count(broker: BrokerContext, customer: str) -> int:
    store = database(broker.settings)
    with store.engine.connect() as conn:
        found = select(func.count()).select_from(orders).where(orders.c.customer == customer)
        return int(conn.scalar(found) or 0)
