"""The fulfilment process: seed 004's conductor across services, and its plan for failure.

Once an order is paid, the vendor is told; the process waits for the vendor's confirmation, and
if none comes within the order's ``confirm_within`` seconds it cancels the order and refunds the
payment. Each order is one instance of the process manager, keyed by its ID, whose state lives in
PostgreSQL with the orders (config/celery.py) and commits with every message it sends:

```
 OrderPaid ──> start: NotifyVendor ──> vendors        schedule VendorSilent (held by the broker)
 VendorConfirmed ──> CompleteOrder ──> orders         end: completed (VendorSilent is ignored)
 VendorSilent ──> CancelOrder ──> orders,
                  RefundPayment ──> payments          end: compensated (a late confirmation is
                                                                         ignored, and recorded)
```

``postroom processes fulfilment`` lists the running instances; ``postroom trace --process
fulfilment ORDER_ID`` prints one's steps.
"""

from __future__ import annotations

import uuid

from pydantic import BaseModel

from postroom import Command, ProcessContext, ProcessManager
from tasks.orders import CancelOrder, CompleteOrder, OrderPaid
from tasks.payments import RefundPayment
from tasks.vendors import NotifyVendor, VendorConfirmed

POOL = "fulfilment"


class Fulfilment(BaseModel):
    """What an order's instance remembers between its messages."""

    order_id: uuid.UUID
    vendor: str
    payment_id: uuid.UUID
    amount_cents: int
    confirm_within: float


class VendorSilent(Command):
    """The process's own timeout: the vendor did not confirm in time."""

    order_id: uuid.UUID


fulfilment = ProcessManager(POOL, state=Fulfilment)


@fulfilment.starts(OrderPaid, key="order_id")
def order_paid(event: OrderPaid, ctx: ProcessContext[Fulfilment]) -> None:
    ctx.state = Fulfilment(
        order_id=event.order_id,
        vendor=event.vendor,
        payment_id=event.payment_id,
        amount_cents=event.amount_cents,
        confirm_within=event.confirm_within,
    )
    ctx.send(NotifyVendor(order_id=event.order_id, vendor=event.vendor))
    ctx.schedule(VendorSilent(order_id=event.order_id), delay=event.confirm_within)


@fulfilment.handles(VendorConfirmed, key="order_id")
def vendor_confirmed(event: VendorConfirmed, ctx: ProcessContext[Fulfilment]) -> None:
    ctx.send(CompleteOrder(order_id=event.order_id))
    ctx.end("completed")


@fulfilment.handles(VendorSilent)
def vendor_silent(timeout: VendorSilent, ctx: ProcessContext[Fulfilment]) -> None:
    state = ctx.state
    assert state is not None  # set when the instance started
    reason = f"vendor {state.vendor} did not confirm within {state.confirm_within:g} s"
    ctx.send(CancelOrder(order_id=state.order_id, reason=reason))
    ctx.send(
        RefundPayment(
            order_id=state.order_id, payment_id=state.payment_id, amount_cents=state.amount_cents
        )
    )
    ctx.end("compensated")
