"""The ``postroom`` command: start pools and Flower, run the demo."""

from __future__ import annotations

import argparse
import os
import sys

from config import app, settings
from config.pools import POOLS, pool_named
from postroom import MessageBus
from workers import demo, dlq
from workers.launcher import (
    Supervisor,
    flower_argv,
    flower_env,
    flower_url,
    wait_for_flower,
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


def _up(args: argparse.Namespace) -> int:
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    for pool in POOLS:
        supervisor.start(f"pool {pool.name}", worker_argv(pool, settings))
    if not args.no_flower:
        supervisor.start("flower", flower_argv(settings), flower_env(settings))
        print(f"postroom: Flower at {flower_url(settings)}", flush=True)
    print(
        f"postroom: pools {', '.join(p.name for p in POOLS)} starting; Ctrl-C stops them all",
        flush=True,
    )
    try:
        wait_until_ready(app, POOLS)
        if not args.no_flower:
            wait_for_flower(settings)  # so that Flower sees everything from the first message
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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="postroom", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="start one pool's worker (plain celery worker)")
    worker.add_argument("pool", help="a pool of config/pools.py")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed on to celery worker")
    worker.set_defaults(run=_worker)
    up = sub.add_parser("up", help="start every pool and Flower in the foreground")
    up.add_argument("--demo", action="store_true", help="run the demo once the pools are ready")
    up.add_argument("--no-flower", action="store_true", help="start the pools only")
    up.set_defaults(run=_up)
    sub.add_parser("flower", help="start Flower").set_defaults(run=_flower)
    sub.add_parser("demo", help="run the demo against running pools").set_defaults(run=_demo)
    sub.add_parser("pools", help="list the pools").set_defaults(run=_pools)
    dlq.add_parser(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "dlq":
        return dlq.run(app, args)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
