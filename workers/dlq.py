"""``postroom dlq``: look at dead letters, send them back where they came from, or drop them."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial

from celery import Celery

from postroom.errors import NoSuchLetter, OutOfLine
from postroom.headers import PREFIX
from postroom.parking import purge_one, redrive_all, redrive_one
from postroom.reliability import DeadLetters, redrive, reliability


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dlq = sub.add_parser("dlq", help="dead letters: list, show, redrive, purge")
    verbs = dlq.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="one line per dead letter, oldest first")
    listing.add_argument("--limit", type=int, default=None)
    verbs.add_parser("show", help="one dead letter, whole, as JSON").add_argument("id")
    again = verbs.add_parser(
        "redrive",
        help="send back to the queue it came from (a line's head takes its parked ones along, "
        "in order)",
    )
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?")
    which.add_argument("--all", action="store_true")
    purge = verbs.add_parser("purge", help="delete one dead letter, or every one")
    purge.add_argument("id", nargs="?", help="only this one (never a parked one alone)")


def run(app: Celery, args: argparse.Namespace) -> int:
    letters = reliability(app).dead_letters
    try:
        if args.verb == "list":
            return _list(letters, args.limit)
        if args.verb == "show":
            letter = letters.get(args.id)
            if letter is None:
                raise NoSuchLetter(f"no dead letter {args.id}")
            print(json.dumps(asdict(letter), indent=2, default=str))
            return 0
        send = partial(redrive, app)
        if args.verb == "redrive":
            done = redrive_all(letters, send) if args.all else [redrive_one(letters, send, args.id)]
            for line in done:
                print(line)
            return 0
        if args.id:
            print(purge_one(letters, args.id))
            return 0
    except (OutOfLine, NoSuchLetter) as refused:
        print(f"postroom: {refused}", file=sys.stderr)
        return 1
    print(f"purged {letters.purge()} dead letter(s); every parked key flows again")
    return 0


def _list(letters: DeadLetters, limit: int | None) -> int:
    """One line per letter; a parked one names the head it waits behind."""
    for letter_id in letters.ids(limit):
        letter = letters.get(letter_id)
        if letter is None:
            continue
        when = datetime.fromtimestamp(letter.at, UTC).isoformat(timespec="seconds")
        line = None if letter.partition is None else letters.line(letter.owner, letter.partition)
        if line is not None and line.head != letter.id:
            why = f"behind {line.head} ({letter.partition})"
        else:
            why = f"{letter.error_type}: {letter.error_message[:80]}"
            if line is not None:
                ahead = len(line.letter_ids) - 1
                why = f"{why} [heads {ahead} parked{', redriving' if line.redriving else ''}]"
        print(
            f"{letter.id}  {when}  {letter.reason:11} {letter.queue:24} "
            f"{letter.headers.get(PREFIX + 'message_type') or letter.task or '?'}  {why}"
        )
    return 0
