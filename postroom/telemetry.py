"""Traces and structured logs for every process of the deployment, configured from settings.

``POSTROOM_TRACING`` picks where spans go: nowhere (the default, and then postroom's spans are
no-ops), the console (each process's standard output), or an OTLP collector over HTTP (the
standard ``OTEL_EXPORTER_OTLP_*`` variables say where; ``http://localhost:4318`` otherwise).
``POSTROOM_LOG_FORMAT`` picks how a worker's log lines look. ``json`` makes every line one JSON
object carrying the IDs of the message being handled, so a log search by correlation ID finds the
whole conversation. ``pretty`` is for a person at a terminal (``postroom up``): one short line per
message handled (time, pool, type, outcome, correlation ID, duration), coloured by pool, plus
warnings and errors; Celery's own received/succeeded lines and its banner are left out. ``auto``
(the default) is ``pretty`` where the log stream is a terminal and ``json`` otherwise; ``text``
keeps Celery's usual lines. ``NO_COLOR`` (https://no-color.org) turns the colours off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import IO, Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    task_postrun,
    task_prerun,
)

from postroom.errors import ConfigurationError
from postroom.settings import Settings
from postroom.tracing import EnvelopeFilter, log_context_end, log_context_start

LOG_FORMATS = ("auto", "json", "pretty", "text")

#: the logger of the one line per message handled (postroom/pipeline/steps.py, class Log)
HANDLED = "postroom.handled"

_configured = False


def configure(settings: Settings) -> None:
    """Once per process: the tracer provider, and how Celery's log handlers format records."""
    global _configured  # noqa: PLW0603 - once per process, whoever creates an app first
    if (settings.log_format or "auto") not in LOG_FORMATS:
        raise ConfigurationError(
            f"POSTROOM_LOG_FORMAT={settings.log_format!r} is not a log format: use "
            f"{', '.join(LOG_FORMATS)} (auto: pretty on a terminal, json otherwise)"
        )
    if _configured:
        return
    _configured = True
    if settings.tracing:
        _tracing(settings)
    task_prerun.connect(log_context_start, weak=False)
    task_postrun.connect(log_context_end, weak=False)
    after_setup_logger.connect(_format_handlers(settings.log_format), weak=False)
    after_setup_task_logger.connect(_format_handlers(settings.log_format), weak=False)
    celeryd_after_setup.connect(_quiet_banner, weak=False)


def _tracing(settings: Settings) -> None:
    # Imported here: a deployment without tracing never loads the SDK.
    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if settings.tracing == "console":
        exporter = ConsoleSpanExporter()
    elif settings.tracing == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
    else:
        raise ValueError(
            f"POSTROOM_TRACING={settings.tracing!r} is not a span destination: use console, otlp "
            "or leave it empty"
        )
    provider = TracerProvider(resource=Resource.create({"service.name": settings.namespace}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message and the message's IDs."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for name in ("message_id", "correlation_id", "causation_id", "message_type"):
            value = getattr(record, name, "")
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_format_for(setting: str, stream: IO[str] | None) -> str:
    """The format a handler writing to ``stream`` uses: ``auto`` (or empty) decides by whether
    ``stream`` is a terminal; any other setting is taken as it is."""
    if setting in ("", "auto"):
        return "pretty" if _is_terminal(stream) else "json"
    return setting


def use_colour(stream: IO[str] | None) -> bool:
    """Colours only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    return _is_terminal(stream) and not os.environ.get("NO_COLOR")


def _is_terminal(stream: IO[str] | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


_RESET = "\x1b[0m"
BOLD, DIM, RED, YELLOW = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[33m"
#: pool colours: neither red nor yellow, which mean rejected/failed and warnings/errors
POOL_COLOURS = tuple(f"\x1b[{code}m" for code in (36, 32, 35, 34, 96, 92, 95, 94))
OUTCOME_COLOURS = {"rejected": YELLOW, "retry": YELLOW, "parked": YELLOW, "failed": RED}
LEVEL_COLOURS = {"WARNING": YELLOW, "ERROR": RED, "CRITICAL": RED}


def bold(text: str, stream: IO[str] | None) -> str:
    """``text`` in bold where ``stream`` shows colours: how the demo's own lines stand out."""
    return f"{BOLD}{text}{_RESET}" if use_colour(stream) else text


def pool_colour(pool: str) -> str:
    """The same colour for a pool's name in every process and run (not the salted ``hash()``;
    md5's first byte gives this deployment's five pools five different colours)."""
    digest = hashlib.md5(pool.encode(), usedforsecurity=False).digest()
    return POOL_COLOURS[digest[0] % len(POOL_COLOURS)]


def short_id(value: str) -> str:
    """``01a2097a-…-e13bf13c7ffe`` as ``01a2…7ffe``: enough to match it against a full ID."""
    return f"{value[:4]}…{value[-4:]}" if len(value) > 12 else value


class HandledOnly(logging.Filter):
    """Lets through the one line per message handled, and warnings and errors from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == HANDLED or record.levelno >= logging.WARNING


class PrettyFormatter(logging.Formatter):
    """For a person watching ``postroom up``: a handled message as
    ``14:02:11 search        assets.AssetRegistered     handled   01a2…7ffe  3.1ms``,
    anything else as ``14:02:11 WARNING  logger: message``."""

    def __init__(self, *, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        clock = self._paint(time.strftime("%H:%M:%S", time.localtime(record.created)), DIM)
        if record.name == HANDLED and isinstance(record.args, tuple) and len(record.args) == 5:
            return f"{clock} {self._handled(*record.args)}"
        level = self._paint(f"{record.levelname:<8}", LEVEL_COLOURS.get(record.levelname, ""))
        line = f"{clock} {level} {record.name}: {record.getMessage()}"
        correlation_id = getattr(record, "correlation_id", "")
        if correlation_id:
            line += f" correlation_id={correlation_id}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def _handled(self, *fields: object) -> str:
        # the Log step's arguments: owner, type, outcome, correlation ID, milliseconds
        pool, name, outcome, correlation_id = (str(f) for f in fields[:4])
        millis = fields[4] if isinstance(fields[4], int | float) else 0.0
        colour = pool_colour(pool)
        name = name.removesuffix(f"@{pool}")  # an event's delivery: the pool is in its own column
        return (
            f"{self._paint(f'{pool:<13}', colour)} {self._paint(f'{name:<26}', colour)} "
            f"{self._paint(f'{outcome:<9}', OUTCOME_COLOURS.get(outcome, ''))} "
            f"{short_id(correlation_id)} {millis:.1f}ms"
        )

    def _paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{_RESET}" if self.colour and colour else text


def _format_handlers(log_format: str) -> Any:
    def receiver(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            if not any(isinstance(f, EnvelopeFilter) for f in handler.filters):
                handler.addFilter(EnvelopeFilter())
            stream = getattr(handler, "stream", None)
            chosen = log_format_for(log_format, stream)
            if chosen == "json":
                handler.setFormatter(JsonFormatter())
            elif chosen == "pretty":
                handler.setFormatter(PrettyFormatter(colour=use_colour(stream)))
                if not any(isinstance(f, HandledOnly) for f in handler.filters):
                    handler.addFilter(HandledOnly())

    return receiver


def _quiet_banner(instance: Any, **_: Any) -> None:
    """In the pretty format a worker skips Celery's banner (``postroom pools`` says the same):
    Celery reads ``quiet`` just after this signal, set by ``celery --quiet`` otherwise."""
    if any(isinstance(h.formatter, PrettyFormatter) for h in logging.getLogger().handlers):
        instance.quiet = True
