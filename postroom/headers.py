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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError

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
#: on a command or query sent with ``reply_to``, and on the reply message it causes: the service or
#: pool whose ``@on_reply`` handler receives the reply (see postroom.pipeline.callback)
REPLY_TO = PREFIX + "reply_to"
#: on what a process manager's instance sends (postroom.processes), and on the reply it causes:
#: ``<process>:<key>``, the instance that the reply, or its own scheduled message, returns to
PROCESS = PREFIX + "process"


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
        try:
            checked = _EnvelopeHeaders.model_validate(headers or {})
        except ValidationError as error:
            raise InvalidMessage(_explain(error)) from None
        return cls(
            message_id=checked.message_id,
            correlation_id=checked.correlation_id,
            causation_id=checked.causation_id,
            message_type=checked.message_type,
            version=checked.version,
            source=checked.source,
            created_at=checked.created_at,
        )


def _uuid(value: str) -> str:
    uuid.UUID(value)  # kept as sent: an ID is compared as the string its sender chose
    return value


def _iso_8601(value: str) -> str:
    datetime.fromisoformat(value)
    return value


_Uuid = Annotated[str, Strict(), AfterValidator(_uuid)]
_Text = Annotated[str, Strict(), Field(min_length=1)]


class _EnvelopeHeaders(BaseModel):
    """The envelope's headers as received, each checked; a field's description is what it must be.

    Built once at import, so a received message costs one validation pass in pydantic-core; other
    headers (Celery's own) are ignored. ``strict`` refuses what a sender got wrong instead of
    converting it: a version of ``"1"`` or ``True`` is a bug upstream, not a version.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    message_id: _Uuid = Field(validation_alias=MESSAGE_ID, description="a UUID")
    correlation_id: _Uuid = Field(validation_alias=CORRELATION_ID, description="a UUID")
    causation_id: _Uuid | None = Field(None, validation_alias=CAUSATION_ID, description="a UUID")
    message_type: _Text = Field(validation_alias=MESSAGE_TYPE, description="a non-empty string")
    version: Annotated[int, Strict(), Field(gt=0)] = Field(
        validation_alias=VERSION, description="a positive integer"
    )
    source: _Text = Field(validation_alias=SOURCE, description="a non-empty string")
    created_at: Annotated[str, Strict(), AfterValidator(_iso_8601)] = Field(
        validation_alias=CREATED_AT, description="an ISO 8601 time"
    )


#: what each header must be, by header name
_MUST_BE = {str(f.validation_alias): f.description for f in _EnvelopeHeaders.model_fields.values()}


def _explain(error: ValidationError) -> str:
    """Every missing header in one sentence, then each malformed one with what it must be."""
    missing: list[str] = []
    malformed: dict[str, str] = {}
    for detail in error.errors(include_url=False):
        name = str(detail["loc"][0]) if detail["loc"] else "headers"
        if detail["type"] == "missing":
            missing.append(name)
        elif name in _MUST_BE:
            malformed.setdefault(
                name, f"header {name} is not {_MUST_BE[name]}: {detail['input']!r}"
            )
        else:  # the headers themselves are not a mapping
            malformed.setdefault(name, f"message headers are not a mapping: {detail['input']!r}")
    problems = list(malformed.values())
    if missing:
        problems.insert(
            0,
            f"message is missing the postroom header(s) {', '.join(missing)}: "
            "send it through postroom's bus so the envelope is set",
        )
    return "; ".join(problems)
