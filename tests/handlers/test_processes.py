"""Process managers in postroom.testing: an instance per key whose state, sends and timeouts go
through the same pipeline a worker runs (real workers and brokers: tests/integration/test_orders.py).

A lunch is ordered (an event starts the instance), the courier is dispatched (a command sent with
reply_to, its reply handled by the process), and the process waits for ``Delivered``; a timeout it
scheduled refunds the lunch if the courier is late.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from postroom import (
    Command,
    ContractError,
    Event,
    HandlerContext,
    InvalidSchedule,
    ProcessContext,
    ProcessManager,
    Query,
    Rejected,
    Reply,
    handles,
)
from postroom.headers import PROCESS
from postroom.instances import Instance
from postroom.testing import Harness

refunds: list[str] = []
#: run once, inside the next Tipped handling: what another worker commits meanwhile, say
interfere: list[Callable[[ProcessContext[LunchState]], None]] = []


class LunchOrdered(Event, service="canteen"):
    order_id: str
    courier: str = "bike"


class Tipped(Event, service="canteen"):
    order_id: str
    cents: int


class Refund(Command, service="canteen"):
    order_id: str


class Dispatch(Command, service="courier"):
    order_id: str


class ConfirmDelivery(Command, service="courier"):
    order_id: str


class Delivered(Event, service="courier"):
    order_id: str


class DeliveryOverdue(Command, service="lunch"):
    order_id: str


class CancelLunch(Command, service="lunch"):
    order_id: str


class BookTable(Command, service="lunch"):
    """A command that starts an instance: its reply is the handler's value."""

    order_id: str


class LunchState(BaseModel):
    order_id: str
    eta: int | None = None
    tips: int = 0
    overdue: str = ""


lunch = ProcessManager("lunch", state=LunchState)


@lunch.starts(LunchOrdered, key="order_id")
def ordered(event: LunchOrdered, ctx: ProcessContext[LunchState]) -> None:
    ctx.state = LunchState(order_id=event.order_id)
    ctx.send(Dispatch(order_id=event.order_id), reply_to=True)
    ctx.state.overdue = ctx.schedule(DeliveryOverdue(order_id=event.order_id), delay=60)


@lunch.on_reply(Dispatch)
def dispatched(reply: Reply, ctx: ProcessContext[LunchState]) -> None:
    assert ctx.state is not None
    ctx.state.eta = reply.value["eta"]


@lunch.handles(Delivered, key="order_id")
def delivered(event: Delivered, ctx: ProcessContext[LunchState]) -> None:
    ctx.end("completed")


@lunch.handles(DeliveryOverdue)
def overdue(timeout: DeliveryOverdue, ctx: ProcessContext[LunchState]) -> None:
    ctx.send(Refund(order_id=timeout.order_id))
    ctx.end("compensated")


@lunch.handles(Tipped, key="order_id")
def tipped(event: Tipped, ctx: ProcessContext[LunchState]) -> None:
    assert ctx.state is not None
    ctx.state.tips += event.cents
    if interfere:
        interfere.pop()(ctx)


@lunch.handles(CancelLunch, key="order_id")
def cancel(cmd: CancelLunch, ctx: ProcessContext[LunchState]) -> None:
    raise Rejected("a lunch on its way cannot be cancelled")


@lunch.starts(BookTable, key="order_id")
def book(cmd: BookTable, ctx: ProcessContext[LunchState]) -> dict[str, str]:
    ctx.state = LunchState(order_id=cmd.order_id)
    return {"table": f"t-{cmd.order_id}"}


@handles(Dispatch)
def dispatch(cmd: Dispatch, ctx: HandlerContext) -> dict[str, int]:
    return {"eta": 30}


@handles(ConfirmDelivery)
def confirm(cmd: ConfirmDelivery, ctx: HandlerContext) -> None:
    ctx.publish(Delivered(order_id=cmd.order_id))


@handles(Refund)
def refund(cmd: Refund, ctx: HandlerContext) -> None:
    refunds.append(cmd.order_id)


@pytest.fixture
def harness() -> Harness:
    refunds.clear()
    interfere.clear()
    return Harness(pools={"lunch"})


def _ordered(harness: Harness, order_id: str = "o1") -> Instance:
    harness.publish(LunchOrdered(order_id=order_id))
    harness.run(until=harness.clock.now + 10)  # the order and the courier's reply, not the timeout
    found = harness.instance(lunch, order_id)
    assert found is not None
    return found


