"""Test-only services for replies to a callback, loaded by the test workers of test_callbacks.py
(POSTROOM_IMPORTS): the asker sends a query to the oracle with reply_to, and its @on_reply handler
records each reply it ran for in the test's own Redis namespace."""

from __future__ import annotations

import json
import os
import signal
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
from postroom.bus import MessageBus
from tasks.state import client, key

ASKER, ORACLE = "asker", "oracle"


class AskOracle(Command, service=ASKER):
    """Sends Lookup to the oracle with reply_to=True and replies at once, with its message ID."""

    word: str


class Lookup(Query, service=ORACLE):
    """Answers with the word in capitals; "unreachable" fails transiently on every run."""

    word: str


class Remember(Command, service=ORACLE):
    """Counts its word, with the inbox mark; a word starting "die_before_reply" kills its worker
    process on the first run, after the commit and before the reply is sent (see below)."""

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


@handles(Remember)
def remember(cmd: Remember, ctx: HandlerContext) -> dict[str, str]:
    ctx.transaction().incr(key(ORACLE, "remembered", cmd.word))
    return {"word": cmd.word}


@handles(Forbid)
def forbid(cmd: Forbid, ctx: HandlerContext) -> None:
    raise Rejected(f"{cmd.word} is forbidden")


@on_reply(Lookup, pool=ASKER)
def looked_up(reply: Reply, ctx: HandlerContext) -> None:
    record(reply, ctx)


@on_reply(Remember, pool=ASKER)
def remembered(reply: Reply, ctx: HandlerContext) -> None:
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


_send_reply = MessageBus.send_reply


def _send_reply_or_die(self: MessageBus, reply: Reply, **where: Any) -> None:
    """Fault injection for the crash test: the first reply to a "die_before_reply" word kills its
    worker process (SIGKILL: nothing runs after it) instead of being sent."""
    word = str((reply.value or {}).get("word", ""))
    doomed = word.startswith("die_before_reply")
    if doomed and client().set(key(ORACLE, "died", word), "1", nx=True):
        os.kill(os.getpid(), signal.SIGKILL)
    _send_reply(self, reply, **where)


MessageBus.send_reply = _send_reply_or_die  # type: ignore[method-assign]
