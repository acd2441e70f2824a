"""``postroom events``: read the event log, follow it, and replay it into one pool's queue."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime

from celery import Celery

from postroom.eventlog import LoggedEvent, event_log, parse_since
from postroom.headers import SOURCE
from postroom.reliability import reliability
from postroom.replay import ReplayError, replay


def _since(text: str) -> datetime:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    events = sub.add_parser("events", help="the event log: tail, show, replay")
    verbs = events.add_subparsers(dest="verb", required=True)
    tail = verbs.add_parser("tail", help="the newest events, one line each, oldest first")
    tail.add_argument("-n", type=int, default=10, help="how many (default: 10)")
    tail.add_argument(
        "-f", "--follow", action="store_true", help="then each new event as it is logged (Ctrl-C)"
    )
    verbs.add_parser("show", help="one event, whole, as JSON").add_argument("message_id")
    again = verbs.add_parser(
        "replay",
        help="re-deliver logged events to one pool only; declares its queue first, so a new "
        "pool is bootstrapped from history and then continues live",
    )
    again.add_argument("--pool", required=True, help="the subscriber pool to deliver to")
    again.add_argument(
        "--since", type=_since, help="ISO 8601 time (UTC if no zone) or age: 90s, 15m, 2h, 7d"
    )
    again.add_argument("--type", dest="event_type", help="one event type the pool subscribes to")
    again.add_argument(
        "--force",
        action="store_true",
        help="run them again, also those the pool already handled (its inbox skips them otherwise)",
    )


def line(event: LoggedEvent) -> str:
    payload = json.dumps(event.payload, separators=(",", ":"), default=str)
    if len(payload) > 60:
        payload = payload[:57] + "..."
    return (
        f"{event.logged_at.isoformat(timespec='milliseconds')}  {event.message_id}  "
        f"{event.message_type:24} {event.headers.get(SOURCE, '?'):10} {payload}"
    )


def run(app: Celery, args: argparse.Namespace) -> int:
    store = event_log(app)
    if args.verb == "tail":
        try:
            for event in store.tail(args.n, follow=args.follow):
                print(line(event), flush=True)
        except KeyboardInterrupt:
            pass
        return 0
    if args.verb == "show":
        found = store.get(args.message_id)
        if found is None:
            print(
                f"postroom: no event {args.message_id} in the log: it was never published, or "
                "it is older than POSTROOM_EVENT_LOG_RETENTION; `postroom events tail` lists the "
                "newest",
                file=sys.stderr,
            )
            return 1
        print(json.dumps(found.to_json(), indent=2, default=str))
        return 0
    return _replay(app, args)


def _replay(app: Celery, args: argparse.Namespace) -> int:
    try:
        done = replay(
            app, args.pool, since=args.since, event_type=args.event_type, force=args.force
        )
    except ReplayError as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 2
    print(f"postroom: declared {done.queue}, bound to {', '.join(done.event_types)}")
    how = (
        f"forced (postroom.replay={done.replay_id}): the pool runs each one again"
        if done.replay_id
        else "the pool's inbox skips those it already handled"
    )
    print(
        f"postroom: replayed {done.count} event(s) to {done.queue} (the log up to {done.until}); "
        f"{how}"
    )
    print(
        f"postroom: events published from now on reach {done.queue} live; start the pool's "
        f"workers if they are not running: postroom worker {done.pool}"
    )
    retention = reliability(app).inbox_retention
    if not done.replay_id and done.oldest and done.oldest.timestamp() < time.time() - retention:
        print(
            f"postroom: some replayed events were logged before the pool's inbox horizon "
            f"(POSTROOM_INBOX_RETENTION={retention} s): the inbox may have forgotten them, so "
            "they may run again; narrow the replay with --since to avoid that",
            file=sys.stderr,
        )
    if done.refused:
        print(
            f"postroom: {len(done.refused)} event(s) not replayed, their signature does not "
            f"verify with POSTROOM_SIGNING_KEYS (signed with a retired key, or changed in the "
            f"log): {', '.join(done.refused)}",
            file=sys.stderr,
        )
        return 1
    return 0
