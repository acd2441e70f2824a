"""Contracts as schemas: what `postroom schema` writes, checked the way another team would use it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import create_model

from config import settings
from config.celery import SERVICE_MODULES, app
from postroom import ContractError, Envelope, ErrorInfo, Reply, schema
from postroom.messages import _CONTRACTS, Command
from postroom.registry import Handler, registry
from postroom.topology import command_queue_name, event_queue_name, pool_of_event_queue
from tasks.assets import AssetRegistered, RegisterAsset
from workers.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """What `postroom schema` writes when run as a user runs it: a fresh process, in some directory."""
    cwd = tmp_path_factory.mktemp("deployment")
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "schema"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return cwd / "schema", done.stdout


@pytest.fixture(scope="module")
def document(written: tuple[Path, str]) -> dict[str, Any]:
    out, _ = written
    loaded: dict[str, Any] = yaml.safe_load((out / "asyncapi.yaml").read_text())
    return loaded


def _deployment_contracts() -> set[str]:
    """The contracts a fresh process of the deployment loads (tests here define more), and Reply."""
    modules = {*SERVICE_MODULES, *settings.extra_imports, "postroom.messages"}
    return {t for t, c in _CONTRACTS.items() if c.__module__ in modules} | {"postroom.Reply"}


def _deployment_handlers() -> list[Handler]:
    """The deployment's command and query handlers, without those that tests here register."""
    deployment = _deployment_contracts()
    return [h for h in registry.owners() if h.contract.__message_type__ in deployment]


def _schema_file(out: Path, message_type: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / f"{message_type}.schema.json").read_text())
    return loaded


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = document
    for escaped in ref[2:].split("/"):
        part = escaped.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref} does not resolve (at {part!r})"
        assert part in node, f"{ref} does not resolve (at {part!r})"
        node = node[part]
    return node


def test_schema_writes_a_file_per_contract_and_the_asyncapi_document_into_schema_by_default(
    written: tuple[Path, str],
) -> None:
    out, printed = written
    assert out.name == "schema"
    assert out.is_dir()
    files = sorted(p.name for p in out.iterdir())
    assert "asyncapi.yaml" in files
    for message_type in _deployment_contracts():
        assert f"{message_type}.schema.json" in files, f"no schema file for {message_type}"
    for name in files:  # it says what it wrote, every file
        assert f"postroom: wrote {Path('schema') / name}" in printed


def test_each_schema_file_is_a_json_schema_that_says_what_the_message_is_and_who_owns_it(
    written: tuple[Path, str],
) -> None:
    out, _ = written
    for message_type in _deployment_contracts():
        found = _schema_file(out, message_type)
        jsonschema.Draft202012Validator.check_schema(found)
        assert found["x-postroom-type"] == message_type
        assert found["x-owner"] == message_type.split(".")[0]
        assert found["x-postroom-kind"] in {"command", "query", "event", "reply"}
    assert _schema_file(out, "assets.RegisterAsset")["x-postroom-kind"] == "command"
    assert _schema_file(out, "assets.GetAsset")["x-postroom-kind"] == "query"
    assert _schema_file(out, "assets.AssetRegistered")["x-postroom-kind"] == "event"
    assert _schema_file(out, "postroom.Reply")["x-postroom-kind"] == "reply"


