"""Test-only services for replies to a callback, loaded by the test workers of test_callbacks.py
(POSTROOM_IMPORTS): the asker sends a query to the oracle with reply_to, and its @on_reply handler
records each reply it ran for in the test's own Redis namespace."""

from __future__ import annotations

import json
from typing import Any

from postroom import (
    Command,
    HandlerContext,
    Query,
    Rejected,
    Reply,
    TransientError,
    handles,
    on_reply,
)
from tasks.state import client, key

ASKER, ORACLE = "asker", "oracle"


class AskOracle(Command, service=ASKER):
    """Sends Lookup to the oracle with reply_to=True and replies at once, with its message ID."""

    word: str


class Lookup(Query, service=ORACLE):
    """Answers with the word in capitals; "unreachable" fails transiently on every run."""

    word: str


class Forbid(Command, service=ORACLE):
    """Always rejected."""

    word: str


@handles(AskOracle)
def ask_oracle(cmd: AskOracle, ctx: HandlerContext) -> str:
    return ctx.send(Lookup(word=cmd.word), reply_to=True)


@handles(Lookup)
def lookup(query: Lookup, ctx: HandlerContext) -> dict[str, Any]:
    runs = client().incr(key(ORACLE, "runs", query.word))
    if query.word == "unreachable":
        raise TransientError("the oracle's source does not answer")
    return {"word": query.word, "upper": query.word.upper(), "run": runs}


@handles(Forbid)
def forbid(cmd: Forbid, ctx: HandlerContext) -> None:
    raise Rejected(f"{cmd.word} is forbidden")


@on_reply(Lookup, pool=ASKER)
def looked_up(reply: Reply, ctx: HandlerContext) -> None:
    record(reply, ctx)


@on_reply(Forbid, pool=ASKER)
def forbidden(reply: Reply, ctx: HandlerContext) -> None:
    record(reply, ctx)


def record(reply: Reply, ctx: HandlerContext) -> None:
    """Records the reply and its context's IDs, with the inbox mark: one effect per reply."""
    seen = {
        "reply": reply.model_dump(mode="json"),
        "correlation_id": ctx.correlation_id,
        "causation_id": ctx.causation_id,
        "message_id": ctx.message_id,
        "source": ctx.envelope.source,
    }
    tx = ctx.transaction()
    tx.hset(key(ASKER, "replies"), reply.correlation_id, json.dumps(seen))
    tx.hincrby(key(ASKER, "effects"), reply.correlation_id, 1)
