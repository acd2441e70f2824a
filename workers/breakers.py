"""``postroom breakers``: every handler's circuit breaker, and opening or closing one by hand."""

from __future__ import annotations

import argparse
import sys
import time

from celery import Celery

from postroom.breakers import breaker_name
from postroom.bus import MessageBus
from postroom.install import installation
from postroom.messages import CircuitClosed, CircuitOpened
from postroom.registry import registry

#: how long ``open`` holds a breaker without ``--for``: until it is closed by hand
FOREVER = 10 * 365 * 86400.0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    breakers = sub.add_parser("breakers", help="circuit breakers: list, open, close")
    verbs = breakers.add_subparsers(dest="verb")
    verbs.add_parser("list", help="each handler's breaker and its state (the default)")
    opening = verbs.add_parser("open", help="hold a handler's messages in the broker")
    opening.add_argument("name", help="<owner>:<message type>, as listed")
    opening.add_argument(
        "--for",
        dest="seconds",
        type=float,
        default=None,
        help="then probe as after a cool-down (default: until closed by hand)",
    )
    verbs.add_parser("close", help="run a handler's messages again").add_argument("name")


def run(app: Celery, args: argparse.Namespace) -> int:
    installed = installation(app)
    breakers = installed.breakers
    guarded = {
        breaker_name(h.owner, h.contract.__message_type__): limits
        for h in registry.handlers()
        if (limits := breakers.limits(h)) is not None
    }
    if args.verb in {None, "list"}:
        now = time.time()
        states = {s.name: s for s in breakers.store.states()}
        for name, limits in sorted(guarded.items()):
            state = states.get(name)
            status = state.status(now) if state else "closed"
            failures = state.failures if state else 0
            left = ""
            if state and status == "open":
                seconds = state.open_until - now
                left = (
                    "  until closed by hand" if seconds > FOREVER / 2 else f"  {seconds:.0f}s left"
                )
            print(
                f"{name:48} {status:9} failures {failures}/{limits.failures}  "
                f"cool-down {limits.cooldown:g}s{left}"
            )
        return 0
    owner, _, message_type = args.name.partition(":")
    if args.name not in guarded:
        print(
            f"postroom: no handler {args.name!r} has a circuit breaker; "
            "`postroom breakers list` shows those that do",
            file=sys.stderr,
        )
        return 1
    bus = MessageBus(app, source="cli")
    if args.verb == "open":
        seconds = FOREVER if args.seconds is None else args.seconds
        breakers.store.force(args.name, time.time() + seconds)
        bus.publish(
            CircuitOpened(
                owner=owner,
                message_type=message_type,
                failures=0,
                cooldown=seconds,
                error_type="",
                error_message="opened by hand",
            ),
            source="cli",
        )
        print(f"opened {args.name}" + ("" if args.seconds is None else f" for {seconds:g}s"))
        return 0
    breakers.store.force(args.name, 0.0)
    bus.publish(CircuitClosed(owner=owner, message_type=message_type), source="cli")
    print(f"closed {args.name}")
    return 0
