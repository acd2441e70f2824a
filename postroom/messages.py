"""Contracts: frozen, validated message types with stable names and schema versions.

A contract is a pydantic model that cannot change after construction (a correction is a new
message) and is validated twice: when the sender builds it and when the receiver decodes it. Its
stable type name, ``<service>.<ClassName>``, is what travels on the wire and names the Celery task,
so a sender needs only the contract, never the handler.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from postroom.errors import ContractError, InvalidMessage, UnknownMessageType

#: every concrete contract by its type name, so a receiver can decode what it is sent
_CONTRACTS: dict[str, type[Message]] = {}
#: per type name, the function turning a version-N payload into a version-N+1 payload
_UPCASTERS: dict[str, dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}

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
    #: the field whose value orders messages: same value, handled strictly in send order
    __partition_key__: ClassVar[str | None] = None

    def __init_subclass__(
        cls,
        *,
        service: str | None = None,
        version: int = 1,
        abstract: bool = False,
        allow_any_name: bool = False,
        partition_key: str | None = None,
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
        partition_key: str | None = None,
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
        if partition_key is not None and partition_key not in cls.model_fields:
            raise ContractError(
                f"{cls.__qualname__} declares partition_key={partition_key!r}, which is not one of "
                f"its fields ({', '.join(cls.model_fields) or 'none'}): name the field whose value "
                "groups the messages that must stay in order"
            )
        cls.__service__ = service
        cls.__message_version__ = version
        cls.__partition_key__ = partition_key
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


UpcasterFn = TypeVar("UpcasterFn", bound=Callable[[dict[str, Any]], dict[str, Any]])


def upcaster(contract: type[Message], *, from_version: int) -> Callable[[UpcasterFn], UpcasterFn]:
    """Register how a ``from_version`` payload of ``contract`` becomes a ``from_version + 1`` one.

    Messages written by the old version (still queued, dead-lettered, or in the event log) are
    upcast step by step on receipt, so a handler only ever sees the current version.
    """
    current = contract.__message_version__
    if not 1 <= from_version < current:
        raise ContractError(
            f"{contract.__name__} is at version {current}: an upcaster goes from a version "
            f"between 1 and {current - 1} to the next, not from {from_version}"
        )

    def register(fn: UpcasterFn) -> UpcasterFn:
        steps = _UPCASTERS.setdefault(contract.__message_type__, {})
        existing = steps.get(from_version)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise ContractError(
                f"{contract.__name__} already has an upcaster from version {from_version}: "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        steps[from_version] = fn
        return fn

    return register


def upcast(
    contract: type[Message | ReplyMessage], version: int, payload: dict[str, Any]
) -> dict[str, Any]:
    """``payload`` as written by ``version`` of the contract, brought to its current version;
    InvalidMessage for a version this process does not know (newer, or with a missing step)."""
    current = contract.__message_version__
    if version > current:
        raise InvalidMessage(
            f"{contract.__message_type__} version {version} is newer than this process knows "
            f"(version {current}): deploy the contract's new version to this pool, then redrive "
            "the message"
        )
    steps = _UPCASTERS.get(contract.__message_type__, {})
    for step in range(version, current):
        if step not in steps:
            raise InvalidMessage(
                f"{contract.__message_type__} version {version} cannot be read: no upcaster from "
                f"version {step} to {step + 1} is registered (@upcaster({contract.__name__}, "
                f"from_version={step}))"
            )
        try:
            payload = steps[step](dict(payload))
        except Exception as exc:
            raise InvalidMessage(
                f"{contract.__message_type__}: the upcaster from version {step} failed on this "
                f"payload ({type(exc).__name__}: {exc}); fix it and redrive the message"
            ) from exc
    return payload


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
    #: True: answered by the query's fallback while its circuit breaker was open, not by its
    #: handler (say, the last known answer: it may be out of date)
    fallback: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


class ReplyMessage(Reply):
    """A Reply delivered as a message to the pool its command or query named with ``reply_to``:
    what an ``@on_reply`` handler receives. One subclass per contract (``reply_contract``), whose
    type name, ``<contract type>.reply``, names its Celery task, so Flower shows each delivery."""

    __message_type__: ClassVar[str] = ""
    __message_version__: ClassVar[int] = 1
    __service__: ClassVar[str] = ""
    __partition_key__: ClassVar[str | None] = None  # replies are never partitioned


def reply_type(message_type: str) -> str:
    """The type name of the replies to ``message_type`` delivered as messages."""
    return f"{message_type}.reply"


@cache
def reply_contract(contract: type[Message]) -> type[ReplyMessage]:
    """The ReplyMessage subclass of ``contract``'s replies; the same class every time."""

    class Made(ReplyMessage):
        __message_type__ = reply_type(contract.__message_type__)
        __service__ = contract.__service__

    Made.__name__ = Made.__qualname__ = f"{contract.__name__}Reply"
    Made.__module__ = contract.__module__
    return Made


class CommandFailed(Event, service="postroom"):
    """A command failed for good (retries exhausted, a bug, or poison) and was dead-lettered."""

    command_type: str
    error_type: str
    error_message: str
    attempts: int


class CircuitOpened(Event, service="postroom"):
    """A handler's circuit breaker opened: its messages wait in the broker for ``cooldown`` s."""

    owner: str  # the service or pool running the handler
    message_type: str  # the type it handles
    failures: int  # failures in a row that opened it
    cooldown: float
    error_type: str  # the last failure's
    error_message: str


class CircuitClosed(Event, service="postroom"):
    """A handler's circuit breaker closed (its probe succeeded, or by hand): its backlog runs."""

    owner: str
    message_type: str
