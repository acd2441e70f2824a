"""The ``postroom`` command: start pools and Flower, run the demo.

``postroom -A <module>`` runs the deployment whose Celery app that module holds, as ``celery -A``
does (default ``$POSTROOM_APP``, else ``config``: this repository's); see workers/deployment.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from postroom import MessageBus, installation, schema
from workers import breakers, dlq, events, processes, trace
from workers.deployment import (
    Deployment,
    add_app_argument,
    add_server_arguments,
    load_or_exit,
    overridden,
)
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


def _worker(args: argparse.Namespace, deployment: Deployment) -> int:
    try:
        pool = deployment.pool_named(args.pool)
    except KeyError as exc:
        print(f"postroom: {exc.args[0]}", file=sys.stderr)
        return 2
    argv = worker_argv(pool, deployment.settings, deployment.module) + args.celery_args
    os.execv(argv[0], argv)  # become the worker: signals reach Celery directly


def _flower(args: argparse.Namespace, deployment: Deployment) -> int:
    settings = overridden(deployment.settings, flower_address=args.host, flower_port=args.port)
    argv = flower_argv(settings)
    os.execve(argv[0], argv, flower_env(settings, deployment.module))


def _api(args: argparse.Namespace, deployment: Deployment) -> int:
    settings = overridden(deployment.settings, api_host=args.host, api_port=args.port)
    argv = api_argv(settings, deployment.module)
    os.execv(argv[0], argv)  # become the server: SIGTERM reaches uvicorn directly


def _metrics(args: argparse.Namespace, deployment: Deployment) -> int:
    settings = overridden(deployment.settings, metrics_address=args.host, metrics_port=args.port)
    argv = metrics_argv(settings, deployment.module)
    os.execv(argv[0], argv)  # become the exporter: SIGTERM reaches it directly


def migrated(deployment: Deployment) -> bool:
    """Bring every SQL store of the deployment (``install(..., stores=...)``) to its newest
    schema; False, having said why, if one could not be."""
    stores = {
        id(s): s for s in installation(deployment.app).stores.values() if hasattr(s, "migrate")
    }
    for store in stores.values():
        try:
            store.migrate()
        except Exception as exc:
            print(
                f"postroom: cannot migrate {store!r}: {type(exc).__name__}: {exc} "
                "(is the database up? scripts/postgres.sh starts this machine's PostgreSQL)",
                file=sys.stderr,
            )
            return False
        print(f"postroom: migrated {store!r}", flush=True)
    return True


def _migrate(_: argparse.Namespace, deployment: Deployment) -> int:
    return 0 if migrated(deployment) else 1


def _up(args: argparse.Namespace, deployment: Deployment) -> int:
    app, settings, module, pools = (
        deployment.app, deployment.settings, deployment.module, deployment.pools
    )  # fmt: skip
    if not pools:
        print(
            f"postroom: {module} has no pools: no handler is registered. Pass the modules "
            "holding your @handles and @subscribes to postroom.install(app, imports=[...])",
            file=sys.stderr,
        )
        return 2
    if not migrated(deployment):  # before any worker handles a message
        return 1
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    for pool in pools:
        supervisor.start(f"pool {pool.name}", worker_argv(pool, settings, module))
    if not args.no_flower:
        supervisor.start("flower", flower_argv(settings), flower_env(settings, module))
        print(f"postroom: Flower at {flower_url(settings)}", flush=True)
    if not args.no_api:
        supervisor.start("api", api_argv(settings, module))
        print(
            f"postroom: HTTP API at {api_url(settings)} (docs: {api_url(settings)}docs)", flush=True
        )
    if not args.no_metrics:
        # it says where it serves, once it does
        supervisor.start("metrics", metrics_argv(settings, module))
    print(
        f"postroom: pools {', '.join(p.name for p in pools)} starting; Ctrl-C stops them all",
        flush=True,
    )
    try:
        wait_until_ready(app, pools)
        if not args.no_flower:
            wait_for_flower(settings)  # so that Flower sees everything from the first message
        if not args.no_api:
            wait_for_api(settings, supervisor.procs["api"])
        if not args.no_metrics:
            wait_for_metrics(settings)  # counting from the first message on
        print("postroom: every pool is ready", flush=True)
        if args.demo:
            from workers import demo  # noqa: PLC0415 - this repository's services only

            demo.run(MessageBus(app, source="demo"))
            print(f"postroom: demo done; watch it in Flower at {flower_url(settings)}", flush=True)
    except Exception as exc:
        print(f"postroom: {type(exc).__name__}: {exc}", file=sys.stderr)
        supervisor.stop()
        return 1
    return supervisor.wait()


def _demo(_: argparse.Namespace, deployment: Deployment) -> int:
    from workers import demo  # noqa: PLC0415 - this repository's services only

    demo.run(MessageBus(deployment.app, source="demo"))
    return 0


def _pools(_: argparse.Namespace, deployment: Deployment) -> int:
    for pool in deployment.pools:
        print(
            f"{pool.name:15} queues={','.join(pool.queues)} concurrency={pool.concurrency} "
            f"pool={pool.pool}"
        )
    return 0


def _schema(args: argparse.Namespace, deployment: Deployment) -> int:
    """Write what this deployment accepts and emits, for teams and tools that do not read Python."""
    document = schema.dump(schema.asyncapi(deployment.app), args.format)
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
    root = argparse.ArgumentParser(
        prog="postroom", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_app_argument(root)
    sub = root.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="start one pool's worker (plain celery worker)")
    worker.add_argument("pool", help="a pool of the deployment (postroom pools lists them)")
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
    servers = (
        ("flower", "start Flower", "FLOWER_ADDRESS", "FLOWER_PORT", _flower),
        ("api", "start the HTTP API (FastAPI; docs at /docs)", "API_HOST", "API_PORT", _api),
        (
            "metrics",
            "serve Prometheus metrics per message type and pool",
            "METRICS_ADDRESS",
            "METRICS_PORT",
            _metrics,
        ),
    )
    for name, help_, host, port, run in servers:
        server = sub.add_parser(name, help=help_)
        add_server_arguments(server, f"POSTROOM_{host}", f"POSTROOM_{port}", app=False)
        server.set_defaults(run=run)
    sub.add_parser("demo", help="run the demo against running pools").set_defaults(run=_demo)
    sub.add_parser("pools", help="list the pools").set_defaults(run=_pools)
    sub.add_parser(
        "migrate", help="create or upgrade the tables of every SQL store (postroom up does it too)"
    ).set_defaults(run=_migrate)
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
    breakers.add_parser(sub)
    trace.add_parser(sub)
    processes.add_parser(sub)
    events.add_parser(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    deployment = load_or_exit(args.app)
    if args.command == "dlq":
        return dlq.run(deployment.app, args)
    if args.command == "breakers":
        return breakers.run(deployment.app, args)
    if args.command == "events":
        return events.run(deployment.app, args)
    if args.command == "trace":
        return trace.run(deployment.app, args)
    if args.command == "processes":
        return processes.run(deployment.app, args)
    code: int = args.run(args, deployment)
    return code


if __name__ == "__main__":
    sys.exit(main())
