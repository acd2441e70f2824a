"""The payments service of seed 004's marketplace: it charges an order and refunds it.

It keeps its charges in Redis, each written with the inbox mark of the command that made it, so a
charge or a refund happens once per command however often the command is delivered. The order
service asks it to charge with ``reply_to`` (its reply comes back as a message, nobody waits);
the fulfilment process asks it to refund an order whose vendor never confirmed.
"""

from __future__ import annotations

import uuid

from pydantic import Field

from postroom import Command, HandlerContext, Query, Rejected, handles
from tasks.state import client, key

SERVICE = "payments"
#: a charge above this is declined, as a card's limit would (the demo's way to show a rejection)
LIMIT_CENTS = 1_000_000
#: payment IDs derive from the charging command's message ID: a redelivery finds its own charge
_PAYMENT_IDS = uuid.UUID("3a1f6c0e-8d2b-4e57-9b4a-2c7d5e9f1a36")


class ChargePayment(Command):
    order_id: uuid.UUID
    amount_cents: int = Field(gt=0)


class RefundPayment(Command):
    order_id: uuid.UUID
    payment_id: uuid.UUID
    amount_cents: int = Field(gt=0)


class GetPayment(Query):
    order_id: uuid.UUID


@handles(ChargePayment, service=SERVICE)
def charge(cmd: ChargePayment, ctx: HandlerContext) -> dict[str, str]:
    if cmd.amount_cents > LIMIT_CENTS:
        raise Rejected(f"card declined: {cmd.amount_cents} cents is over the limit")
    payment_id = uuid.uuid5(_PAYMENT_IDS, ctx.message_id)
    order = key(SERVICE, "order", str(cmd.order_id))
    tx = ctx.transaction()
    tx.hset(order, mapping={"payment_id": str(payment_id), "amount_cents": cmd.amount_cents})
    tx.hincrby(order, "charges", 1)  # once per ChargePayment: the tests count effects here
    return {"payment_id": str(payment_id), "order_id": str(cmd.order_id)}


@handles(RefundPayment, service=SERVICE)
def refund(cmd: RefundPayment, ctx: HandlerContext) -> dict[str, int]:
    order = key(SERVICE, "order", str(cmd.order_id))
    if client().hget(order, "payment_id") != str(cmd.payment_id):
        raise Rejected(f"order {cmd.order_id} has no payment {cmd.payment_id} to refund")
    ctx.transaction().hincrby(order, "refunds", 1)
    return {"refunded_cents": cmd.amount_cents}


@handles(GetPayment, service=SERVICE)
def get_payment(query: GetPayment, ctx: HandlerContext) -> dict[str, int | str | None]:
    """What was charged and refunded for an order, and how many times."""
    found = client().hgetall(key(SERVICE, "order", str(query.order_id)))
    return {
        "payment_id": found.get("payment_id"),
        "amount_cents": int(found.get("amount_cents", 0)),
        "charges": int(found.get("charges", 0)),
        "refunds": int(found.get("refunds", 0)),
    }
