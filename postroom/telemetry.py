"""Traces and structured logs for every process of the deployment, configured from settings.

``POSTROOM_TRACING`` picks where spans go: nowhere (the default, and then postroom's spans are
no-ops), the console (each process's standard output), or an OTLP collector over HTTP (the
standard ``OTEL_EXPORTER_OTLP_*`` variables say where; ``http://localhost:4318`` otherwise).
``POSTROOM_LOG_FORMAT=json`` makes every log line one JSON object carrying the IDs of the message
being handled, so a log search by correlation ID finds the whole conversation.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun, task_prerun

from postroom.settings import Settings
from postroom.tracing import EnvelopeFilter, log_context_end, log_context_start

_configured = False


def configure(settings: Settings) -> None:
    """Once per process: the tracer provider, and how Celery's log handlers format records."""
    global _configured  # noqa: PLW0603 - once per process, whoever creates an app first
    if _configured:
        return
    _configured = True
    if settings.tracing:
        _tracing(settings)
    task_prerun.connect(log_context_start, weak=False)
    task_postrun.connect(log_context_end, weak=False)
    after_setup_logger.connect(_format_handlers(settings.log_format), weak=False)
    after_setup_task_logger.connect(_format_handlers(settings.log_format), weak=False)


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


def _format_handlers(log_format: str) -> Any:
    def receiver(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            if not any(isinstance(f, EnvelopeFilter) for f in handler.filters):
                handler.addFilter(EnvelopeFilter())
            if log_format == "json":
                handler.setFormatter(JsonFormatter())

    return receiver
