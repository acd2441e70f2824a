"""``postroom trace CORRELATION_ID``: one conversation as a tree (see postroom.conversation)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from postroom.conversation import conversation, render


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "trace",
        help="print a conversation: the command, its reply, its events and every pool's delivery",
    )
    parser.add_argument("correlation_id")
    parser.add_argument(
        "--window",
        type=float,
        default=3600,
        help="seconds after the conversation's start to look for its events (default 3600)",
    )
    parser.add_argument("--json", action="store_true", help="print it as JSON")


def run(app: Any, args: argparse.Namespace) -> int:
    """``postroom trace``: ``app`` is the deployment's, whose registry says who subscribes."""
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
