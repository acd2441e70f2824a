"""The soak run: many commands through two command pools and many events through three pools.

    python -m bench.soak --broker redis --commands 100000 --events 100000

It runs against the machine's Redis or RabbitMQ in a namespace (or vhost) of its own, starts its own
workers, sends everything, waits, then counts: every message must have had exactly one effect, and
no worker process may have grown past the memory bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.services import COMMAND_SERVICES, EVENT_POOLS, SoakA, SoakB, SoakHappened, effects
from config.pools import Pool
from postroom import MessageBus
from tests.support import BrokerContext, broker_context

MEMORY_BOUND_MB = 300.0


@dataclass
class SoakResult:
    sent: dict[str, int]
    effects: dict[str, dict[str, int]]  # owner -> message_id -> times applied
    rss_mb: dict[str, float] = field(default_factory=dict)  # worker process -> peak RSS seen
    seconds: float = 0.0

    def lost(self, owner: str) -> int:
        return self.sent[owner] - len(self.effects[owner])

    def doubled(self, owner: str) -> int:
        return sum(1 for times in self.effects[owner].values() if times > 1)

    @property
    def ok(self) -> bool:
        return all(self.lost(o) == 0 and self.doubled(o) == 0 for o in self.sent) and all(
            rss <= MEMORY_BOUND_MB for rss in self.rss_mb.values()
        )

    def report(self) -> str:
        lines = [
            f"{o:8} sent {self.sent[o]:>7}  applied {len(self.effects[o]):>7}  "
            f"lost {self.lost(o)}  doubled {self.doubled(o)}"
            for o in self.sent
        ]
        peak = max(self.rss_mb.values(), default=0.0)
        lines.append(
            f"peak worker RSS {peak:.0f} MB (bound {MEMORY_BOUND_MB:.0f} MB); "
            f"{self.seconds:.0f} s; {'OK' if self.ok else 'FAILED'}"
        )
        return "\n".join(lines)


def _rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [pid, *(p for kid in kids for p in _tree(kid))]


def run(ctx: BrokerContext, commands: int, events: int, timeout: float) -> SoakResult:
    workers = [
        ctx.start_worker(Pool(s, (f"commands.{s}",), concurrency=2)) for s in COMMAND_SERVICES
    ]
    workers += [ctx.start_worker(Pool(p, (f"events.{p}",), concurrency=1)) for p in EVENT_POOLS]
    bus = MessageBus(ctx.app, source="soak")
    started = time.monotonic()
    for n in range(commands):
        bus.send(SoakA(n=n) if n % 2 == 0 else SoakB(n=n))
    for n in range(events):
        bus.publish(SoakHappened(n=n))
    sent = {
        "soak_a": (commands + 1) // 2,
        "soak_b": commands // 2,
        **dict.fromkeys(EVENT_POOLS, events),
    }
    db = ctx.state()
    rss: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while True:
        for worker in workers:
            for pid in _tree(worker.proc.pid):
                name = f"{worker.pool.name}:{pid}"
                rss[name] = max(rss.get(name, 0.0), _rss_mb(pid))
        done = {o: db.hlen(ctx.key(*effects(o))) for o in sent}
        if all(done[o] >= sent[o] for o in sent) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    time.sleep(2.0)  # long enough for a duplicate, had there been one, to land
    applied = {o: {k: int(v) for k, v in db.hgetall(ctx.key(*effects(o))).items()} for o in sent}
    return SoakResult(sent, applied, rss, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--commands", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        ctx = broker_context(args.broker, Path(workdir), imports="bench.services")
        try:
            result = run(ctx, args.commands, args.events, args.timeout)
        finally:
            ctx.close()
    print(result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
