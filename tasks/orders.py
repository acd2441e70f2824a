"""The order management service of seed 004, "the conductor": it takes an order, has it paid, and
records how it ends. The fulfilment process (tasks/fulfilment.py) does the conducting across the
vendors and payments services; this service owns the order itself.

```
 PlaceOrder ─> orders ── ChargePayment, reply_to ──> payments
                 ▲                                      │
                 └──── ChargePayment's reply ◄──────────┘   (a message to @on_reply: nobody waits)
                 │ paid: OrderPaid ─> fulfilment (its process manager)
 CompleteOrder / CancelOrder <── fulfilment
```

Its orders live in PostgreSQL (tasks/migrations), written with the inbox mark and the messages
each handling sends, so an order is placed, paid and ended once however often a message is
delivered. The order remembers the ID of the ChargePayment it sent (its reply's correlation ID),
which is how the reply finds it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from sqlalchemy import Column, DateTime, Float, Integer, MetaData, String, Table, Text, Uuid, select
from sqlalchemy.dialects.postgresql import insert

from postroom import (
    Command,
    Event,
    HandlerContext,
    Query,
    Rejected,
    Reply,
    handles,
    on_reply,
)
from tasks.payments import ChargePayment
from tasks.state import database

SERVICE = "orders"
#: order IDs derive from PlaceOrder's message ID, so a redelivered order finds its own row
_ORDER_IDS = uuid.UUID("9b2e4c71-0f3d-4a86-b5e2-7d1c6a8f3e09")

#: as tasks/migrations/orders_0001.py creates it (in POSTROOM_DATABASE_SCHEMA)
metadata = MetaData()
orders = Table(
    "orders",
    metadata,
    Column("order_id", Uuid, primary_key=True),
    Column("customer", String(200), nullable=False),
    Column("vendor", String(100), nullable=False),
    Column("amount_cents", Integer, nullable=False),
    Column("confirm_within", Float, nullable=False),
    # placed -> paid -> completed | cancelled, or placed -> declined
    Column("status", String(20), nullable=False),
    Column("payment_request", String(64), nullable=False, unique=True),
    Column("payment_id", Uuid),
    Column("reason", Text),
    Column("placed_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


class PlaceOrder(Command):
    customer: str = Field(min_length=1, max_length=200)
    vendor: str = Field(min_length=1, max_length=100)
    amount_cents: int = Field(gt=0)
    #: seconds the vendor has to confirm, once the order is paid, before it is cancelled
    confirm_within: float = Field(default=30.0, gt=0, le=86400)


class CompleteOrder(Command):
    order_id: uuid.UUID


class CancelOrder(Command):
    order_id: uuid.UUID
    reason: str


class GetOrder(Query):
    order_id: uuid.UUID


class OrderPaid(Event):
    order_id: uuid.UUID
    vendor: str
    amount_cents: int
    payment_id: uuid.UUID
    confirm_within: float


class OrderCompleted(Event):
    order_id: uuid.UUID


class OrderCancelled(Event):
    order_id: uuid.UUID
    reason: str


@handles(PlaceOrder, service=SERVICE)
def place_order(cmd: PlaceOrder, ctx: HandlerContext) -> dict[str, str]:
    """Record the order and ask for its payment; the reply says it is placed, not yet paid."""
    order_id = uuid.uuid5(_ORDER_IDS, ctx.message_id)
    request = ctx.send(
        ChargePayment(order_id=order_id, amount_cents=cmd.amount_cents), reply_to=True
    )
    now = datetime.now(UTC)
    row = {**cmd.payload(), "order_id": order_id, "status": "placed", "payment_request": request}
    ctx.transaction().execute(
        insert(orders).values(**row, placed_at=now, updated_at=now).on_conflict_do_nothing()
    )
    return {"order_id": str(order_id), "status": "placed"}


@on_reply(ChargePayment, pool=SERVICE)
def payment_answered(reply: Reply, ctx: HandlerContext) -> None:
    """The payments service's answer: paid (announced, for fulfilment) or declined."""
    session = ctx.transaction()
    order = _locked(session, orders.c.payment_request == ctx.correlation_id)
    if order["status"] != "placed":
        return  # answered already
    if not reply.ok:
        reason = reply.error.message if reply.error else reply.status
        _update(session, order, status="declined", reason=f"payment {reply.status}: {reason}")
        return
    payment_id = uuid.UUID(reply.value["payment_id"])
    _update(session, order, status="paid", payment_id=payment_id)
    ctx.publish(
        OrderPaid(
            order_id=order["order_id"],
            vendor=order["vendor"],
            amount_cents=order["amount_cents"],
            payment_id=payment_id,
            confirm_within=order["confirm_within"],
        )
    )


@handles(CompleteOrder, service=SERVICE)
def complete_order(cmd: CompleteOrder, ctx: HandlerContext) -> dict[str, str]:
    session = ctx.transaction()
    order = _locked(session, orders.c.order_id == cmd.order_id)
    if order["status"] == "paid":
        _update(session, order, status="completed")
        ctx.publish(OrderCompleted(order_id=cmd.order_id))
    elif order["status"] != "completed":
        raise Rejected(f"order {cmd.order_id} is {order['status']}: only a paid order completes")
    return {"order_id": str(cmd.order_id), "status": "completed"}


@handles(CancelOrder, service=SERVICE)
def cancel_order(cmd: CancelOrder, ctx: HandlerContext) -> dict[str, str]:
    session = ctx.transaction()
    order = _locked(session, orders.c.order_id == cmd.order_id)
    if order["status"] in {"placed", "paid"}:
        _update(session, order, status="cancelled", reason=cmd.reason)
        ctx.publish(OrderCancelled(order_id=cmd.order_id, reason=cmd.reason))
    elif order["status"] != "cancelled":
        raise Rejected(f"order {cmd.order_id} is {order['status']}: it can no longer be cancelled")
    return {"order_id": str(cmd.order_id), "status": "cancelled"}


@handles(GetOrder, service=SERVICE)
def get_order(query: GetOrder, ctx: HandlerContext) -> dict[str, Any]:
    """A query changes nothing: it reads on a connection of its own."""
    with database().engine.connect() as conn:
        found = conn.execute(select(orders).filter_by(order_id=query.order_id)).mappings().first()
    if found is None:
        raise Rejected(f"order {query.order_id} does not exist")
    order = {k: v for k, v in found.items() if k != "payment_request"}
    for name in ("order_id", "payment_id"):
        order[name] = None if order[name] is None else str(order[name])
    for name in ("placed_at", "updated_at"):
        order[name] = order[name].astimezone(UTC).isoformat()
    return order


def _locked(session: Any, where: Any) -> dict[str, Any]:
    """The order, its row locked until the handling commits: two messages of one order (a
    completion and a cancellation, say) take turns rather than both reading its old status."""
    found = session.execute(select(orders).where(where).with_for_update()).mappings().first()
    if found is None:  # nothing of postroom's sends these before the order's row has committed
        raise Rejected("no such order: the message does not belong to an order placed here")
    return dict(found)


def _update(session: Any, order: dict[str, Any], **values: Any) -> None:
    session.execute(
        orders.update()
        .where(orders.c.order_id == order["order_id"])
        .values(**values, updated_at=datetime.now(UTC))
    )
