"""``postroom processes``: the instances of the deployment's process managers (postroom.processes).

``postroom processes`` lists every running instance, ``postroom processes NAME --ended`` one
manager's ended ones; ``postroom trace --process NAME KEY`` (workers/trace.py) prints one
instance's steps with ``steps``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError

from postroom import installation
from postroom.instances import Instance
from postroom.processes import ProcessManager, manager_named, managers


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "processes", help="list the running instances of the process managers (or ended ones)"
    )
    parser.add_argument("name", nargs="?", help="one process manager (default: every one)")
    parser.add_argument("--ended", action="store_true", help="list ended instances instead")
    parser.add_argument("--limit", type=int, default=100, help="per manager (default 100)")
    parser.add_argument("--json", action="store_true", help="print them as JSON, one per line")


def run(app: Any, args: argparse.Namespace) -> int:
    try:
        chosen = [manager_named(args.name)] if args.name else managers()
    except LookupError as exc:
        print(f"postroom: {exc.args[0]}")
        return 2
    if not chosen:
        print("postroom: this deployment has no process manager")
        return 0
    for manager in chosen:
        store = installation(app).runtime.store(manager.pool)
        try:
            found = store.instances(manager.name, running=not args.ended, limit=args.limit)
        except UNREADABLE as exc:
            print(unreadable(manager, exc))
            return 1
        for instance in found:
            print(json.dumps(asdict(instance)) if args.json else summary(instance))
    return 0


#: a store that cannot be read: down, or (SQL) not migrated to the process table yet
UNREADABLE = (DBAPIError, RedisError)


def unreadable(manager: ProcessManager[Any], exc: Exception) -> str:
    return (
        f"postroom: cannot read process {manager.name}'s instances from its store "
        f"({type(exc).__name__}): is it up, and migrated (postroom migrate)?"
    )


def find(app: Any, name: str, key: str) -> tuple[ProcessManager[Any], Instance | None]:
    """The manager called ``name`` and its instance ``key`` (None if it has none by that key)."""
    manager = manager_named(name)
    return manager, installation(app).runtime.store(manager.pool).instance(name, key)


def summary(instance: Instance) -> str:
    """One line: which instance, how it stands, what it waits for."""
    waits = ", ".join(
        f"{message_type} (due {_at(due)})" if (due := _due(instance, message_id)) else message_type
        for message_id, message_type in instance.pending.items()
    )
    return (
        f"{instance.process:12} {instance.key:38} {instance.status:12} "
        f"started {_at(instance.started_at)}  updated {_at(instance.updated_at)}  "
        f"steps {len(instance.steps)}" + (f"  waits for {waits}" if waits else "")
    )


def steps(instance: Instance) -> str:
    """The instance and each step it took, as a tree: the message, what came of it, what it sent."""
    lines = [
        f"process {instance.address}: {instance.status} (started {_at(instance.started_at)}, "
        f"updated {_at(instance.updated_at)}, version {instance.version})"
    ]
    for n, step in enumerate(instance.steps):
        last = n == len(instance.steps) - 1
        lines.append(
            f"{'└─' if last else '├─'} {_at(step['at'])} {step['message_type']} "
            f"{step['message_id']}: {step['result']}"
        )
        sent = [
            f"{s['type']} {s['message_id']}" + (f" (due {_at(s['due'])})" if "due" in s else "")
            for s in step.get("sent", ())
        ]
        if sent:
            lines.append(f"{'  ' if last else '│ '}   sent {', '.join(sent)}")
    if instance.pending:
        lines.append(f"waits for {', '.join(instance.pending.values())}")
    return "\n".join(lines)


def _due(instance: Instance, message_id: str) -> float | None:
    for step in instance.steps:
        for sent in step.get("sent", ()):
            if sent["message_id"] == message_id:
                return sent.get("due")
    return None


def _at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
