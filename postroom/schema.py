"""Contracts as schemas: a JSON Schema per message and an AsyncAPI 3.0.0 document of the deployment.

A team that sends to or listens to postroom services should not need Python, or our source, to know
what a queue accepts. The contracts already are pydantic models, so their JSON Schemas are exact,
and the topology is derived from names (topology.py), so the channels can be described from the
same data the workers declare, instead of being hand-written and drifting.

Everything here describes what is loaded in this process: import the deployment's config first
(``postroom schema`` does), or the document describes nothing. Ownership follows the model: a
command or query is owned by the one service that handles it, an event by the service that
publishes it, a Reply by postroom itself.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal
from urllib.parse import urlsplit

import celery
import yaml
from pydantic import BaseModel, TypeAdapter

from postroom.errors import ContractError
from postroom.headers import PREFIX, Envelope

# _CONTRACTS is the receivers' decoding table: the one complete list of what is loaded.
from postroom.messages import _CONTRACTS, Reply, contract_for
from postroom.registry import registry
from postroom.signing import SIGNATURE
from postroom.topology import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    command_queue_name,
    event_queue_name,
    pool_of_event_queue,
)

ASYNCAPI_VERSION = "3.0.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
REPLY_TYPE = "postroom.Reply"
HEADERS_SCHEMA = "postroom.Headers"
REPLIES_CHANNEL = "replies"
_AMQP_BINDING_VERSION = "0.3.0"
_CORRELATION = "$message.header#/" + PREFIX + "correlation_id"

Format = Literal["yaml", "json"]

_KINDS = {
    "command": "asks the one service that owns it to do something; it may be rejected, and is "
    "answered with a postroom.Reply",
    "query": "asks the one service that owns it for data; answered with a postroom.Reply",
    "event": "a fact that happened, owned by the service that publishes it and broadcast to every "
    "subscriber pool",
    "reply": "the outcome of a command or query, stored in the result backend under its "
    "correlation ID",
}

#: header -> (JSON Schema format, meaning); Envelope's fields give the names and types
_HEADER_NOTES: dict[str, tuple[str | None, str]] = {
    "message_id": ("uuid", "new for every message; a UUIDv7, so IDs sort by time"),
    "correlation_id": ("uuid", "the conversation; a command's reply is stored under it"),
    "causation_id": ("uuid", "the message that caused this one; absent on a conversation's first"),
    "message_type": (None, "the contract's type name, <service>.<ClassName>"),
    "version": (None, "the contract's schema version"),
    "source": (None, "the service, pool or client that sent the message"),
    "created_at": ("date-time", "when the message was created, ISO 8601 in UTC"),
}


@dataclass(frozen=True)
class _Contract:
    name: str
    model: type[BaseModel]
    kind: str
    owner: str
    version: int


def _contracts() -> list[_Contract]:
    """Every loaded contract, by type name, then the Reply every command and query is answered with."""
    loaded = [
        _Contract(name, c, c.kind, c.__service__, c.__message_version__)
        for name, c in sorted(_CONTRACTS.items())
    ]
    return [*loaded, _Contract(REPLY_TYPE, Reply, "reply", "postroom", 1)]


def _annotations(contract: _Contract) -> dict[str, Any]:
    return {
        "x-postroom-type": contract.name,
        "x-postroom-kind": contract.kind,
        "x-owner": contract.owner,
        "x-postroom-version": contract.version,
    }


def json_schemas() -> dict[str, dict[str, Any]]:
    """Each loaded contract's JSON Schema (2020-12) by type name, with the Reply's.

    Each schema stands alone (nested models under ``$defs``), so one file is enough to validate a
    payload: the fields only, as they travel in the body, never the envelope.
    """
    return {
        c.name: {"$schema": JSON_SCHEMA_DIALECT, **c.model.model_json_schema(), **_annotations(c)}
        for c in _contracts()
    }


def headers_schema() -> dict[str, Any]:
    """The ``postroom.*`` headers every command, query and event carries: its envelope."""
    envelope = TypeAdapter(Envelope).json_schema()
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field, schema in envelope["properties"].items():
        schema.pop("title", None)
        fmt, meaning = _HEADER_NOTES.get(field, (None, ""))
        properties[PREFIX + field] = {
            **schema,
            **({"format": fmt} if fmt else {}),
            **({"description": meaning} if meaning else {}),
        }
        if {"type": "null"} not in schema.get("anyOf", []):  # what may be null may be absent
            required.append(PREFIX + field)
    properties[SIGNATURE] = {
        "type": "string",
        "pattern": "^[0-9a-f]{8}:[0-9a-f]{64}$",
        "description": "<key id>:<HMAC-SHA256>; present when POSTROOM_SIGNING_KEYS is set",
    }
    return {
        "type": "object",
        "description": "The envelope, in headers so a schema never grows transport fields. "
        "Celery adds headers of its own, hence additionalProperties.",
        "properties": properties,
        "required": required,
        "additionalProperties": True,
    }


def _component_schemas(contracts: list[_Contract]) -> dict[str, Any]:
    """Each payload schema by type name; nested models hoisted beside them, where refs point."""
    schemas: dict[str, Any] = {HEADERS_SCHEMA: headers_schema()}
    used_by: dict[str, str] = {}
    for c in contracts:
        schema = c.model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            if schemas.setdefault(name, definition) != definition:
                raise ContractError(
                    f"{c.name} and {used_by.get(name, name)} use two different models both named "
                    f"{name}; the AsyncAPI document keeps one schema per name: rename one of them"
                )
            used_by.setdefault(name, c.name)
        schemas[c.name] = {**schema, **_annotations(c)}
    return schemas


def _message(c: _Contract) -> dict[str, Any]:
    doc = inspect.cleandoc(c.model.__doc__ or "")
    message: dict[str, Any] = {
        "name": c.name,
        "title": c.model.__name__,
        "summary": f"A {c.kind}, owned by {c.owner}.",
        "description": "\n\n".join(filter(None, [doc, f"A {c.kind} {_KINDS[c.kind]}."])),
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{c.name}"},
        "traits": [{"$ref": f"#/components/messageTraits/{c.kind}"}],
        **_annotations(c),
    }
    if c.kind == "reply":
        message["correlationId"] = {"$ref": "#/components/correlationIds/reply"}
    else:
        message["headers"] = {"$ref": f"#/components/schemas/{HEADERS_SCHEMA}"}
        message["correlationId"] = {"$ref": "#/components/correlationIds/envelope"}
    return message


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


def _queue_binding(name: str) -> dict[str, Any]:
    queue = {"name": name, "durable": True, "exclusive": False, "autoDelete": False}
    return {"amqp": {"is": "queue", "queue": queue, "bindingVersion": _AMQP_BINDING_VERSION}}


def _command_side(contracts: list[_Contract]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A channel per service's command queue; the service receives there and replies."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    owned = [c for c in contracts if c.kind in ("command", "query")]
    for service in sorted({c.owner for c in owned}):
        queue = command_queue_name(service)
        mine = [c for c in owned if c.owner == service]
        channels[queue] = {
            "address": queue,
            "title": f"{service}: commands and queries",
            "description": f"Point-to-point: the durable queue {queue}, bound to the direct "
            f"exchange {COMMANDS_EXCHANGE.name} under its own name. The workers of the "
            f"{service} pool compete for each message; each is handled once.",
            "messages": {c.name: _ref("components", "messages", c.name) for c in mine},
            "bindings": _queue_binding(queue),
            "x-owner": service,
        }
        handled = [c for c in mine if registry.owner_of(c.name) is not None]
        if handled:
            operations[f"receive.{queue}"] = {
                "action": "receive",
                "channel": _ref("channels", queue),
                "title": f"{service} handles its commands and queries",
                "messages": [_ref("channels", queue, "messages", c.name) for c in handled],
                "reply": {
                    "address": {
                        "location": _CORRELATION,
                        "description": "the reply's key in the result backend",
                    },
                    "channel": _ref("channels", REPLIES_CHANNEL),
                    "messages": [_ref("channels", REPLIES_CHANNEL, "messages", REPLY_TYPE)],
                },
                "x-owner": service,
            }
    channels[REPLIES_CHANNEL] = {
        "address": None,
        "title": "Replies",
        "description": "The Celery result backend, keyed by the command's correlation ID (its "
        "task ID). A sender waits with pending.reply() or bus.reply_for(correlation_id).",
        "messages": {REPLY_TYPE: _ref("components", "messages", REPLY_TYPE)},
    }
    return channels, operations


def _declared_pools(app: celery.Celery) -> dict[str, list[str]]:
    """Each subscriber pool the app declares a queue for, with the event types bound to it."""
    pools: dict[str, list[str]] = {}
    for queue in app.conf.task_queues or []:
        pool = pool_of_event_queue(str(queue.name))
        if pool is not None:
            pools[pool] = sorted(str(b.routing_key) for b in queue.bindings)
    return pools


def _event_side(
    contracts: list[_Contract], pools: dict[str, list[str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A channel per event type on the events exchange, sent by its owner; a queue per pool."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    exchange = {
        "name": EVENTS_EXCHANGE.name,
        "type": EVENTS_EXCHANGE.type,
        "durable": True,
        "autoDelete": False,
    }
    for c in (c for c in contracts if c.kind == "event"):
        channel = f"{EVENTS_EXCHANGE.name}.{c.name}"
        copies = [event_queue_name(p) for p, types in sorted(pools.items()) if c.name in types]
        channels[channel] = {
            "address": c.name,
            "title": f"{c.name} on {EVENTS_EXCHANGE.name}",
            "description": f"Routing key {c.name} on the {EVENTS_EXCHANGE.type} exchange "
            f"{EVENTS_EXCHANGE.name}: every pool queue bound under it gets its own copy "
            f"({', '.join(copies) or 'no pool subscribes yet'}).",
            "messages": {c.name: _ref("components", "messages", c.name)},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": exchange,
                    "bindingVersion": _AMQP_BINDING_VERSION,
                }
            },
            "x-owner": c.owner,
        }
        operations[f"send.{c.name}"] = {
            "action": "send",
            "channel": _ref("channels", channel),
            "title": f"{c.owner} publishes {c.model.__name__}",
            "description": "Broadcast: the publisher never knows who listens.",
            "messages": [_ref("channels", channel, "messages", c.name)],
            "x-owner": c.owner,
        }
    for pool, types in sorted(pools.items()):
        for event_type in types:
            contract_for(event_type)  # UnknownMessageType, naming it, if nothing defines it
        queue = event_queue_name(pool)
        channels[queue] = {
            "address": queue,
            "title": f"{pool}: its copy of every event it subscribes to",
            "description": f"The durable queue of pool {pool}, bound to {EVENTS_EXCHANGE.name} under "
            f"{', '.join(types)}. The pool's workers compete for each copy; other pools have "
            "their own.",
            "messages": {t: _ref("components", "messages", t) for t in types},
            "bindings": _queue_binding(queue),
            "x-postroom-pool": pool,
        }
        operations[f"receive.{queue}"] = {
            "action": "receive",
            "channel": _ref("channels", queue),
            "title": f"{pool} reacts to {', '.join(types)}",
            "messages": [_ref("channels", queue, "messages", t) for t in types],
            "x-postroom-pool": pool,
        }
    return channels, operations


def _servers(app: celery.Celery) -> dict[str, Any]:
    """The broker, without its credentials: the document is meant to be shared."""
    url = urlsplit(str(app.conf.broker_url or "").split(";")[0])
    host = url.netloc.rpartition("@")[2]
    if not host:
        return {}
    protocol = {"pyamqp": "amqp", "librabbitmq": "amqp"}.get(url.scheme, url.scheme)
    server: dict[str, Any] = {"host": host, "protocol": protocol}
    if url.path.strip("/"):
        server["pathname"] = url.path
    return {"broker": server}


def _version() -> str:
    try:
        return metadata.version("postroom")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


def asyncapi(app: celery.Celery) -> dict[str, Any]:
    """The deployment as an AsyncAPI 3.0.0 document: channels, who sends or receives what, schemas.

    Channels: each service's command queue, one per event type on the events exchange (its
    routing key), each subscriber pool's queue, and the replies. Operations: each service receives
    on its command queue and replies; each event's owner sends it; each pool receives its events.
    """
    contracts = _contracts()
    command_channels, command_operations = _command_side(contracts)
    event_channels, event_operations = _event_side(contracts, _declared_pools(app))
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "postroom deployment",
            "version": _version(),
            "description": "Commands, queries, replies and events of this deployment. Each "
            "message travels as a Celery task message named by its type: the payload is the "
            "task's keyword arguments, the postroom.* headers its envelope. The AMQP bindings "
            "describe RabbitMQ; on Redis the publisher puts one copy of an event straight into "
            "each bound pool queue.",
        },
        "defaultContentType": "application/json",
        "servers": _servers(app),
        "channels": {**command_channels, **event_channels},
        "operations": {**command_operations, **event_operations},
        "components": {
            "schemas": _component_schemas(contracts),
            "messages": {c.name: _message(c) for c in contracts},
            "messageTraits": {
                kind: {"tags": [{"name": kind, "description": meaning}], "x-postroom-kind": kind}
                for kind, meaning in _KINDS.items()
            },
            "correlationIds": {
                "envelope": {"location": _CORRELATION, "description": "the conversation"},
                "reply": {
                    "location": "$message.payload#/correlation_id",
                    "description": "the correlation ID of the command or query answered",
                },
            },
        },
    }
    if not document["servers"]:
        del document["servers"]
    return document


class _PlainDumper(yaml.SafeDumper):
    """Writes a repeated value out again instead of as an anchor and alias, which readers trip on."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(document: dict[str, Any], fmt: Format = "yaml") -> str:
    """The document as YAML (what AsyncAPI tools expect first) or JSON, keys in document order."""
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    return str(
        yaml.dump(document, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=100)
    )
