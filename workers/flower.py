"""Flower, started as ``celery -A config flower``, with four small patches for this deployment.

Each patch replaces or wraps one name of Flower's and says why in its docstring; everything else is
Flower as released. ``postroom flower`` and ``postroom up`` start Flower through ``main``.

- ``protect_metrics``: /metrics behind the same basic auth as the rest (Flower issue #1342).
- ``read_postroom_brokers``: the Broker tab and ``/api/queues/length`` on postroom's Redis
  transport (which Flower refuses) and on RabbitMQ's default vhost (which it misreads).
- ``list_every_queue``: a queue no running worker consumes stays on the Broker tab.
- ``quiet_inspector``: no "Inspect method ... failed" warnings while the pools are still starting.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any
from urllib.parse import urlsplit

import tornado.web
from celery.app.utils import find_app
from celery.bin.celery import main as celery_main
from flower import views  # type: ignore[import-untyped]
from flower.utils import broker  # type: ignore[import-untyped]
from flower.views import monitor  # type: ignore[import-untyped]
from kombu.transport import resolve_transport

#: the module of the Celery app Flower watches (``celery -A``), as every postroom process gets it
APP_VARIABLE, DEFAULT_APP = "POSTROOM_APP", "config"
#: RabbitMQ's management plugin listens here unless told otherwise; FLOWER_BROKER_API overrides.
MANAGEMENT_PORT = 15672


def protect_metrics() -> None:
    """Flower's basic auth protects the UI and the API but not /metrics, which lists every task
    name and worker. Wrapping that one handler in Tornado's ``authenticated`` makes it ask for the
    same credentials; with no auth configured it stays open, as before."""
    monitor.Metrics.get = tornado.web.authenticated(monitor.Metrics.get)


def flower_broker_url(broker_url: str) -> str:
    """``broker_url`` with a scheme Flower knows: a transport named by class path (postroom's
    Redis transport, ``postroom._celery.transport:Transport``) becomes its driver (``redis``)."""
    scheme, sep, rest = broker_url.partition("://")
    if ":" not in scheme:  # an alias (redis, amqp, ...): Flower knows it, or refuses it itself
        return broker_url
    return f"{resolve_transport(scheme).driver_type}{sep}{rest}"


def flower_broker(broker_url: str, *args: Any, **kwargs: Any) -> broker.BrokerBase:
    """Flower's broker client (``flower.utils.broker.Broker``) for a postroom deployment.

    Flower picks the client by the scheme of the broker URL kombu prints. postroom's Redis transport
    is selected by class path, so that scheme is ``postroom._celery.transport:Transport`` and
    Flower answered "'redis' broker is not supported". The transport is kombu's Redis one with a
    faster client: queues are the same lists, prefixed by ``global_keyprefix``, which Flower
    already reads from ``broker_transport_options``; so the client is Flower's own Redis one.

    On RabbitMQ's default vhost ``/``, Flower joins ``queues/`` and ``/`` into ``queues/``: every
    vhost's queues, so a queue of the same name in another vhost (another deployment's, a test's)
    was listed too, with its own depth. The management API wants the vhost encoded: ``%2F``.
    """
    client = broker.Broker(flower_broker_url(broker_url), *args, **kwargs)
    if isinstance(client, broker.RabbitMQ) and client.vhost == "/":
        client.vhost = "%2F"
    return client


def read_postroom_brokers() -> None:
    """Every Flower page and API handler builds its broker client through ``views.Broker``."""
    views.Broker = flower_broker


def list_every_queue() -> None:
    """Flower lists the queues its known workers consume, and the app's queues only while it
    knows no worker. A queue whose pool is down (the one filling up) would then vanish from the
    Broker tab and ``/api/queues/length`` exactly when its depth matters: list the union."""
    consumed = views.BaseHandler.get_active_queue_names

    def get_active_queue_names(self: views.BaseHandler) -> list[str]:
        return sorted({*consumed(self), *self.capp.amqp.queues})

    views.BaseHandler.get_active_queue_names = get_active_queue_names


class _NoInspectWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.WARNING and str(record.msg).startswith("Inspect method")
        )


def quiet_inspector() -> None:
    """Flower asks the workers for their stats, queues, tasks and conf as it starts. ``postroom
    up`` starts it beside the pools, before any worker can answer, so each method warned on the
    user's terminal ("Inspect method stats failed") though nothing was wrong: Flower asks again
    when a page needs it, and learns of workers from their events. Only those warnings go;
    an inspection that raised is still logged, as an error."""
    logging.getLogger("flower.inspector").addFilter(_NoInspectWarnings())


def management_api(broker_url: str) -> str | None:
    """RabbitMQ's management API for ``broker_url`` (same host and credentials, port 15672), in
    the form Flower's ``--broker_api`` takes; None for a broker that is not RabbitMQ. Flower adds
    the vhost (from the broker URL) to each request itself."""
    url = urlsplit(broker_url)
    if url.scheme not in ("amqp", "amqps", "pyamqp"):
        return None
    credentials = url.netloc.rpartition("@")[0] or "guest:guest"  # kept percent-encoded
    host = url.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"http://{credentials}@{host}:{MANAGEMENT_PORT}/api/"


def main() -> None:
    """``celery -A <app> flower`` with the patches above. On RabbitMQ, Flower reads queue depths
    from the management API derived from the broker URL; ``FLOWER_BROKER_API`` (Flower's own
    variable) points it elsewhere: another port, https. It goes through the environment, as
    Flower's basic auth does, since it holds the broker's password and a command line shows in ps.
    """
    module = os.environ.get(APP_VARIABLE) or DEFAULT_APP
    app = find_app(module)  # the app `celery -A` finds next (imported once, for its broker URL)
    protect_metrics()
    read_postroom_brokers()
    list_every_queue()
    quiet_inspector()
    api = management_api(str(app.conf.broker_url))
    if api is not None:
        os.environ.setdefault("FLOWER_BROKER_API", api)
    sys.argv = ["celery", "-A", module, "flower", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