def _results(found: Instance | None) -> list[str]:
    assert found is not None
    return [step["result"] for step in found.steps]


def test_an_order_starts_an_instance_that_waits_for_its_courier(harness: Harness) -> None:
    found = _ordered(harness)
    assert (found.status, found.state) == (
        "running",
        {"order_id": "o1", "eta": 30, "tips": 0, "overdue": found.state["overdue"]},  # type: ignore[index]
    )
    assert list(found.pending) == [found.state["overdue"]]  # type: ignore[index]
    assert _results(found) == ["started", "handled"]
    sent = found.steps[0]["sent"]
    assert [s["type"] for s in sent] == ["courier.Dispatch", "lunch.DeliveryOverdue"]
    assert sent[1]["due"] == pytest.approx(60)


def test_a_delivery_in_time_completes_the_order_and_its_timeout_is_ignored(
    harness: Harness,
) -> None:
    _ordered(harness)
    harness.send(ConfirmDelivery(order_id="o1"))
    harness.run()  # the timeout too, 60 s on
    found = harness.instance(lunch, "o1")
    assert found is not None
    assert found.status == "completed"
    assert _results(found) == ["started", "handled", "completed", "ignored: has completed"]
    assert refunds == []
    assert found.pending == {}


def test_no_delivery_in_time_refunds_once_and_a_late_one_is_ignored(harness: Harness) -> None:
    _ordered(harness)
    harness.run()  # 60 s pass: the timeout fires
    harness.send(ConfirmDelivery(order_id="o1"))  # the courier, too late
    harness.run()
    found = harness.instance(lunch, "o1")
    assert found is not None
    assert found.status == "compensated"
    assert _results(found) == ["started", "handled", "compensated", "ignored: has compensated"]
    assert refunds == ["o1"]


def test_a_timeout_delivered_twice_or_cancelled_runs_at_most_once(harness: Harness) -> None:
    found = _ordered(harness)
    overdue_id = found.state["overdue"]  # type: ignore[index]
    address = {PROCESS: "lunch:o1"}
    harness.run()
    # the broker delivers it again (the inbox drops it), and one the instance never scheduled
    harness.send(DeliveryOverdue(order_id="o1"), message_id=overdue_id, headers=address)
    harness.send(DeliveryOverdue(order_id="o1"), headers=address)
    harness.run()
    assert refunds == ["o1"]
    assert _results(harness.instance(lunch, "o1")) == [
        "started",
        "handled",
        "compensated",
        "ignored: has compensated",
    ]


def test_a_second_start_of_the_same_key_changes_nothing(harness: Harness) -> None:
    _ordered(harness)
    harness.publish(LunchOrdered(order_id="o1", courier="van"))
    harness.run(until=harness.clock.now + 10)
    found = harness.instance(lunch, "o1")
    assert _results(found) == ["started", "handled", "ignored: has started already"]
    assert found is not None
    assert len(found.pending) == 1


def test_a_command_for_an_instance_it_does_not_fit_is_rejected_and_changes_nothing(
    harness: Harness,
) -> None:
    before = _ordered(harness)
    sent = harness.send(CancelLunch(order_id="o1"))
    harness.run(until=harness.clock.now + 10)
    reply = harness.replies[sent.correlation_id]
    assert (reply.status, reply.error and reply.error.message) == (
        "rejected",
        "a lunch on its way cannot be cancelled",
    )
    assert harness.instance(lunch, "o1") == before


def test_a_command_starts_an_instance_once_and_a_second_start_is_rejected(
    harness: Harness,
) -> None:
    first = harness.send(BookTable(order_id="b1")).reply()
    again = harness.send(BookTable(order_id="b1")).reply()
    assert (first.status, first.value) == ("succeeded", {"table": "t-b1"})
    assert again.status == "rejected"
    assert again.error is not None
    assert again.error.message == "lunch:b1 has started already"
    found = harness.instance(lunch, "b1")
    assert found is not None
    assert (found.version, _results(found)) == (1, ["started"])


