"""This deployment: settings, the Celery app and its pools. ``import config`` makes the app current."""

from config.celery import app
from config.settings import settings

__all__ = ["app", "settings"]
