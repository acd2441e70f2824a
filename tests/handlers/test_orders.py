"""Seed 004's marketplace in postroom.testing: an order is placed, paid through a reply to a
callback, and its fulfilment process either completes it on the vendor's confirmation or, when
the vendor is silent or late, cancels it and refunds the payment. The harness's clock is fake, so
each deadline passes in milliseconds (real workers: tests/integration/test_orders.py)."""

from __future__ import annotations

import uuid
from typing import Any

from postroom.testing import Harness
from tasks.fulfilment import fulfilment
from tasks.orders import GetOrder, OrderCancelled, OrderCompleted, OrderPaid, PlaceOrder
from tasks.payments import GetPayment
from tasks.vendors import ConfirmOrder, GetVendorOrder


def _order(harness: Harness, vendor: str, amount_cents: int = 1250) -> uuid.UUID:
    sent = harness.send(
        PlaceOrder(customer="ada", vendor=vendor, amount_cents=amount_cents, confirm_within=5)
    )
    harness.run()  # every deadline passes: the flow runs to its end
    reply = harness.replies[sent.correlation_id]
    assert reply.value["status"] == "placed"
    return uuid.UUID(reply.value["order_id"])


def _state(harness: Harness, order_id: uuid.UUID) -> dict[str, Any]:
    """How the order ended, as each service and the process record it."""
    instance = harness.instance(fulfilment, order_id)
    return {
        "order": harness.ask(GetOrder(order_id=order_id)).value["status"],
        "payment": harness.ask(GetPayment(order_id=order_id)).value,
        "vendor": harness.ask(GetVendorOrder(order_id=order_id)).value,
        "process": None if instance is None else instance.status,
        "steps": [] if instance is None else [s["result"] for s in instance.steps],
    }


def test_a_vendor_that_confirms_in_time_completes_the_order(harness: Harness) -> None:
    order_id = _order(harness, "greengrocer")
    state = _state(harness, order_id)
    assert (state["order"], state["process"]) == ("completed", "completed")
    assert state["steps"] == ["started", "completed", "ignored: has completed"]
    assert (state["payment"]["charges"], state["payment"]["refunds"]) == (1, 0)
    assert state["vendor"] == {"notified": 1, "confirmed": 1}
    assert [e.order_id for e in harness.events(OrderCompleted)] == [order_id]
    assert harness.events(OrderCancelled) == []


def test_a_silent_vendor_gets_the_order_cancelled_and_refunded_once(harness: Harness) -> None:
    order_id = _order(harness, "night_market")
    state = _state(harness, order_id)
    assert (state["order"], state["process"]) == ("cancelled", "compensated")
    assert (state["payment"]["charges"], state["payment"]["refunds"]) == (1, 1)
    assert state["vendor"] == {"notified": 1, "confirmed": 0}
    [cancelled] = harness.events(OrderCancelled)
    assert cancelled.reason == "vendor night_market did not confirm within 5 s"


def test_a_late_confirmation_is_ignored_once_the_order_is_compensated(harness: Harness) -> None:
    order_id = _order(harness, "slow_deli")  # confirms after 16 s: the order gave it 5
    state = _state(harness, order_id)
    assert (state["order"], state["process"]) == ("cancelled", "compensated")
    assert state["steps"] == ["started", "compensated", "ignored: has compensated"]
    assert state["vendor"] == {"notified": 1, "confirmed": 1}
    assert state["payment"]["refunds"] == 1
    assert harness.events(OrderCompleted) == []


def test_a_declined_payment_declines_the_order_and_starts_no_fulfilment(harness: Harness) -> None:
    order_id = _order(harness, "greengrocer", amount_cents=5_000_000)
    order = harness.ask(GetOrder(order_id=order_id)).value
    assert order["status"] == "declined"
    assert order["reason"] == "payment rejected: card declined: 5000000 cents is over the limit"
    assert harness.events(OrderPaid) == []
    assert harness.instance(fulfilment, order_id) is None


def test_an_unknown_vendor_is_compensated_when_nobody_confirms(harness: Harness) -> None:
    order_id = _order(harness, "nobody_at_all")
    assert _state(harness, order_id)["process"] == "compensated"


def test_a_confirmation_sent_twice_and_an_order_placed_twice_have_one_effect(
    harness: Harness,
) -> None:
    sent = harness.send(PlaceOrder(customer="bo", vendor="greengrocer", amount_cents=300))
    harness.run()
    harness.deliver_again(sent)
    harness.run()
    order_id = uuid.UUID(harness.replies[sent.correlation_id].value["order_id"])
    harness.send(ConfirmOrder(order_id=order_id, vendor="greengrocer"))  # pressed twice
    harness.run()
    state = _state(harness, order_id)
    assert (state["order"], state["process"], state["payment"]["charges"]) == (
        "completed",
        "completed",
        1,
    )
    assert state["steps"] == [
        "started",
        "completed",
        "ignored: has completed",
        "ignored: has completed",
    ]
    assert len(harness.events(OrderCompleted)) == 1
