"""The envelope: identity and tracing, carried in message headers rather than in the payload.

The payload belongs to the contract's owner; the envelope belongs to the messaging. Keeping them
apart means a schema never grows transport fields, and a header can be read without decoding the
body. Header names carry a ``postroom.`` prefix so they cannot collide with Celery's own
(``correlation_id`` is already an AMQP property Celery sets to the task id).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from postroom.errors import InvalidMessage

PREFIX = "postroom."
MESSAGE_ID = PREFIX + "message_id"
CORRELATION_ID = PREFIX + "correlation_id"
CAUSATION_ID = PREFIX + "causation_id"
MESSAGE_TYPE = PREFIX + "message_type"
VERSION = PREFIX + "version"
SOURCE = PREFIX + "source"
CREATED_AT = PREFIX + "created_at"
#: on a forced replay only (``postroom events replay --force``): makes it a new delivery, run again
REPLAY = PREFIX + "replay"


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds then random bits, so IDs sort by time.

    Formatted from the integer directly: building a ``uuid.UUID`` first doubled the cost, and a
    bulk send makes one per message.
    """
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & (2**48 - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a
    value |= 0b10 << 62  # variant
    value |= rand & (2**62 - 1)  # rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a message is, where it came from and which conversation it belongs to."""

    message_id: str
    correlation_id: str
    causation_id: str | None
    message_type: str
    version: int
    source: str
    created_at: str

    @classmethod
    def new(
        cls,
        message_type: str,
        version: int,
        *,
        source: str,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        message_id: str | None = None,
    ) -> Envelope:
        """A fresh envelope; a message that starts a conversation is its own correlation."""
        message_id = message_id or uuid7()
        return cls(
            message_id=message_id,
            correlation_id=correlation_id or message_id,
            causation_id=causation_id,
            message_type=message_type,
            version=version,
            source=source,
            created_at=datetime.now(UTC).isoformat(),
        )

    def summary(self) -> str:
        """The IDs in one line: shown as a task's args in Flower and logs, so they can be searched.

        The correlation ID comes first: it is what a person follows, and Flower's narrow args
        column shows only the start.
        """
        return (
            f"correlation_id={self.correlation_id} message_id={self.message_id} "
            f"causation_id={self.causation_id}"
        )

    def to_headers(self) -> dict[str, Any]:
        return {
            MESSAGE_ID: self.message_id,
            CORRELATION_ID: self.correlation_id,
            CAUSATION_ID: self.causation_id,
            MESSAGE_TYPE: self.message_type,
            VERSION: self.version,
            SOURCE: self.source,
            CREATED_AT: self.created_at,
        }

    @classmethod
    def from_headers(cls, headers: dict[str, Any] | None) -> Envelope:
        """Read and check the envelope of a received message; raise InvalidMessage if it is not one."""
        headers = headers or {}
        missing = [
            PREFIX + f.name
            for f in fields(cls)
            if PREFIX + f.name not in headers and f.name != "causation_id"
        ]
        if missing:
            raise InvalidMessage(
                f"message is missing the postroom header(s) {', '.join(missing)}: "
                "send it through postroom's bus so the envelope is set"
            )
        values = {f.name: headers.get(PREFIX + f.name) for f in fields(cls)}
        for name in ("message_id", "correlation_id", "causation_id"):
            value = values[name]
            if value is None and name == "causation_id":
                continue
            try:
                uuid.UUID(str(value))
            except ValueError:
                raise InvalidMessage(f"header {PREFIX}{name} is not a UUID: {value!r}") from None
        version = values["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidMessage(f"header {PREFIX}version is not a positive integer: {version!r}")
        for name in ("message_type", "source", "created_at"):
            if not isinstance(values[name], str) or not values[name]:
                raise InvalidMessage(f"header {PREFIX}{name} is not a non-empty string")
        try:
            datetime.fromisoformat(str(values["created_at"]))
        except ValueError:
            raise InvalidMessage(
                f"header {PREFIX}created_at is not an ISO 8601 time: {values['created_at']!r}"
            ) from None
        return cls(**values)  # type: ignore[arg-type]  # each value was checked above
