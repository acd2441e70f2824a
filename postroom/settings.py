"""Every setting of a postroom deployment, read once from POSTROOM_* environment variables.

Each field names its variable, its default and what it means; the README's settings table lists
the same (a test keeps them in step). Every process of a deployment must read the same values:
the visibility timeout in particular is a property of the broker connection, not of one worker.

pydantic-settings reads and converts the variables (a boolean reads ``false``, ``0``, ``no`` and
``off`` as False); this module only words its errors for a person and keeps secrets out of reprs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from kombu.utils.url import maybe_sanitize_url
from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from postroom.errors import ConfigurationError
from postroom.topology import CLASSIC, QUORUM, QueueType

__all__ = ["Settings", "documented", "env_name"]

PREFIX = "POSTROOM_"

#: the variables Settings.from_env(environ) was given, read instead of os.environ
_environ: ContextVar[Mapping[str, str] | None] = ContextVar(
    "postroom_settings_environ", default=None
)


class Settings(BaseSettings):
    """One typed object holding every POSTROOM_* variable; build it with ``Settings()``."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, case_sensitive=False, frozen=True, extra="ignore"
    )

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="broker; `amqp://guest:guest@127.0.0.1:5672//` for RabbitMQ",
    )
    result_backend: str = Field(
        "redis://127.0.0.1:6379/1",
        description="where replies are stored, keyed by correlation ID (Redis)",
    )
    state_url: str = Field(
        "",
        description="Redis where the reference services keep their state; empty: the result backend's",
    )
    namespace: str = Field(
        "postroom",
        description="prefix of every Redis key postroom writes: broker queues (on Redis) and service state",
    )
    queue_type: QueueType = Field(
        "quorum",
        description="RabbitMQ only: the type of every queue postroom declares, `quorum` "
        "(replicated; RabbitMQ 3.8+) or `classic` (a broker without quorum queues); an existing "
        "queue cannot change type in place (see Delivery guarantees)",
    )
    visibility_timeout: int = Field(
        30,
        gt=0,
        description="Redis only: seconds a delivered message may go unacknowledged without a heartbeat "
        "of its worker (four per timeout) before it is delivered again; a dead worker's messages come "
        "back after about this, and a handler may run longer",
    )
    restore_interval: int = Field(
        5,
        gt=0,
        description="Redis only: seconds between the sweeps that give back messages past the visibility "
        "timeout (kombu's default is about 100 s)",
    )
    inbox_retention: int = Field(
        604800,
        description="seconds a consumer remembers a handled message ID (and a command's reply) to drop repeats",
    )
    event_log_url: str = Field(
        "",
        description="Redis holding the event log (a stream, Redis 6.2+); empty: the state Redis "
        "(`POSTROOM_STATE_URL`)",
    )
    event_log_retention: int = Field(
        2592000,
        description="seconds a published event stays in the event log, to be shown and replayed (30 days)",
    )
    poison_after: int = Field(
        3,
        description="deliveries that kill their worker before a message is dead-lettered as poison",
    )
    delivery_limit: int = Field(
        20,
        ge=0,
        description="RabbitMQ quorum queues only: deliveries after which the broker gives up on a "
        "message and dead-letters it into postroom's dead letters (reason `delivery-limit`), a "
        "backstop well above `POSTROOM_POISON_AFTER`; 0: no limit (see Dead letters)",
    )
    max_retries: int = Field(
        5,
        description="retries of a transient failure before the reply says failed (attempts = this + 1)",
    )
    retry_backoff: float = Field(
        1.0, description="seconds before the first retry; doubles each time, with jitter"
    )
    retry_backoff_max: float = Field(
        60.0, description="longest delay between two retries, in seconds"
    )
    breaker_failures: int = Field(
        0,
        ge=0,
        description="failures in a row that open a handler's circuit breaker (its messages then wait in "
        "the broker); 0 (and no `POSTROOM_BREAKER_RATIO`): a handler has a breaker only if it "
        "declares one (`@handles(..., breaker=...)`)",
    )
    breaker_cooldown: float = Field(
        30.0,
        gt=0,
        description="seconds an open circuit breaker holds its handler's messages before one runs as "
        "a probe",
    )
    breaker_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of a handler's runs in a window that, failed, opens its circuit breaker "
        "(once the window saw 10 runs); 0: failures in a row only",
    )
    breaker_window: float = Field(
        60.0, gt=0, description="seconds of the window `POSTROOM_BREAKER_RATIO` is counted over"
    )
    reply_ttl: int = Field(86400, description="seconds a reply is kept in the result backend")
    publish_retries: int = Field(
        10,
        ge=0,
        description="times a send retries when the broker connection fails or the broker does not "
        "confirm the message (a RabbitMQ node dying, a quorum queue electing a new leader), "
        "reconnecting to the next `;`-separated broker URL, 0.5 s longer between tries up to 2 s "
        "(about 15 s in all); then `postroom.SendFailed`, which says the broker may or may not "
        "hold the message: send it again with the same `message_id=`. `send_many` is not retried",
    )
    broker_heartbeat: float = Field(
        60.0,
        ge=0,
        description="RabbitMQ only: seconds of silence after which a worker and the broker give up "
        "on their connection (AMQP heartbeats; the smaller of this and the broker's own, 60 s by "
        "default, is used): a node cut off without closing "
        "its sockets is left within about this long, and the worker reconnects to the next "
        "`;`-separated broker URL. Lower it for faster failover with prefork workers; a solo "
        "worker cannot beat while its handler runs, so keep it above its longest handler's run. "
        "0 turns heartbeats off",
    )
    imports: str = Field(
        "", description="comma-separated extra modules holding handlers, imported by every worker"
    )
    flower_address: str = Field("127.0.0.1", description="address Flower listens on")
    flower_port: int = Field(
        5555, description="Flower's port for `postroom up` / `postroom flower`"
    )
    flower_basic_auth: str = Field(
        "",
        description="`user:password`; when set, Flower refuses requests without these credentials",
    )
    task_sent_events: bool = Field(
        True,
        description="send a task-sent event for each command, so Flower lists it from the moment it "
        "is sent; on Redis it goes in the command's own round trip, on RabbitMQ false saves a "
        "second confirmed publish per send",
    )
    metrics_address: str = Field(
        "127.0.0.1", description="address the Prometheus exporter (`postroom metrics`) listens on"
    )
    metrics_port: int = Field(
        9808, description="the Prometheus exporter's port for `postroom up` / `postroom metrics`"
    )
    signing_keys: str = Field(
        "",
        description="comma-separated secrets; when set, messages are signed (HMAC-SHA256) with the first and "
        "checked against all, and unsigned or tampered ones are dead-lettered",
    )
    partitions: int = Field(
        4,
        description="partition queues per service whose contracts declare a partition key; senders and "
        "workers must agree",
    )
    partition_lease: int = Field(
        10,
        description="seconds before a crashed worker's partition queues are taken over by the others",
    )
    outbox_grace: float = Field(
        10.0,
        description="seconds a committed outbox entry waits for its own worker to dispatch it "
        "before the outbox sweep sends it (its worker died in between)",
    )
    outbox_sweep: float = Field(
        5.0, description="seconds between two outbox sweeps of a worker; 0 turns its sweep off"
    )
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        description="PostgreSQL of the services that keep their state in SQL (the assets "
        "service): their rows, inbox and outbox commit in one transaction",
    )
    database_schema: str = Field(
        "", description="schema of those tables; empty: the database's default (`public`)"
    )
    log_level: str = Field("INFO", description="log level of workers and Flower")
    log_format: str = Field(
        "auto",
        description="`json`: one JSON object per log line, with the handled message's message_id, "
        "correlation_id and causation_id; `pretty`: one short coloured line per message handled, "
        "plus warnings and errors; `text`: Celery's usual lines; `auto`: `pretty` on a terminal, "
        "`json` otherwise",
    )
    tracing: str = Field(
        "",
        description="where OpenTelemetry spans go: empty (nowhere), `console`, or `otlp` (OTLP/HTTP to "
        "`OTEL_EXPORTER_OTLP_ENDPOINT`, default http://localhost:4318)",
    )
    api_host: str = Field(
        "127.0.0.1", description="address the HTTP API (`postroom api`) listens on"
    )
    api_port: int = Field(
        8000, description="the HTTP API's port for `postroom up` / `postroom api`"
    )
    api_reply_wait: float = Field(
        2.0,
        description="seconds `POST /assets` waits for the command's reply before answering 202 Accepted "
        "with a `/commands/{correlation_id}` to poll; 0 answers 202 at once",
    )
    api_query_timeout: float = Field(
        10.0,
        description="seconds a `GET` of the HTTP API waits for its query's reply before answering "
        "504 Gateway Timeout",
    )

    callback_allow: str = Field(
        "",
        description="comma-separated URL prefixes a `Postroom-Callback-Url` must start with "
        "(same scheme, host and port, a path at or below the prefix's); empty: callbacks are "
        "off, and a request asking for one is refused with 422",
    )
    callback_secret: str = Field(
        "",
        description="the secret callbacks are signed with (HMAC-SHA256 in `Postroom-Signature`); "
        "callbacks are off without it",
    )
    callback_timeout: float = Field(
        5.0,
        gt=0,
        description="seconds a callback POST may take, connecting and answering, before it "
        "counts as failed and is retried",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigurationError(_explain(error)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings read from ``environ`` instead of ``os.environ`` (the default)."""
        token = _environ.set(environ)
        try:
            return cls()
        finally:
            _environ.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _environ.get()
        if environ is not None:
            env_settings = _MappingSource(settings_cls, environ)
        return init_settings, env_settings

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
    def declared_queue_type(self) -> QueueType:
        """The type postroom declares its queues with: the setting's on RabbitMQ; on Redis, whose
        transport has no queue types, classic, so Celery sees no quorum queue there."""
        return CLASSIC if self.broker_is_redis else self.queue_type

    @property
    def declared_delivery_limit(self) -> int:
        """The delivery limit postroom declares its consumed queues with: the setting's on quorum
        queues; 0 (none) on classic ones, which have no delivery limit, and on Redis."""
        return self.delivery_limit if self.declared_queue_type == QUORUM else 0

    @property
    def extra_imports(self) -> list[str]:
        return [name.strip() for name in self.imports.split(",") if name.strip()]

    @property
    def signing_key_list(self) -> list[str]:
        return [k.strip() for k in self.signing_keys.split(",") if k.strip()]

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """What repr() and str() show: every field, with no password or key in it."""
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name.endswith(("_url", "_backend")):
                value = maybe_sanitize_url(value)
            elif name == "flower_basic_auth" and value:
                value = value.split(":", 1)[0] + ":**"
            elif name == "callback_secret" and value:
                value = "**"
            elif name == "signing_keys" and value:
                value = f"<{len(self.signing_key_list)} key(s)>"
            yield name, value


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' own environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._given = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # the hook pydantic-settings' own DotEnvSettingsSource overrides; names compare in lower
        # case because the settings are case-insensitive (as on os.environ)
        return {name.lower(): value for name, value in self._given.items()}


def _explain(error: ValidationError) -> str:
    """Each bad variable: its name, the value given and what the setting means."""
    problems = []
    for detail in error.errors(include_url=False):
        name = str(detail["loc"][0]) if detail["loc"] else ""
        field = Settings.model_fields.get(name)
        if field is None:
            problems.append(detail["msg"])
            continue
        if detail["type"] == "greater_than":
            bound = detail.get("ctx", {}).get("gt")
            problems.append(
                f"{env_name(name)}={detail['input']!r} must be greater than {bound}: "
                f"{field.description}"
            )
            continue
        if detail["type"] == "literal_error":
            expected = detail.get("ctx", {}).get("expected", "")
            problems.append(
                f"{env_name(name)}={detail['input']!r} must be {expected}: {field.description}"
            )
            continue
        kind = getattr(field.annotation, "__name__", str(field.annotation))
        if kind == "bool":
            kind = "bool (true/false, 1/0, yes/no, on/off)"
        problems.append(
            f"{env_name(name)}={detail['input']!r} is not a valid {kind}: {field.description}"
        )
    return "; ".join(problems)


def env_name(field_name: str) -> str:
    """The environment variable of a setting: ``max_retries`` is read from POSTROOM_MAX_RETRIES."""
    return f"{PREFIX}{field_name.upper()}"


def _shown(default: Any) -> str:
    # a boolean is documented as it is written in the environment
    return str(default).lower() if isinstance(default, bool) else str(default)


def documented() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting, in declaration order."""
    return [
        (env_name(name), _shown(field.default), field.description or "")
        for name, field in Settings.model_fields.items()
    ]
