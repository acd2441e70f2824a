"""``postroom dlq``: look at dead letters, send them back where they came from, or drop them."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime

from celery import Celery

from postroom.headers import PREFIX
from postroom.reliability import redrive, reliability


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dlq = sub.add_parser("dlq", help="dead letters: list, show, redrive, purge")
    verbs = dlq.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="one line per dead letter, oldest first")
    listing.add_argument("--limit", type=int, default=None)
    verbs.add_parser("show", help="one dead letter, whole, as JSON").add_argument("id")
    again = verbs.add_parser("redrive", help="send back to the queue it came from")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?")
    which.add_argument("--all", action="store_true")
    verbs.add_parser("purge", help="delete every dead letter")


def run(app: Celery, args: argparse.Namespace) -> int:
    letters = reliability(app).dead_letters
    if args.verb == "list":
        for letter_id in letters.ids(args.limit):
            letter = letters.get(letter_id)
            if letter is None:
                continue
            when = datetime.fromtimestamp(letter.at, UTC).isoformat(timespec="seconds")
            print(
                f"{letter.id}  {when}  {letter.reason:11} {letter.queue:24} "
                f"{letter.headers.get(PREFIX + 'message_type') or letter.task or '?'}  "
                f"{letter.error_type}: {letter.error_message[:80]}"
            )
        return 0
    if args.verb == "show":
        letter = letters.get(args.id)
        if letter is None:
            print(f"postroom: no dead letter {args.id}", file=sys.stderr)
            return 1
        print(json.dumps(asdict(letter), indent=2, default=str))
        return 0
    if args.verb == "redrive":
        ids = letters.ids() if args.all else [args.id]
        for letter_id in ids:
            letter = letters.get(letter_id)
            if letter is None:
                print(f"postroom: no dead letter {letter_id}", file=sys.stderr)
                return 1
            redrive(app, letter)
            letters.remove(letter_id)
            print(f"redriven {letter_id} to {letter.queue}")
        return 0
    print(f"purged {letters.purge()} dead letter(s)")
    return 0