def test_a_real_payload_validates_against_its_schema_file(written: tuple[Path, str]) -> None:
    out, _ = written
    checker = jsonschema.FormatChecker()
    command = RegisterAsset(name="Truck 12", attributes={"fleet": "north"})
    event = AssetRegistered(asset_id=uuid.uuid4(), name="Truck 12", registered_at=datetime.now(UTC))
    reply = Reply(
        status="rejected",
        error=ErrorInfo(type="Rejected", message="no such asset"),
        correlation_id=str(uuid.uuid4()),
        message_id=str(uuid.uuid4()),
    )
    for message_type, instance in [
        ("assets.RegisterAsset", command.payload()),
        ("assets.AssetRegistered", event.payload()),
        ("postroom.Reply", reply.model_dump(mode="json")),
    ]:
        jsonschema.validate(instance, _schema_file(out, message_type), format_checker=checker)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({}, id="missing-name"),
        pytest.param({"name": ""}, id="empty-name"),
        pytest.param({"name": "Truck 12", "colour": "red"}, id="unknown-field"),
        pytest.param({"name": "Truck 12", "attributes": {"fleet": 7}}, id="wrong-type"),
    ],
)
def test_a_payload_the_contract_refuses_fails_its_schema_file_too(
    written: tuple[Path, str], payload: dict[str, Any]
) -> None:
    out, _ = written
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(payload, _schema_file(out, "assets.RegisterAsset"))
    with pytest.raises(ValueError, match="validation error"):  # pydantic agrees
        RegisterAsset.model_validate(payload)


def test_the_document_is_asyncapi_3_with_a_channel_per_command_queue_and_per_event_type(
    document: dict[str, Any],
) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"]
    assert document["info"]["version"]
    addresses = {c["address"] for c in document["channels"].values()}
    for service in {h.owner for h in _deployment_handlers()}:
        assert command_queue_name(service) in addresses, f"no channel for {service}'s queue"
    for message_type in _deployment_contracts() - {"postroom.Reply"}:
        if _CONTRACTS[message_type].kind == "event":
            assert message_type in addresses, f"no channel keyed by event type {message_type}"
    for queue in app.conf.task_queues:
        if pool_of_event_queue(queue.name):
            assert queue.name in addresses, f"no channel for pool queue {queue.name}"


def test_every_ref_in_the_document_resolves_and_every_message_named_is_a_component(
    document: dict[str, Any],
) -> None:
    refs = list(_refs(document))
    assert refs
    for ref in refs:
        _resolve(document, ref)
    messages = document["components"]["messages"]
    for channel in document["channels"].values():
        for ref in channel.get("messages", {}).values():
            assert ref["$ref"].startswith("#/components/messages/")
            assert ref["$ref"].rpartition("/")[2] in messages
    for message in messages.values():
        _resolve(document, message["payload"]["$ref"])


def test_each_operation_names_a_channel_and_only_messages_of_that_channel(
    document: dict[str, Any],
) -> None:
    for name, operation in document["operations"].items():
        assert operation["action"] in {"send", "receive"}, name
        channel_ref = operation["channel"]["$ref"]
        channel = _resolve(document, channel_ref)
        assert operation["messages"], f"{name} names no message"
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), (name, message)
            _resolve(document, message["$ref"])
        if "reply" in operation:
            reply_channel = operation["reply"]["channel"]["$ref"]
            for message in operation["reply"]["messages"]:
                assert message["$ref"].startswith(reply_channel + "/messages/")
        assert channel


def test_a_command_is_owned_by_its_service_which_receives_it_on_its_queue_and_replies(
    document: dict[str, Any],
) -> None:
    for handler in _deployment_handlers():
        message_type = handler.contract.__message_type__
        queue = command_queue_name(handler.owner)
        message = document["components"]["messages"][message_type]
        assert message["x-owner"] == handler.owner == handler.contract.__service__
        assert message["x-postroom-kind"] == handler.contract.kind
        assert message["headers"] == {"$ref": "#/components/schemas/postroom.Headers"}
        receive = document["operations"][f"receive.{queue}"]
        assert receive["action"] == "receive"
        assert receive["x-owner"] == handler.owner
        assert {"$ref": f"#/channels/{queue}/messages/{message_type}"} in receive["messages"]
        replied = receive["reply"]["messages"]
        assert [_resolve(document, m["$ref"]) for m in replied] == [
            {"$ref": "#/components/messages/postroom.Reply"}
        ]


