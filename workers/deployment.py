"""The deployment a ``postroom`` command runs: a Celery app with postroom installed, and its pools.

``postroom -A fleetapp ...`` finds the app the way ``celery -A fleetapp`` does (``module`` or
``module:attr``; a module's ``app`` or ``celery``, its ``celery`` submodule, or any Celery instance
in it), and every process it starts is given the same ``-A``. The pools are the module's
``POOLS`` (or its ``pools`` submodule's, or its package's) when it declares them, else derived
from the registry of handlers::

    registry.services()  ──> one service pool per owner of commands/queries:  commands.<service>
      + reply_pools()        (and per pool with an @on_reply handler: its replies arrive there)
    registry.pools()     ──> one subscriber pool per pool:   events.<pool> (+ commands.<pool>)

A service that is also a subscriber pool is one pool reading both queues. A partitioned service
runs one message at a time per worker (``-c 1``, see postroom/partitions.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

from celery import Celery
from celery.app.utils import find_app

from postroom.errors import NotInstalled
from postroom.install import installation
from postroom.registry import registry
from postroom.settings import Settings
from postroom.topology import command_queue_name, event_queue_name

#: ``postroom -A``'s default, and the variable that changes it; every child process gets it too
DEFAULT_APP = "config"
APP_VARIABLE = "POSTROOM_APP"


@dataclass(frozen=True)
class Pool:
    name: str
    queues: tuple[str, ...]
    concurrency: int = 2
    pool: str = "prefork"  # Celery's -P: prefork, threads, solo, ...
    prefetch_multiplier: int = 1  # take one message at a time, so a slow one holds up nothing


def service_pool(name: str, concurrency: int = 2) -> Pool:
    """A pool that owns commands and queries: ``commands.<name>``."""
    return Pool(name, (command_queue_name(name),), concurrency)


def subscriber_pool(name: str, concurrency: int = 1) -> Pool:
    """A pool that subscribes to events (``events.<name>``) and answers queries on its read model."""
    return Pool(name, (event_queue_name(name), command_queue_name(name)), concurrency)


class DeploymentError(Exception):
    """The ``-A`` module names no Celery app with postroom installed; the message says what to do."""


@dataclass(frozen=True)
class Deployment:
    """What ``postroom -A <module>`` runs: the app, its settings and its pools."""

    module: str  # as the user wrote it: every child process gets the same ``-A``
    app: Celery
    pools: tuple[Pool, ...]

    @property
    def settings(self) -> Settings:
        return installation(self.app).settings

    def pool_named(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        known = ", ".join(p.name for p in self.pools) or "none"
        raise KeyError(f"no pool named {name!r}; the pools of {self.module} are: {known}")


def app_module(given: str | None = None) -> str:
    """The ``-A`` given, else ``POSTROOM_APP``, else ``config`` (this repository's deployment)."""
    return given or os.environ.get(APP_VARIABLE) or DEFAULT_APP


def load(module: str) -> Deployment:
    """The deployment of ``module``; DeploymentError saying what to do if it is not one."""
    try:
        app = find_app(module)
    except ModuleNotFoundError as exc:
        raise DeploymentError(
            f"cannot import {exc.name!r} (postroom -A {module}): run postroom from the directory "
            "holding your package, or put it on PYTHONPATH"
        ) from exc
    except AttributeError as exc:
        raise DeploymentError(
            f"{module} has no Celery app: create one there (app = Celery(...); "
            "postroom.install(app)), or name it with -A module:attribute"
        ) from exc
    if not isinstance(app, Celery):
        raise DeploymentError(f"{module} names {app!r}, not a Celery app")
    installation(app)  # NotInstalled, saying to call postroom.install(app)
    return Deployment(module, app, _declared_pools(module) or derived_pools())


def load_or_exit(module: str | None = None) -> Deployment:
    """``load``, or exit 2 printing why not: what a command line does with a wrong ``-A``."""
    try:
        return load(app_module(module))
    except (DeploymentError, NotInstalled) as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def overridden(settings: Settings, **flags: object) -> Settings:
    """``settings`` with the flags that were given (not None): a flag wins over its variable."""
    return settings.model_copy(update={k: v for k, v in flags.items() if v is not None})


def add_app_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-A",
        "--app",
        metavar="MODULE",
        help=f"module (or module:attribute) of your Celery app, as for celery -A "
        f"(default: ${APP_VARIABLE}, else {DEFAULT_APP})",
    )


def add_server_arguments(
    parser: argparse.ArgumentParser, host_variable: str, port_variable: str, *, app: bool = True
) -> None:
    """``--host`` (or ``--address``) and ``--port`` of a server; unset, its variables decide."""
    if app:
        add_app_argument(parser)
    parser.add_argument(
        "--host", "--address", dest="host", help=f"address to listen on (default: ${host_variable})"
    )
    parser.add_argument("--port", type=int, help=f"port to listen on (default: ${port_variable})")


def _declared_pools(module: str) -> tuple[Pool, ...] | None:
    """``POOLS`` of the module, of its ``pools`` submodule, or of its package's; None if none."""
    name = module.partition(":")[0]
    package = name.rpartition(".")[0]
    for candidate in (name, f"{name}.pools", *([f"{package}.pools"] if package else [])):
        found = _module(candidate)
        if found is not None and hasattr(found, "POOLS"):
            return tuple(found.POOLS)
    return None


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and f"{name}.".startswith(f"{exc.name}."):
            return None  # no such module; a module it imports that is missing is the user's error
        raise


def derived_pools(
    services: Iterable[str] | None = None,
    subscribers: Iterable[str] | None = None,
    partitioned: Iterable[str] | None = None,
) -> tuple[Pool, ...]:
    """One pool per service and per subscriber pool of the registry (or of the names given); a
    pool that only receives replies (``@on_reply``) is a service pool, on ``commands.<pool>``."""
    known = [*registry.services(), *registry.reply_pools()]
    services = set(known if services is None else services)
    subscribers = set(registry.pools() if subscribers is None else subscribers)
    one_at_a_time = set(registry.partitioned_services() if partitioned is None else partitioned)
    return tuple(
        subscriber_pool(name)
        if name in subscribers
        else service_pool(name, concurrency=1 if name in one_at_a_time else 2)
        for name in sorted(services | subscribers)
    )
