"""Flower, started as ``celery -A config flower``, with its /metrics behind the same basic auth.

Flower's basic auth protects the UI and the API but not /metrics (Flower issue #1342), which lists
every task name and worker. Wrapping that one handler in Tornado's ``authenticated`` makes it ask
for the same credentials; with no auth configured it stays open, as before.
"""

from __future__ import annotations

import sys

import tornado.web
from celery.bin.celery import main as celery_main
from flower.views import monitor


def protect_metrics() -> None:
    monitor.Metrics.get = tornado.web.authenticated(monitor.Metrics.get)


def main() -> None:
    protect_metrics()
    sys.argv = ["celery", "-A", "config", "flower", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