def test_each_event_is_sent_by_its_owner_and_received_by_every_pool_subscribed(
    document: dict[str, Any],
) -> None:
    operations = document["operations"]
    send = operations["send.assets.AssetRegistered"]
    assert send["action"] == "send"
    assert send["x-owner"] == "assets"
    assert _resolve(document, send["channel"]["$ref"])["address"] == "assets.AssetRegistered"
    for queue in app.conf.task_queues:
        pool = pool_of_event_queue(queue.name)
        if pool is None:
            continue
        receive = operations[f"receive.{event_queue_name(pool)}"]
        assert receive["action"] == "receive"
        assert receive["x-postroom-pool"] == pool
        received = {m["$ref"].rpartition("/")[2] for m in receive["messages"]}
        assert received == {b.routing_key for b in queue.bindings}


def test_messages_say_whether_they_are_a_command_a_query_or_an_event(
    document: dict[str, Any],
) -> None:
    messages = document["components"]["messages"]
    traits = document["components"]["messageTraits"]
    for message_type, kind in [
        ("assets.RegisterAsset", "command"),
        ("assets.GetAsset", "query"),
        ("assets.AssetRegistered", "event"),
        ("postroom.Reply", "reply"),
    ]:
        message = messages[message_type]
        assert message["x-postroom-kind"] == kind
        assert message["traits"] == [{"$ref": f"#/components/messageTraits/{kind}"}]
        assert traits[kind]["tags"][0]["name"] == kind
        assert f"A {kind} " in message["description"]


def test_the_headers_schema_accepts_a_real_envelope_and_refuses_one_without_ids(
    document: dict[str, Any],
) -> None:
    headers_schema = document["components"]["schemas"]["postroom.Headers"]
    checker = jsonschema.FormatChecker()
    envelope = Envelope.new("assets.RegisterAsset", 1, source="client")
    headers = {**envelope.to_headers(), "task": "assets.RegisterAsset"}  # Celery's own, too
    jsonschema.validate(headers, headers_schema, format_checker=checker)
    del headers["postroom.message_id"]
    with pytest.raises(jsonschema.ValidationError, match=r"postroom\.message_id"):
        jsonschema.validate(headers, headers_schema, format_checker=checker)


def test_a_payload_validates_through_the_document_too_nested_models_included(
    document: dict[str, Any],
) -> None:
    """The refs inside payload schemas point into the document, as AsyncAPI tools resolve them."""
    reply = Reply(
        status="failed",
        error=ErrorInfo(type="TransientError", message="try later"),
        correlation_id=str(uuid.uuid4()),
        message_id=str(uuid.uuid4()),
    ).model_dump(mode="json")
    through = {"$ref": "#/components/schemas/postroom.Reply", "components": document["components"]}
    jsonschema.validate(reply, through)
    reply["error"] = {"type": "TransientError"}
    with pytest.raises(jsonschema.ValidationError, match="'message' is a required property"):
        jsonschema.validate(reply, through)


def test_stdout_prints_the_document_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["schema", "--stdout", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(schema.asyncapi(app)))
    assert list(tmp_path.iterdir()) == []


def test_the_document_names_the_broker_without_its_credentials(document: dict[str, Any]) -> None:
    for server in document.get("servers", {}).values():
        assert "@" not in server["host"]
    rabbit = SimpleNamespace(
        conf=SimpleNamespace(
            broker_url="amqp://guest:secret@rabbit.local:5672//",
            task_queues=app.conf.task_queues,
        )
    )
    described = schema.asyncapi(rabbit)
    assert described["servers"] == {"broker": {"host": "rabbit.local:5672", "protocol": "amqp"}}
    assert "secret" not in json.dumps(described)


def test_two_different_nested_models_of_one_name_are_refused_naming_both() -> None:
    point_xy = create_model("Point", x=(float, ...))
    point_lat = create_model("Point", lat=(float, ...))
    saved = dict(_CONTRACTS)
    try:

        class PlaceMarker(Command, service="maps_a"):
            at: point_xy  # type: ignore[valid-type]

        class DropPin(Command, service="maps_b"):
            at: point_lat  # type: ignore[valid-type]

        with pytest.raises(
            ContractError, match=r"maps_b\.DropPin and maps_a\.PlaceMarker .* both named Point"
        ):
            schema.asyncapi(app)
    finally:
        _CONTRACTS.clear()
        _CONTRACTS.update(saved)
