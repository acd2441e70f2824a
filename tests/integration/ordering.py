"""Partitioned contracts for the ordering tests: each handled message appends its sequence number
to its key's list, in the same transaction as the inbox mark, so the lists show the handling order
exactly (a lost message is a gap, a doubled one a repeat)."""

from __future__ import annotations

import time

from postroom import Command, HandlerContext, TransientError, handles
from tasks.state import client, key


class MoveTo(Command, service="ordered", partition_key="asset"):
    asset: str
    seq: int
    flaky: bool = False  # fail transiently on the first attempt


def handled(asset: str) -> str:
    return key("ordered", "handled", asset)


@handles(MoveTo)
def move_to(cmd: MoveTo, ctx: HandlerContext) -> None:
    if cmd.flaky and ctx.attempt == 1:
        raise TransientError("the first attempt of a flaky position fails")
    ctx.transaction().rpush(handled(cmd.asset), cmd.seq)


class Hop(Command, service="ordered", partition_key="parcel"):
    """A parcel's hops, for the ordered dead letters: each one fails for good while the switch
    (the Redis set ``failing``) holds ``<parcel>:<seq>``."""

    parcel: str
    seq: int
    pause: float = 0.0  # seconds each run takes, so a test can kill a worker mid-way


class Broken(Exception):
    """Not transient: the hop is dead-lettered at its first failure."""


def failing() -> str:
    return key("ordered", "failing")


def hopped(parcel: str) -> str:
    return key("ordered", "hopped", parcel)


@handles(Hop)
def hop(cmd: Hop, ctx: HandlerContext) -> None:
    if client().sismember(failing(), f"{cmd.parcel}:{cmd.seq}"):
        raise Broken(f"hop {cmd.seq} of {cmd.parcel} fails on purpose")
    time.sleep(cmd.pause)
    ctx.transaction().rpush(hopped(cmd.parcel), cmd.seq)
