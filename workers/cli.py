"""The ``postroom`` command: start pools and Flower, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from config import app, settings
from config.pools import POOLS, pool_named
from postroom import MessageBus, schema
from workers import demo, dlq, events, trace
from workers.launcher import (
    Supervisor,
    api_argv,
    api_url,
    flower_argv,
    flower_env,
    flower_url,
    metrics_argv,
    wait_for_api,
    wait_for_flower,
    wait_for_metrics,
    wait_until_ready,
    worker_argv,
)


def _worker(args: argparse.Namespace) -> int:
    try:
        pool = pool_named(args.pool)
    except KeyError as exc:
        print(f"postroom: {exc.args[0]}", file=sys.stderr)
        return 2
    argv = worker_argv(pool, settings) + args.celery_args
    os.execv(argv[0], argv)  # become the worker: signals reach Celery directly


def _flower(_: argparse.Namespace) -> int:
    argv = flower_argv(settings)
    os.execve(argv[0], argv, flower_env(settings))


def _api(_: argparse.Namespace) -> int:
    argv = api_argv()
    os.execv(argv[0], argv)  # become the server: SIGTERM reaches uvicorn directly


def _metrics(_: argparse.Namespace) -> int:
    argv = metrics_argv()
    os.execv(argv[0], argv)  # become the exporter: SIGTERM reaches it directly


def _up(args: argparse.Namespace) -> int:
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    for pool in POOLS:
        supervisor.start(f"pool {pool.name}", worker_argv(pool, settings))
    if not args.no_flower:
        supervisor.start("flower", flower_argv(settings), flower_env(settings))
        print(f"postroom: Flower at {flower_url(settings)}", flush=True)
    if not args.no_api:
        supervisor.start("api", api_argv())
        print(
            f"postroom: HTTP API at {api_url(settings)} (docs: {api_url(settings)}docs)", flush=True
        )
    if not args.no_metrics:
        supervisor.start("metrics", metrics_argv())  # it says where it serves, once it does
    print(
        f"postroom: pools {', '.join(p.name for p in POOLS)} starting; Ctrl-C stops them all",
        flush=True,
    )
    try:
        wait_until_ready(app, POOLS)
        if not args.no_flower:
            wait_for_flower(settings)  # so that Flower sees everything from the first message
        if not args.no_api:
            wait_for_api(settings, supervisor.procs["api"])
        if not args.no_metrics:
            wait_for_metrics(settings)  # counting from the first message on
        print("postroom: every pool is ready", flush=True)
        if args.demo:
            demo.run(MessageBus(app, source="demo"))
            print(f"postroom: demo done; watch it in Flower at {flower_url(settings)}", flush=True)
    except Exception as exc:
        print(f"postroom: {type(exc).__name__}: {exc}", file=sys.stderr)
        supervisor.stop()
        return 1
    return supervisor.wait()


def _demo(_: argparse.Namespace) -> int:
    demo.run(MessageBus(app, source="demo"))
    return 0


def _pools(_: argparse.Namespace) -> int:
    for pool in POOLS:
        print(
            f"{pool.name:15} queues={','.join(pool.queues)} concurrency={pool.concurrency} "
            f"pool={pool.pool}"
        )
    return 0


def _schema(args: argparse.Namespace) -> int:
    """Write what this deployment accepts and emits, for teams and tools that do not read Python."""
    document = schema.dump(schema.asyncapi(app), args.format)
    if args.stdout:
        sys.stdout.write(document)
        return 0
    out = Path(args.out)
    files = {
        f"{name}.schema.json": json.dumps(s, indent=2) + "\n"
        for name, s in schema.json_schemas().items()
    }
    files[f"asyncapi.{args.format}"] = document
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"postroom: cannot write the schemas to {out}: {exc}", file=sys.stderr)
        return 1
    for name in files:
        print(f"postroom: wrote {out / name}")
    for stale in sorted({p.name for p in out.glob("*.schema.json")} - set(files)):
        print(
            f"postroom: {out / stale} is no contract of this deployment any more; delete it "
            "if it is stale",
            file=sys.stderr,
        )
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="postroom", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="start one pool's worker (plain celery worker)")
    worker.add_argument("pool", help="a pool of config/pools.py")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed on to celery worker")
    worker.set_defaults(run=_worker)
    up = sub.add_parser("up", help="start every pool, Flower and the HTTP API in the foreground")
    up.add_argument("--demo", action="store_true", help="run the demo once the pools are ready")
    up.add_argument("--no-flower", action="store_true", help="start the pools only")
    up.add_argument("--no-api", action="store_true", help="do not start the HTTP API")
    up.add_argument(
        "--no-metrics", action="store_true", help="do not start the Prometheus exporter"
    )
    up.set_defaults(run=_up)
    sub.add_parser("flower", help="start Flower").set_defaults(run=_flower)
    sub.add_parser("api", help="start the HTTP API (FastAPI; docs at /docs)").set_defaults(run=_api)
    sub.add_parser(
        "metrics", help="serve Prometheus metrics per message type and pool"
    ).set_defaults(run=_metrics)
    sub.add_parser("demo", help="run the demo against running pools").set_defaults(run=_demo)
    sub.add_parser("pools", help="list the pools").set_defaults(run=_pools)
    schemas = sub.add_parser(
        "schema", help="write each contract's JSON Schema and an AsyncAPI 3.0.0 document"
    )
    schemas.add_argument("--out", default="schema", help="directory to write to (default: schema)")
    schemas.add_argument(
        "--format", choices=["yaml", "json"], default="yaml", help="of the AsyncAPI document"
    )
    schemas.add_argument(
        "--stdout", action="store_true", help="print the AsyncAPI document only; write no file"
    )
    schemas.set_defaults(run=_schema)
    dlq.add_parser(sub)
    trace.add_parser(sub)
    events.add_parser(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "dlq":
        return dlq.run(app, args)
    if args.command == "events":
        return events.run(app, args)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
