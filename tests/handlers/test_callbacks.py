"""Replies to a callback in postroom.testing: a reply sent with reply_to reaches the asking pool's
@on_reply handler, through the same pipeline a worker runs (the brokers: tests/integration)."""

from __future__ import annotations

from typing import Any

import pytest

from postroom import (
    Command,
    ContractError,
    Event,
    HandlerContext,
    MessageBus,
    Query,
    Rejected,
    Reply,
    SendFailed,
    handles,
    on_reply,
)
from postroom.pipeline.callback import reply_message_id
from postroom.testing import Harness

#: every reply the asker's @on_reply handler ran for, with its context's IDs
received: list[dict[str, Any]] = []


class Look(Query, service="seer"):
    word: str


class Judge(Command, service="seer"):
    word: str


class Wonder(Command, service="wonderer"):
    """Asks the seer, and goes on without waiting: the answer comes to @on_reply."""

    word: str
    judge: bool = False


class Wondered(Event, service="wonderer"):
    word: str


@handles(Look)
def look(query: Look, ctx: HandlerContext) -> dict[str, Any]:
    if query.word == "bug":
        raise ValueError("a bug in the seer")
    return {"word": query.word, "letters": len(query.word)}


@handles(Judge)
def judge(cmd: Judge, ctx: HandlerContext) -> None:
    raise Rejected(f"{cmd.word} is not for judging")


@handles(Wonder)
def wonder(cmd: Wonder, ctx: HandlerContext) -> str:
    return ctx.send(Judge(word=cmd.word) if cmd.judge else Look(word=cmd.word), reply_to=True)


def _record(reply: Reply, ctx: HandlerContext) -> None:
    received.append(
        {"reply": reply, "correlation_id": ctx.correlation_id, "causation_id": ctx.causation_id}
    )
    ctx.publish(Wondered(word=str(reply.status)))


@on_reply(Look, pool="wonderer")
def looked(reply: Reply, ctx: HandlerContext) -> None:
    _record(reply, ctx)


@on_reply(Judge, pool="wonderer")
def judged(reply: Reply, ctx: HandlerContext) -> None:
    _record(reply, ctx)


@pytest.fixture
def harness() -> Harness:
    received.clear()
    return Harness()


def test_a_handler_asking_with_reply_to_gets_the_reply_in_its_own_pools_on_reply(
    harness: Harness,
) -> None:
    wondered = harness.send(Wonder(word="owl")).reply()
    assert wondered.ok
    look_id = wondered.value
    [got] = received
    reply = got["reply"]
    assert isinstance(reply, Reply)
    assert (reply.status, reply.value) == ("succeeded", {"word": "owl", "letters": 3})
    # ctx.send starts a conversation of its own: the query's message ID is its correlation ID
    assert got["correlation_id"] == reply.correlation_id == look_id
    assert got["causation_id"] == reply.causation_id == look_id
    # the result backend's counterpart holds the same reply: reply_for works as well
    assert harness.replies[look_id].model_dump() == reply.model_dump()


def test_a_reply_to_a_send_from_outside_carries_the_senders_ids(harness: Harness) -> None:
    sent = harness.send(Look(word="moth"), reply_to="wonderer")
    assert sent.reply().value == {"word": "moth", "letters": 4}
    [got] = received
    assert got["correlation_id"] == sent.correlation_id
    assert got["causation_id"] == sent.envelope.message_id
    assert got["reply"].model_dump() == harness.replies[sent.correlation_id].model_dump()


def test_a_rejection_and_a_failure_are_replied_to_the_callback_too(harness: Harness) -> None:
    harness.send(Wonder(word="ant", judge=True)).reply()
    harness.send(Look(word="bug"), reply_to="wonderer").reply()
    rejected, failed = (got["reply"] for got in received)
    assert (rejected.status, rejected.error.message) == ("rejected", "ant is not for judging")
    assert (failed.status, failed.error.type) == ("failed", "ValueError")


def test_a_duplicate_delivery_of_the_reply_runs_the_on_reply_handler_once(
    harness: Harness,
) -> None:
    sent = harness.send(Look(word="bee"), reply_to="wonderer")
    sent.reply()
    harness.deliver_again(sent)  # the query runs again and replies again, under the same ID
    harness.run()
    assert len(received) == 1
    assert harness.events(Wondered) == [Wondered(word="succeeded")]


def test_the_reply_message_id_is_derived_from_the_answered_message(harness: Harness) -> None:
    sent = harness.send(Look(word="gnat"), reply_to="wonderer")
    harness.run()
    deliveries = [d for d in harness._history if d.kind == "reply"]
    assert [d.task_id for d in deliveries] == [reply_message_id(sent.envelope.message_id)]


def test_reply_to_a_pool_with_no_on_reply_handler_is_refused_at_send(harness: Harness) -> None:
    with pytest.raises(ContractError, match=r"no @on_reply\(Look\) handler.*wonderer"):
        harness.send(Look(word="x"), reply_to="nobody")
    with pytest.raises(ContractError, match=r"no @on_reply\(Look\) handler"):
        MessageBus().send(Look(word="x"), reply_to="nobody")  # before any broker is asked


def test_on_reply_needs_a_command_or_query_and_a_pool() -> None:
    with pytest.raises(ContractError, match="only they have replies"):
        on_reply(Wondered, pool="wonderer")  # type: ignore[arg-type]
    with pytest.raises(ContractError, match="needs pool="):
        on_reply(Look)


def test_a_reply_the_broker_will_not_take_sends_the_message_back_for_another_try(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver = harness.send_reply
    refusals = iter([SendFailed("the broker does not answer")])

    def once_refused(reply: Reply, **where: Any) -> None:
        for refusal in refusals:
            raise refusal
        deliver(reply, **where)

    monkeypatch.setattr(harness, "send_reply", once_refused)
    wondered = harness.send(Wonder(word="eel", judge=True)).reply()
    assert [got["reply"].status for got in received] == ["rejected"]  # sent on the second try
    judge_id = wondered.value
    assert harness.replies[judge_id].attempts == 1  # the repeat answered from the inbox
