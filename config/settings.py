"""Every setting of a postroom deployment, read once from POSTROOM_* environment variables.

Each field names its variable, its default and what it means; the README's settings table lists
the same (a test keeps them in step). Every process of a deployment must read the same values:
the visibility timeout in particular is a property of the broker connection, not of one worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kombu.utils.url import maybe_sanitize_url


def _setting(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Settings:
    broker_url: str = _setting(
        "redis://127.0.0.1:6379/0",
        "broker; `amqp://guest:guest@127.0.0.1:5672//` for RabbitMQ",
    )
    result_backend: str = _setting(
        "redis://127.0.0.1:6379/1", "where replies are stored, keyed by correlation ID (Redis)"
    )
    state_url: str = _setting(
        "", "Redis where the reference services keep their state; empty: the result backend's"
    )
    namespace: str = _setting(
        "postroom",
        "prefix of every Redis key postroom writes: broker queues (on Redis) and service state",
    )
    visibility_timeout: int = _setting(
        600,
        "seconds before Redis redelivers an unacknowledged message; must exceed the longest "
        "handler run plus the longest retry delay",
    )
    restore_interval: int = _setting(
        10,
        "Redis only: seconds between the sweeps that give expired unacknowledged messages back "
        "(kombu's default is about 100 s)",
    )
    inbox_retention: int = _setting(
        604800,
        "seconds a consumer remembers a handled message ID (and a command's reply) to drop repeats",
    )
    event_log_url: str = _setting(
        "",
        "Redis holding the event log (a stream, Redis 6.2+); empty: the state Redis "
        "(`POSTROOM_STATE_URL`)",
    )
    event_log_retention: int = _setting(
        2592000,
        "seconds a published event stays in the event log, to be shown and replayed (30 days)",
    )
    poison_after: int = _setting(
        3, "deliveries that kill their worker before a message is dead-lettered as poison"
    )
    max_retries: int = _setting(
        5, "retries of a transient failure before the reply says failed (attempts = this + 1)"
    )
    retry_backoff: float = _setting(
        1.0, "seconds before the first retry; doubles each time, with jitter"
    )
    retry_backoff_max: float = _setting(60.0, "longest delay between two retries, in seconds")
    reply_ttl: int = _setting(86400, "seconds a reply is kept in the result backend")
    imports: str = _setting(
        "", "comma-separated extra modules holding handlers, imported by every worker"
    )
    flower_address: str = _setting("127.0.0.1", "address Flower listens on")
    flower_port: int = _setting(5555, "Flower's port for `postroom up` / `postroom flower`")
    flower_basic_auth: str = _setting(
        "", "`user:password`; when set, Flower refuses requests without these credentials"
    )
    metrics_address: str = _setting(
        "127.0.0.1", "address the Prometheus exporter (`postroom metrics`) listens on"
    )
    metrics_port: int = _setting(
        9808, "the Prometheus exporter's port for `postroom up` / `postroom metrics`"
    )
    signing_keys: str = _setting(
        "",
        "comma-separated secrets; when set, messages are signed (HMAC-SHA256) with the first and "
        "checked against all, and unsigned or tampered ones are dead-lettered",
    )
    partitions: int = _setting(
        4,
        "partition queues per service whose contracts declare a partition key; senders and "
        "workers must agree",
    )
    partition_lease: int = _setting(
        10, "seconds before a crashed worker's partition queues are taken over by the others"
    )
    log_level: str = _setting("INFO", "log level of workers and Flower")
    log_format: str = _setting(
        "json",
        "`json`: one JSON object per log line, with the handled message's message_id, "
        "correlation_id and causation_id; `text`: Celery's usual lines",
    )
    tracing: str = _setting(
        "",
        "where OpenTelemetry spans go: empty (nowhere), `console`, or `otlp` (OTLP/HTTP to "
        "`OTEL_EXPORTER_OTLP_ENDPOINT`, default http://localhost:4318)",
    )
    api_host: str = _setting("127.0.0.1", "address the HTTP API (`postroom api`) listens on")
    api_port: int = _setting(8000, "the HTTP API's port for `postroom up` / `postroom api`")
    api_reply_wait: float = _setting(
        2.0,
        "seconds `POST /assets` waits for the command's reply before answering 202 Accepted "
        "with a `/commands/{correlation_id}` to poll; 0 answers 202 at once",
    )
    api_query_timeout: float = _setting(
        10.0,
        "seconds a `GET` of the HTTP API waits for its query's reply before answering "
        "504 Gateway Timeout",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None:
                continue
            try:
                values[f.name] = type(f.default)(raw)
            except ValueError:
                raise ValueError(
                    f"{env_name(f.name)}={raw!r} is not a valid {type(f.default).__name__}: "
                    f"{f.metadata['doc']}"
                ) from None
        return cls(**values)

    @property
    def state(self) -> str:
        return self.state_url or self.result_backend

    @property
    def event_log(self) -> str:
        return self.event_log_url or self.state

    @property
    def broker_is_redis(self) -> bool:
        return self.broker_url.startswith(("redis://", "rediss://", "redis+socket://"))

    @property
    def extra_imports(self) -> list[str]:
        return [name.strip() for name in self.imports.split(",") if name.strip()]

    @property
    def signing_key_list(self) -> list[str]:
        return [k.strip() for k in self.signing_keys.split(",") if k.strip()]

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_url", "_backend")):
                value = maybe_sanitize_url(value)
            elif f.name == "flower_basic_auth" and value:
                value = value.split(":", 1)[0] + ":**"
            elif f.name == "signing_keys" and value:
                value = f"<{len(self.signing_key_list)} key(s)>"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def env_name(field_name: str) -> str:
    return f"POSTROOM_{field_name.upper()}"


def documented() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting, in declaration order."""
    return [(env_name(f.name), str(f.default), f.metadata["doc"]) for f in fields(Settings)]


settings = Settings.from_env()
