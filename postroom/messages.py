"""Contracts: frozen, validated message types with stable names and schema versions.

A contract is a pydantic model that cannot change after construction (a correction is a new
message) and is validated twice: when the sender builds it and when the receiver decodes it. Its
stable type name, ``<service>.<ClassName>``, is what travels on the wire and names the Celery task,
so a sender needs only the contract, never the handler.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from postroom.errors import ContractError, UnknownMessageType

#: every concrete contract by its type name, so a receiver can decode what it is sent
_CONTRACTS: dict[str, type[Message]] = {}

_IRREGULAR_PAST = frozenset(
    [
        "bound",
        "built",
        "bought",
        "brought",
        "caught",
        "chosen",
        "done",
        "drawn",
        "driven",
        "found",
        "frozen",
        "given",
        "gone",
        "grown",
        "held",
        "hidden",
        "kept",
        "known",
        "laid",
        "led",
        "left",
        "lent",
        "lost",
        "made",
        "meant",
        "met",
        "paid",
        "put",
        "read",
        "run",
        "said",
        "seen",
        "sent",
        "set",
        "shown",
        "shut",
        "sold",
        "spent",
        "split",
        "spoken",
        "stolen",
        "struck",
        "taken",
        "taught",
        "thrown",
        "told",
        "torn",
        "understood",
        "withdrawn",
        "won",
        "written",
        "begun",
        "broken",
        "forgotten",
        "undone",
        "rebuilt",
        "rewritten",
        "reset",
    ]
)


def _looks_past_tense(class_name: str) -> bool:
    words = [w.lower() for w in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", class_name)]
    return any(w.endswith("ed") or w in _IRREGULAR_PAST for w in words)


class Message(BaseModel):
    """Base of every contract: immutable, strict about unknown fields, named and versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ClassVar[str] = "message"
    __message_type__: ClassVar[str] = ""
    __message_version__: ClassVar[int] = 1
    __service__: ClassVar[str] = ""

    def __init_subclass__(
        cls,
        *,
        service: str | None = None,
        version: int = 1,
        abstract: bool = False,
        allow_any_name: bool = False,
        **kwargs: Any,
    ) -> None:
        # The keywords are consumed by __pydantic_init_subclass__, which runs once fields exist.
        super().__init_subclass__(**kwargs)

    @classmethod
    def __pydantic_init_subclass__(
        cls,
        *,
        service: str | None = None,
        version: int = 1,
        abstract: bool = False,
        allow_any_name: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if abstract:
            return
        if cls.kind == "message":
            raise ContractError(
                f"{cls.__qualname__} derives from Message directly: derive from Command, Query "
                "or Event so postroom knows how to route it"
            )
        if service is None:
            service = cls.__module__.rsplit(".", 1)[-1]
            if service == "__main__":
                raise ContractError(
                    f"{cls.__qualname__} is defined in __main__: name its owner explicitly, "
                    f"e.g. class {cls.__name__}({cls.kind.capitalize()}, service='assets')"
                )
        if not re.fullmatch(r"[a-z][a-z0-9_]*", service):
            raise ContractError(
                f"service name {service!r} of {cls.__qualname__} must be lower_snake_case"
            )
        if not isinstance(version, int) or version < 1:
            raise ContractError(f"{cls.__qualname__}: version must be a positive integer")
        if cls.kind == "event" and not allow_any_name and not _looks_past_tense(cls.__name__):
            raise ContractError(
                f"event {cls.__name__} is not named in the past tense: events are facts that "
                f"happened (AssetRegistered, DeviceBound). If {cls.__name__} asks for something "
                "to be done, make it a Command; if the name is right, declare it with "
                "allow_any_name=True"
            )
        cls.__service__ = service
        cls.__message_version__ = version
        cls.__message_type__ = f"{service}.{cls.__name__}"
        _register_contract(cls)

    def payload(self) -> dict[str, Any]:
        """The message's fields as JSON-ready data: what travels in the body, nothing else."""
        return self.model_dump(mode="json")


def _register_contract(cls: type[Message]) -> None:
    existing = _CONTRACTS.get(cls.__message_type__)
    same = existing is not None and (existing.__module__, existing.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if existing is not None and not same:
        raise ContractError(
            f"two contracts claim the type name {cls.__message_type__}: "
            f"{existing.__module__}.{existing.__qualname__} and {cls.__module__}.{cls.__qualname__}; "
            "rename one or give it another service"
        )
    _CONTRACTS[cls.__message_type__] = cls


def contract_for(message_type: str) -> type[Message]:
    """The contract class for a type name, or UnknownMessageType naming what is known."""
    try:
        return _CONTRACTS[message_type]
    except KeyError:
        raise UnknownMessageType(
            f"no contract named {message_type!r} is loaded in this process; "
            "import the module that defines it"
        ) from None


class Command(Message, abstract=True):
    """Asks the one service that owns it to do something; may be rejected. Name it imperatively."""

    kind: ClassVar[str] = "command"


class Query(Message, abstract=True):
    """Asks the one service that owns it for data; answered with a Reply like a command."""

    kind: ClassVar[str] = "query"


class Event(Message, abstract=True):
    """An immutable fact, broadcast to every subscriber pool. Name it in the past tense."""

    kind: ClassVar[str] = "event"


class ErrorInfo(BaseModel):
    """Why a command was rejected or failed, in terms the sender can act on."""

    model_config = ConfigDict(frozen=True)

    type: str
    message: str


class Reply(BaseModel):
    """The outcome of a command or query, stored in the result backend under its correlation ID."""

    model_config = ConfigDict(frozen=True)

    status: Literal["succeeded", "rejected", "failed"]
    value: Any = None
    error: ErrorInfo | None = None
    correlation_id: str
    message_id: str
    causation_id: str | None = None
    message_type: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


class CommandFailed(Event, service="postroom"):
    """A command failed for good (retries exhausted, a bug, or poison) and was dead-lettered."""

    command_type: str
    error_type: str
    error_message: str
    attempts: int
