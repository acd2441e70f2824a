"""``python -m bench``: postroom, bare Celery and Dramatiq on the same broker, in one run.

    python -m bench --broker redis --broker rabbitmq --size small --rounds 3

For each broker it prepares an isolated namespace (Redis) or vhost (RabbitMQ), runs bench.measure
there, and writes bench/results/<broker>.json and bench/results/results.md (the README's table).
Numbers are medians with min and max over the rounds; compare ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from bench import PARTS
from tests.support import ROOT, broker_context

RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("postroom", "celery", "dramatiq")


def run_broker(kind: str, size: str, rounds: int, parts: str) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as workdir:
        ctx = broker_context(kind, Path(workdir), imports="bench.services", log_level="WARNING")
        try:
            out = Path(workdir) / "results.json"
            subprocess.run(
                [sys.executable, "-m", "bench.measure", size, str(rounds), str(out), parts],
                cwd=ROOT,
                env=ctx.env,
                check=True,
                timeout=6 * 3600,
            )
            results: dict[str, dict[str, float]] = json.loads(out.read_text())["results"]
        finally:
            ctx.close()
    return results


def _cell(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "n/a"
    return (
        f"{stat['median']:,.0f} ({stat['min']:,.0f}-{stat['max']:,.0f})"
        if stat["median"] >= 10
        else f"{stat['median']:.2f} ({stat['min']:.2f}-{stat['max']:.2f})"
    )


def table(kind: str, results: dict[str, dict[str, float]]) -> str:
    metrics = sorted({key.split("|")[0] for key in results if key.split("|")[1] in SYSTEMS})
    lines = [
        f"#### {kind}",
        "",
        "| metric | postroom | bare Celery | Dramatiq | postroom / Celery |",
        "|---|---|---|---|---|",
    ]
    for metric in metrics:
        cells = [results.get(f"{metric}|{system}") for system in SYSTEMS]
        ratio = (
            f"{cells[0]['median'] / cells[1]['median']:.2f}x"
            if cells[0] and cells[1] and cells[1]["median"]
            else "n/a"
        )
        lines.append(f"| {metric} | " + " | ".join(_cell(c) for c in cells) + f" | {ratio} |")
    others = sorted(key for key in results if key.split("|")[1] not in SYSTEMS)
    if others:
        lines += ["", "| postroom only | value |", "|---|---|"]
        lines += [f"| {key.replace('|', ', ')} | {_cell(results[key])} |" for key in others]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--broker", action="append", choices=["redis", "rabbitmq"])
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="measure only these parts (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sections = []
    for kind in args.broker or ["redis", "rabbitmq"]:
        results = run_broker(kind, args.size, args.rounds, ",".join(args.only or PARTS))
        (args.out / f"{kind}.json").write_text(json.dumps(results, indent=2))
        sections.append(table(kind, results))
    machine = (
        f"{platform.processor() or platform.machine()}, {subprocess.getoutput('nproc')} cores, "
        f"Python {platform.python_version()}, celery {version('celery')}, kombu "
        f"{version('kombu')}, dramatiq {version('dramatiq')}"
    )
    only = "".join(f" --only {part}" for part in args.only or ())
    header = (
        f"Measured {datetime.now(UTC):%Y-%m-%d} with `python -m bench --size {args.size} "
        f"--rounds {args.rounds}{only}` on {machine}. Rates are per second; medians (min-max)."
    )
    (args.out / "results.md").write_text(header + "\n\n" + "\n\n".join(sections) + "\n")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
