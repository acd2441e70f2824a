"""The envelope: IDs that sort by time, and headers checked on receipt."""

from __future__ import annotations

import uuid

import pytest

from postroom import Envelope, InvalidMessage, uuid7
from postroom.headers import PREFIX


def test_message_ids_are_uuid7_and_sort_by_creation_time() -> None:
    ids = [uuid7() for _ in range(50)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)  # the millisecond prefix


def test_a_new_conversation_is_correlated_by_its_first_message() -> None:
    env = Envelope.new("assets.RegisterAsset", 1, source="api")
    assert env.correlation_id == env.message_id
    assert env.causation_id is None


def test_headers_round_trip() -> None:
    env = Envelope.new(
        "assets.AssetRegistered", 2, source="assets", correlation_id=uuid7(), causation_id=uuid7()
    )
    assert Envelope.from_headers(env.to_headers()) == env


def test_missing_headers_are_named() -> None:
    headers = Envelope.new("a.B", 1, source="x").to_headers()
    del headers[PREFIX + "message_id"], headers[PREFIX + "source"]
    with pytest.raises(InvalidMessage, match=r"postroom\.message_id, postroom\.source"):
        Envelope.from_headers(headers)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("message_id", "not-a-uuid", "not a UUID"),
        ("correlation_id", 7, "not a UUID"),
        ("causation_id", "", "not a UUID"),
        ("version", "1", "not a positive integer"),
        ("version", True, "not a positive integer"),
        ("version", 0, "not a positive integer"),
        ("version", 1.0, "not a positive integer"),
        ("message_type", "", "non-empty string"),
        ("source", None, "non-empty string"),
        ("created_at", "yesterday", "ISO 8601"),
    ],
)
def test_malformed_headers_are_refused_with_the_reason(
    name: str, value: object, reason: str
) -> None:
    headers = Envelope.new("a.B", 1, source="x").to_headers()
    headers[PREFIX + name] = value
    with pytest.raises(InvalidMessage, match=rf"header postroom\.{name} is .*{reason}"):
        Envelope.from_headers(headers)


def test_other_headers_are_left_alone() -> None:
    env = Envelope.new("a.B", 1, source="x")
    assert Envelope.from_headers({**env.to_headers(), "task": "celery.whatever"}) == env


def test_a_message_without_a_cause_reads_as_having_none() -> None:
    headers = Envelope.new("a.B", 1, source="x", causation_id=uuid7()).to_headers()
    del headers[PREFIX + "causation_id"]
    assert Envelope.from_headers(headers).causation_id is None


def test_ids_are_kept_as_their_sender_wrote_them() -> None:
    headers = Envelope.new("a.B", 1, source="x").to_headers()
    headers[PREFIX + "message_id"] = shouted = uuid7().upper()
    assert Envelope.from_headers(headers).message_id == shouted


def test_headers_without_any_envelope_say_how_to_send_one() -> None:
    with pytest.raises(InvalidMessage, match="send it through postroom's bus"):
        Envelope.from_headers(None)


def test_every_malformed_header_is_named_at_once() -> None:
    headers = Envelope.new("a.B", 1, source="x").to_headers()
    headers[PREFIX + "version"], headers[PREFIX + "source"] = 0, ""
    with pytest.raises(InvalidMessage) as raised:
        Envelope.from_headers(headers)
    assert "postroom.version is not a positive integer: 0" in str(raised.value)
    assert "postroom.source is not a non-empty string: ''" in str(raised.value)
