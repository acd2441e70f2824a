"""The seeds' flows, run against live pools: one command, its reply, and three independent
reactions; then seed 004's orders, one fulfilled and one compensated by the fulfilment process."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable

from postroom import MessageBus, Query, Reply
from postroom.telemetry import bold
from tasks.analytics import GetAssetStats
from tasks.assets import BindDevice, GetAsset, RegisterAsset
from tasks.notifications import ListNotifications
from tasks.orders import GetOrder, PlaceOrder
from tasks.payments import GetPayment
from tasks.search import SearchAssets


def _say(line: str) -> None:
    """A line of the demo's own: prefixed, and bold on a terminal, to stand out among the pools'."""
    print(bold(f"demo | {line}", sys.stdout), flush=True)


def _until(ask: Callable[[], Reply], done: Callable[[Reply], bool], timeout: float = 30.0) -> Reply:
    """Ask again until a read model has caught up: events are handled asynchronously, by design."""
    deadline = time.monotonic() + timeout
    reply = ask()
    while not done(reply) and time.monotonic() < deadline:
        time.sleep(0.2)
        reply = ask()
    return reply


def run(bus: MessageBus, name: str = "Truck 12") -> None:
    def ask(query: Query) -> Reply:
        return bus.ask(query, timeout=30)

    pending = bus.send(
        RegisterAsset(name=name, description="Demo asset", attributes={"fleet": "north"})
    )
    _say(f"-> RegisterAsset({name!r}) sent, correlation_id={pending.correlation_id}")
    reply = pending.reply(timeout=30)
    _say(f"<- reply: {reply.status} {reply.value}")
    asset_id = reply.value["asset_id"]

    bound = bus.send(BindDevice(asset_id=asset_id, device_id=uuid.uuid4())).reply(timeout=30)
    _say(f"-> BindDevice(asset {asset_id}) <- {bound.status}")
    refused = bus.send(BindDevice(asset_id=uuid.uuid4(), device_id=uuid.uuid4())).reply(timeout=30)
    _say(
        f"-> BindDevice(unknown asset) <- {refused.status}: {refused.error and refused.error.message}"
    )
    _say(f"?> GetAsset <- {ask(GetAsset(asset_id=asset_id)).value}")

    _say("Three pools reacted to AssetRegistered / DeviceBound, each on its own copy:")
    found = _until(
        lambda: ask(SearchAssets(text=name)),
        lambda r: any(a["asset_id"] == asset_id for a in r.value or []),
    )
    _say(f"   search        SearchAssets({name!r}) <- {len(found.value or [])} match(es)")
    stats = _until(lambda: ask(GetAssetStats()), lambda r: r.ok and r.value["devices_bound"] > 0)
    _say(f"   analytics     GetAssetStats() <- {stats.value}")
    notes = _until(
        lambda: ask(ListNotifications(asset_id=asset_id)), lambda r: len(r.value or []) >= 2
    )
    for note in notes.value or []:
        _say(f"   notifications {note['text']} (correlation_id={note['correlation_id']})")
    orders(bus)


def orders(bus: MessageBus) -> None:
    """Two orders: the greengrocer confirms at once, the night market never does, so after the
    3 s it was given the fulfilment process cancels that order and refunds its payment."""
    placed = {
        vendor: bus.send(
            PlaceOrder(customer="ada", vendor=vendor, amount_cents=1250, confirm_within=within)
        ).reply(timeout=30)
        for vendor, within in (("greengrocer", 30), ("night_market", 3))
    }
    for vendor, reply in placed.items():
        _say(f"-> PlaceOrder(vendor {vendor!r}) <- {reply.status} {reply.value}")
    _say("The fulfilment process waits for each vendor's confirmation (30 s and 3 s at most):")
    for vendor, reply in placed.items():
        order_id = reply.value["order_id"]
        order = _until(
            lambda order_id=order_id: bus.ask(GetOrder(order_id=order_id), timeout=30),
            lambda r: r.ok and r.value["status"] in {"completed", "cancelled", "declined"},
        ).value
        payment = bus.ask(GetPayment(order_id=order_id), timeout=30).value
        why = f" ({order['reason']})" if order["reason"] else ""
        _say(
            f"   {vendor:13} order {order_id}: {order['status']}{why}; "
            f"charged {payment['charges']}x, refunded {payment['refunds']}x"
        )
    _say("   each order's steps: postroom trace --process fulfilment ORDER_ID")
