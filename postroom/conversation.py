"""A whole conversation by its correlation ID: the command, its reply, the events it caused and
each pool's delivery of each, with retries and dead letters; what ``postroom trace`` prints.

Nothing here is recorded for tracing's sake: the reply is the result backend's, the events are
the event log's, deliveries are the pools' inbox records, failures the dead-letter store's. The
correlation ID is the first message's UUIDv7, so it says when the conversation started and
the event log is read from there on only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from postroom.eventlog import LoggedEvent, event_log
from postroom.headers import CAUSATION_ID, CORRELATION_ID, MESSAGE_ID
from postroom.registry import registry
from postroom.reliability import DeadLetter, reliability


@dataclass
class Delivery:
    pool: str
    status: str  # handled, in progress, dead-lettered, pending
    detail: str = ""


@dataclass
class EventNode:
    event: LoggedEvent
    deliveries: list[Delivery] = field(default_factory=list)
    caused: list[EventNode] = field(default_factory=list)


@dataclass
class Conversation:
    correlation_id: str
    command: dict[str, Any] | None  # the reply's record in the result backend, if any
    events: list[EventNode]  # those the command caused, each with what it caused in turn
    strays: list[EventNode]  # events of the conversation with no known cause
    dead_letters: list[DeadLetter]

    @property
    def found(self) -> bool:
        return bool(self.command or self.events or self.strays or self.dead_letters)


def started_at(correlation_id: str) -> datetime | None:
    """When the conversation began, read off its UUIDv7; None for another kind of ID."""
    try:
        value = uuid.UUID(correlation_id)
    except ValueError:
        return None
    if value.version != 7:
        return None
    return datetime.fromtimestamp((value.int >> 80) / 1000, UTC)


def conversation(app: Any, correlation_id: str, window: timedelta) -> Conversation:
    """Everything known about one conversation, reading events up to ``window`` after its start."""
    start = started_at(correlation_id)
    since = start - timedelta(seconds=5) if start else datetime.now(UTC) - window
    until = since + window + timedelta(seconds=5)
    logged = []
    for event in event_log(app).read(since=since):
        if event.logged_at > until:
            break
        if event.headers.get(CORRELATION_ID) == correlation_id:
            logged.append(event)
    state = reliability(app)
    letters = [
        letter
        for letter in (state.dead_letters.get(i) for i in state.dead_letters.ids())
        if letter is not None and letter.headers.get(CORRELATION_ID) == correlation_id
    ]
    nodes = {e.message_id: EventNode(e, _deliveries(app, e, letters)) for e in logged}
    command_ids = {correlation_id}
    meta = app.backend.get_task_meta(correlation_id)
    command = None
    if meta.get("status") != "PENDING":
        command = meta
        result = meta.get("result")
        if isinstance(result, dict) and result.get("causation_id"):
            command_ids.add(str(result["causation_id"]))
    roots, strays = [], []
    for node in nodes.values():
        cause = node.event.headers.get(CAUSATION_ID)
        if cause in nodes:
            nodes[cause].caused.append(node)
        elif cause in command_ids:
            roots.append(node)
        else:
            strays.append(node)
    return Conversation(correlation_id, command, roots, strays, letters)


def _deliveries(app: Any, event: LoggedEvent, letters: list[DeadLetter]) -> list[Delivery]:
    inbox = reliability(app).inbox
    found = []
    for pool in registry.pools_subscribed(event.message_type):
        done = inbox.outcome(pool, event.message_id)
        dead = [
            x for x in letters if x.owner == pool and x.headers.get(MESSAGE_ID) == event.message_id
        ]
        if done is not None:
            attempts = int(done.get("attempts", 1))
            found.append(
                Delivery(pool, "handled", f"after {attempts} attempts" if attempts > 1 else "")
            )
        elif dead:
            found.append(
                Delivery(pool, "dead-lettered", f"{dead[-1].reason}: {dead[-1].error_message}")
            )
        elif runs := inbox.runs(pool, event.message_id):
            found.append(Delivery(pool, "in progress", f"run {runs}"))
        else:
            found.append(Delivery(pool, "pending", "queued, or its pool is down"))
    return found


def render(found: Conversation) -> str:
    """The conversation as an indented tree, one line per message or delivery."""
    lines = [f"conversation {found.correlation_id}"]
    command = found.command
    children = found.events
    if command is not None:
        result = command.get("result")
        reply = result if isinstance(result, dict) else {}
        name = command.get("name") or reply.get("message_type") or "command"
        status = reply.get("status") or str(command.get("status", "")).lower()
        attempts = int(reply.get("attempts") or 1)
        line = f"└─ {name} {found.correlation_id}: {status}"
        if attempts > 1:
            line += f" after {attempts} attempts"
        error = reply.get("error")
        if isinstance(error, dict):
            line += f" ({error.get('type')}: {error.get('message')})"
        lines.append(line)
        lines += _tree(children, "   ")
    else:
        lines.append(
            "└─ (no reply stored under this ID: not a command's, expired, or still queued)"
        )
        lines += _tree(children, "   ")
    if found.strays:
        lines.append("events of this conversation with no known cause:")
        lines += _tree(found.strays, "   ")
    if found.dead_letters:
        lines.append("dead letters:")
        lines += [
            f"   {x.id} {x.task} from {x.queue or '?'}: {x.reason} ({x.error_type}: {x.error_message})"
            for x in found.dead_letters
        ]
    return "\n".join(lines)


def _tree(nodes: list[EventNode], indent: str) -> list[str]:
    lines = []
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        branch, further = ("└─ ", "   ") if last else ("├─ ", "│  ")
        event = node.event
        lines.append(
            f"{indent}{branch}event {event.message_type} {event.message_id} "
            f"(published {event.logged_at:%H:%M:%S})"
        )
        for j, delivery in enumerate(node.deliveries):
            tip = "└─ " if j == len(node.deliveries) - 1 and not node.caused else "├─ "
            detail = f" ({delivery.detail})" if delivery.detail else ""
            lines.append(f"{indent}{further}{tip}{delivery.pool}: {delivery.status}{detail}")
        lines += _tree(node.caused, indent + further)
    return lines
