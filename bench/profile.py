"""``python -m bench.profile``: where a worker's time goes per message, postroom beside bare Celery.

    python -m bench.profile --broker redis --messages 3000

Each system drains a backlog of the bench's no-ops (postroom's with its inbox on) in one worker
process with the solo pool, under cProfile, so every step of a message is timed in the process
that runs it: Celery's trace with postroom's pipeline and inbox inside it, the result store, the
task events, the acknowledgement, and the rest (fetching, decoding, dispatching). This is the
profile that explains the bench's round-trip and drain ratios (README, issue 17's targets).

cProfile slows Python code more than it slows waiting on a socket, so the totals are larger than
the bench's: compare the two columns with each other, not with the bench. Writes
``bench/results/profile-<broker>.md`` and ``.json`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import measure, peers
from bench.services import BenchNoop
from config import app, settings
from config.pools import Pool
from postroom import MessageBus
from tests.support import ROOT, broker_context
from workers.launcher import worker_argv

RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("postroom", "celery")
#: how deep a row sits in the table: its time is part of the row above it with less depth
DEPTH = {
    "the task: postroom's pipeline, or the bare no-op": 1,
    "inbox claim, before the handler": 2,
    "inbox commit: the handler's writes and the mark": 2,
    "the result stored in the backend": 1,
    "the result's repr, for the task-succeeded event": 1,
}
#: pstats' table: (file, line, function) -> (primitive calls, calls, own s, cumulative s, callers)
Stats = dict[tuple[str, int, str], tuple[int, int, float, float, dict[Any, Any]]]


def _calls(stats: Stats, where: str, name: str, caller: str | None = None) -> float:
    """Seconds spent in the function ``name`` of a file ending in ``where``, callees included
    (only the calls made by ``caller``, if given)."""
    total = 0.0
    for (path, _, function), (_, _, _, cumulative, callers) in stats.items():
        if function != name or not path.endswith(where):
            continue
        if caller is None:
            total += cumulative
        else:
            total += sum(c[3] for (_, _, f), c in callers.items() if f == caller)
    return total


def _tottime(stats: Stats, label: str) -> tuple[float, int]:
    """Own seconds and calls of a built-in, by its label (``<method 'recv' of ...>``)."""
    found = [(v[2], v[1]) for (_, _, name), v in stats.items() if name == label]
    return sum(t for t, _ in found), sum(n for _, n in found)


def breakdown(path: Path, messages: int) -> dict[str, float]:
    """Microseconds per message for each row of the table, from one worker's profile."""
    stats: Stats = pstats.Stats(str(path)).stats
    waiting, _ = _tottime(stats, "<method 'poll' of 'select.epoll' objects>")
    reads = _tottime(stats, "<method 'recv' of '_socket.socket' objects>")[1]
    reads += _tottime(stats, "<method 'recv_into' of '_socket.socket' objects>")[1]
    writes = _tottime(stats, "<method 'sendall' of '_socket.socket' objects>")[1]
    busy = _calls(stats, "kombu/asynchronous/hub.py", "create_loop") - waiting
    trace = _calls(stats, "celery/app/trace.py", "trace_task")
    events = _calls(stats, "celery/events/dispatcher.py", "flush")
    ack = _calls(stats, "kombu/message.py", "ack")
    per = 1e6 / messages
    return {
        "busy, all told": busy * per,
        "Celery's trace of the task": trace * per,
        "the task: postroom's pipeline, or the bare no-op": (
            _calls(stats, "postroom/_celery/tasks.py", "run")
            + _calls(stats, "bench/peers.py", "bare_noop")
        )
        * per,
        "inbox claim, before the handler": _calls(stats, "postroom/reliability.py", "begin") * per,
        "inbox commit: the handler's writes and the mark": (
            _calls(stats, "postroom/reliability.py", "commit") * per
        ),
        "the result stored in the backend": (
            _calls(stats, "celery/backends/base.py", "mark_as_done") * per
        ),
        "the result's repr, for the task-succeeded event": (
            _calls(stats, "celery/utils/saferepr.py", "saferepr", caller="trace_task") * per
        ),
        "task events (buffered, sent together)": events * per,
        "acknowledgement": ack * per,
        "the rest: fetch, decode, dispatch, the loop": (busy - trace - events - ack) * per,
        "socket writes per message": writes / messages,
        "socket reads per message": reads / messages,
    }


def table(kind: str, messages: int, rows: dict[str, dict[str, float]]) -> str:
    lines = [
        f"#### {kind}: µs per message, one solo worker draining {messages:,} no-ops under cProfile",
        "",
        "| step | postroom | bare Celery | difference |",
        "|---|---|---|---|",
    ]
    for label in rows["postroom"]:
        mine, theirs = rows["postroom"][label], rows["celery"][label]
        digits = 1 if label.startswith("socket") else 0
        name = "&nbsp;&nbsp;" * DEPTH.get(label, 0) + label
        lines.append(
            f"| {name} | {mine:,.{digits}f} | {theirs:,.{digits}f} | {mine - theirs:+,.{digits}f} |"
        )
    return "\n".join(lines)


def _drain(system: str, messages: int, profile: Path) -> None:
    """Run in the broker's environment (``config.settings`` is read from it at import):
    enqueue, then profile one worker until the backlog is drained."""
    profiled = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "celery"]
    if system == "postroom":
        bus = MessageBus(app, source="bench")
        for start in range(0, messages, 1000):
            bus.send_many([BenchNoop(n=i) for i in range(start, min(messages, start + 1000))])
        argv = worker_argv(Pool("bench", ("commands.bench",), 1), settings)
        argv[argv.index("-P") + 1] = "solo"
        argv[argv.index("-l") + 1] = "WARNING"
        argv = [*profiled, *argv[3:]]  # after [python, -m, celery]
    else:
        with peers.celery_app.producer_or_acquire() as producer:
            for i in range(messages):
                peers.bare_noop.apply_async((i,), producer=producer)
        argv = [*profiled, *measure.celery_worker_args(concurrency=1, pool="solo")]
    watch = measure.Watch(system, messages, timeout=600)
    workers = measure.Workers(argv)
    try:
        watch.seconds()
    finally:
        workers.stop()  # a warm shutdown: cProfile writes the profile as the worker exits


def run_broker(kind: str, messages: int) -> dict[str, dict[str, float]]:
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        ctx = broker_context(kind, Path(workdir), imports="bench.services", log_level="WARNING")
        try:
            for system in SYSTEMS:
                profile = Path(workdir) / f"{system}.prof"
                drain = ["--drain", system, str(messages), str(profile)]
                subprocess.run(
                    [sys.executable, "-m", "bench.profile", *drain],
                    cwd=ROOT,
                    env=ctx.env,
                    check=True,
                    timeout=900,
                )
                rows[system] = breakdown(profile, messages)
        finally:
            ctx.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--broker", action="append", choices=["redis", "rabbitmq"])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--drain", nargs=3, metavar=("SYSTEM", "N", "PROFILE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.drain:
        system, messages, profile = args.drain
        _drain(system, int(messages), Path(profile))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.broker or ["redis"]:
        rows = run_broker(kind, args.messages)
        (args.out / f"profile-{kind}.json").write_text(json.dumps(rows, indent=2))
        text = table(kind, args.messages, rows)
        (args.out / f"profile-{kind}.md").write_text(text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