def test_a_message_for_an_instance_not_started_is_retried_then_dead_lettered(
    harness: Harness,
) -> None:
    harness.publish(Delivered(order_id="nobody"))
    harness.run()
    [letter] = harness.dead_letters
    assert (letter.reason, letter.error_type, letter.attempts) == ("failed", "ProcessNotFound", 6)
    assert "lunch:nobody, which has not started" in letter.error_message
    assert harness.instance(lunch, "nobody") is None


def test_a_run_that_loses_to_another_message_of_its_instance_runs_again_on_the_new_state(
    harness: Harness,
) -> None:
    """Another worker commits a tip to the same instance while this run handles one: this run's
    commit loses, and it runs again on the state the winner left, so neither tip is lost."""
    _ordered(harness)
    store = harness.runtime.store("lunch")

    def another_worker_commits_a_tip(_: ProcessContext[LunchState]) -> None:
        current = store.instance("lunch", "o1")
        assert current is not None
        assert current.state is not None
        tipped = current.step({"result": "handled"}, state={**current.state, "tips": 5})
        assert store.settle(None, "lunch", ["elsewhere"], {}, instances=[tipped])

    interfere.append(another_worker_commits_a_tip)
    harness.publish(Tipped(order_id="o1", cents=100))
    harness.run(until=harness.clock.now + 10)
    found = harness.instance(lunch, "o1")
    assert found is not None
    assert found.state is not None
    assert found.state["tips"] == 105
    assert found.version == 4  # started, the reply, the other worker's tip, this tip
    assert harness.dead_letters == []


def test_a_state_of_the_wrong_type_fails_the_message_and_writes_nothing(
    harness: Harness,
) -> None:
    broken = ProcessManager("broken_lunch", state=LunchState)

    class Ordered(Event, service="broken_canteen"):
        order_id: str

    @broken.starts(Ordered, key="order_id")
    def start(event: Ordered, ctx: ProcessContext[LunchState]) -> None:
        ctx.state = {"order_id": event.order_id}  # type: ignore[assignment]

    harness = Harness(pools={"broken_lunch"})
    harness.publish(Ordered(order_id="o9"))
    harness.run()
    [letter] = harness.dead_letters
    assert "ctx.state of process 'broken_lunch' must be a LunchState" in letter.error_message
    assert harness.instance("broken_lunch", "o9") is None


class Unowned(Command, service="elsewhere"):
    order_id: str


class Peek(Query, service="lunch"):
    order_id: str


@pytest.mark.parametrize(
    ("declare", "problem"),
    [
        (lambda: lunch.handles(Peek, key="order_id"), "a query changes nothing"),
        (lambda: lunch.starts(LunchOrdered, key="customer"), "has no field 'customer'"),
        (lambda: lunch.handles(Unowned, key="order_id"), "service='lunch'"),
        (lambda: lunch.handles(Delivered), "needs key="),
        (lambda: ProcessManager("Lunch", state=LunchState), "lower_snake_case"),
        (lambda: ProcessManager("lunch", state=BaseModel), "two process managers"),
        (lambda: ProcessManager("plain", state=dict), "pydantic model class"),  # type: ignore[type-var]
    ],
)
def test_a_process_declared_wrongly_is_refused_saying_how(
    declare: Callable[[], Any], problem: str
) -> None:
    with pytest.raises(ContractError, match=problem):
        declare()


@pytest.mark.parametrize(
    ("schedule", "error", "problem"),
    [
        (lambda ctx: ctx.schedule(DeliveryOverdue(order_id="o1")), InvalidSchedule, "delay="),
        (lambda ctx: ctx.schedule(Refund(order_id="o1"), delay=5), ContractError, "itself"),
        (lambda ctx: ctx.send(DeliveryOverdue(order_id="o1"), delay=-1), InvalidSchedule, ">= 0"),
    ],
)
def test_a_bad_schedule_fails_in_the_handler(
    harness: Harness,
    schedule: Callable[[ProcessContext[LunchState]], Any],
    error: type,
    problem: str,
) -> None:
    _ordered(harness)
    failures: list[BaseException] = []

    def try_it(ctx: ProcessContext[LunchState]) -> None:
        try:
            schedule(ctx)
        except Exception as exc:
            failures.append(exc)

    interfere.append(try_it)
    harness.publish(Tipped(order_id="o1", cents=1))
    harness.run(until=harness.clock.now + 10)
    [failure] = failures
    assert isinstance(failure, error)
    assert problem in str(failure)
