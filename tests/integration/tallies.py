"""A test-only process manager, loaded by test_processes.py's workers (POSTROOM_IMPORTS): a tally
whose instance adds up what it is told, its state on the Redis store. When it opens, it asks a
clerk for its label with ``reply_to=True``; the reply comes back to the instance as a message.

Every run of ``AddToTally``'s handler is counted outside the transaction, so a test sees the runs
a lost commit repeated; the first adds of a tally wait (up to a second) for a second run of the
same tally to be under way, so two runs of one instance overlap, as two workers make them.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from postroom import Command, HandlerContext, ProcessContext, ProcessManager, Query, Reply, handles
from tasks.state import client, key

TALLY, CLERK = "tally", "tally_clerk"
#: adds of a tally that wait for a second run of it
OVERLAPPED = 10


class OpenTally(Command, service=TALLY):
    tally: str


class AddToTally(Command, service=TALLY):
    tally: str
    n: int


class Describe(Query, service=CLERK):
    tally: str


class Tally(BaseModel):
    total: int = 0
    adds: int = 0
    label: str = ""


tallies = ProcessManager(TALLY, state=Tally)


@tallies.starts(OpenTally, key="tally")
def open_tally(cmd: OpenTally, ctx: ProcessContext[Tally]) -> None:
    ctx.state = Tally()
    ctx.send(Describe(tally=cmd.tally), reply_to=True)


@handles(Describe)
def describe(query: Describe, ctx: HandlerContext) -> str:
    return f"Tally {query.tally.upper()}"


@tallies.on_reply(Describe)
def described(reply: Reply, ctx: ProcessContext[Tally]) -> None:
    assert ctx.state is not None
    ctx.state.label = reply.value


@tallies.handles(AddToTally, key="tally")
def add_to_tally(cmd: AddToTally, ctx: ProcessContext[Tally]) -> dict[str, int]:
    state = ctx.state
    assert state is not None
    db = client()
    db.incr(key(TALLY, "runs", cmd.tally))
    running = key(TALLY, "running", cmd.tally)
    db.incr(running)
    try:
        deadline = time.monotonic() + 1.0
        while state.adds < OVERLAPPED and int(db.get(running) or 0) < 2:
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        time.sleep(0.01)  # the partner loaded the same version: one of the two commits loses
    finally:
        db.decr(running)
    state.total += cmd.n
    state.adds += 1
    return {"total": state.total}
