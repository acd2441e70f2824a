"""The vendor management service of seed 004: "the liaison" with the stores that prepare orders.

``NotifyVendor`` tells a vendor about a paid order; the vendor confirms it (``ConfirmOrder``, in
life a button in the vendor's app) and the service announces ``VendorConfirmed``. The vendors
here are simulated, so a demo and the tests show every path of the fulfilment process: each
confirms after its own delay, which the broker holds (``ctx.send(..., delay=...)``), or never.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from postroom import Command, Event, HandlerContext, Query, Rejected, handles
from tasks.state import client, key

SERVICE = "vendors"

#: seconds each simulated vendor takes to confirm an order it is told about; None: it never does
VENDORS: dict[str, float | None] = {
    "greengrocer": 0.0,  # confirms at once
    "bakery": 2.0,
    "slow_deli": 16.0,  # later than the deadline the demo's and the tests' orders give
    "night_market": None,  # never answers
}


class NotifyVendor(Command):
    order_id: uuid.UUID
    vendor: str


class ConfirmOrder(Command):
    """The vendor accepts an order it was told about."""

    order_id: uuid.UUID
    vendor: str


class VendorConfirmed(Event):
    order_id: uuid.UUID
    vendor: str
    confirmed_at: datetime


class GetVendorOrder(Query):
    order_id: uuid.UUID


@handles(NotifyVendor, service=SERVICE)
def notify_vendor(cmd: NotifyVendor, ctx: HandlerContext) -> None:
    if cmd.vendor not in VENDORS:
        raise Rejected(f"no vendor named {cmd.vendor!r}; the vendors are {', '.join(VENDORS)}")
    ctx.transaction().hincrby(key(SERVICE, "order", str(cmd.order_id)), "notified", 1)
    after = VENDORS[cmd.vendor]
    if after is not None:  # the vendor's own confirmation, on its own time
        ctx.send(ConfirmOrder(order_id=cmd.order_id, vendor=cmd.vendor), delay=after or None)


@handles(ConfirmOrder, service=SERVICE)
def confirm_order(cmd: ConfirmOrder, ctx: HandlerContext) -> None:
    ctx.transaction().hincrby(key(SERVICE, "order", str(cmd.order_id)), "confirmed", 1)
    ctx.publish(
        VendorConfirmed(order_id=cmd.order_id, vendor=cmd.vendor, confirmed_at=datetime.now(UTC))
    )


@handles(GetVendorOrder, service=SERVICE)
def get_vendor_order(query: GetVendorOrder, ctx: HandlerContext) -> dict[str, int]:
    """How many times the vendor was told about an order, and confirmed it."""
    found = client().hgetall(key(SERVICE, "order", str(query.order_id)))
    return {"notified": int(found.get("notified", 0)), "confirmed": int(found.get("confirmed", 0))}
