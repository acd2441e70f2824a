"""``postroom trace CORRELATION_ID``: one conversation as a tree (see postroom.conversation);
``postroom trace --process NAME KEY``: one process instance's steps (workers/processes.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from postroom.conversation import conversation, render
from postroom.processes import manager_named
from workers import processes


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "trace",
        help="print a conversation: the command, its reply, its events and every pool's delivery",
    )
    parser.add_argument(
        "correlation_id", help="a correlation ID, or with --process an instance's key"
    )
    parser.add_argument(
        "--process",
        metavar="NAME",
        help="print the steps of process manager NAME's instance keyed by the argument instead",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=3600,
        help="seconds after the conversation's start to look for its events (default 3600)",
    )
    parser.add_argument("--json", action="store_true", help="print it as JSON")


def run(app: Any, args: argparse.Namespace) -> int:
    """``postroom trace``: ``app`` is the deployment's, whose registry says who subscribes."""
    if args.process:
        return _process(app, args)
    found = conversation(app, args.correlation_id, timedelta(seconds=args.window))
    if not found.found:
        print(
            f"postroom: nothing is known of conversation {args.correlation_id}: no reply, event "
            "or dead letter carries it (a typo, or older than the reply TTL and the event log)"
        )
        return 1
    if args.json:
        print(json.dumps(asdict(found), default=str, indent=2))
    else:
        print(render(found))
    return 0


def _process(app: Any, args: argparse.Namespace) -> int:
    try:
        manager = manager_named(args.process)
    except LookupError as exc:
        print(f"postroom: {exc.args[0]}")
        return 2
    try:
        _, instance = processes.find(app, manager.name, args.correlation_id)
    except processes.UNREADABLE as exc:
        print(processes.unreadable(manager, exc))
        return 1
    if instance is None:
        print(
            f"postroom: process {manager.name} has no instance {args.correlation_id} (not "
            "started, or ended longer ago than it keeps ended ones)"
        )
        return 1
    print(json.dumps(asdict(instance), indent=2) if args.json else processes.steps(instance))
    return 0
