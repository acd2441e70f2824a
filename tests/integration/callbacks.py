"""Test-only services for replies to a callback, loaded by the test workers of test_callbacks.py
(POSTROOM_IMPORTS): the asker sends a query to the oracle with reply_to, and its @on_reply handler
records each reply it ran for in the test's own Redis namespace."""

from __future__ import annotations

import json
from typing import Any

from postroom import Command, HandlerContext, Query, Reply, handles, on_reply
from tasks.state import client, key

ASKER, ORACLE = "asker", "oracle"


class AskOracle(Command, service=ASKER):
    """Sends Lookup to the oracle with reply_to=True and replies at once, with its message ID."""

    word: str


class Lookup(Query, service=ORACLE):
    word: str


@handles(AskOracle)
def ask_oracle(cmd: AskOracle, ctx: HandlerContext) -> str:
    return ctx.send(Lookup(word=cmd.word), reply_to=True)


@handles(Lookup)
def lookup(query: Lookup, ctx: HandlerContext) -> dict[str, Any]:
    runs = client().incr(key(ORACLE, "runs", query.word))
    return {"word": query.word, "upper": query.word.upper(), "run": runs}


@on_reply(Lookup, pool=ASKER)
def looked_up(reply: Reply, ctx: HandlerContext) -> None:
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
