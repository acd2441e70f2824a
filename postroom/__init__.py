"""postroom: the command / reply / event model of distributed messaging, made real on Celery."""

from postroom.bus import MessageBus, PendingReply
from postroom.errors import (
    ContractError,
    DuplicateHandler,
    InvalidMessage,
    PostroomError,
    Rejected,
    ReplyTimeout,
    TransientError,
    UnknownMessageType,
    WrongMessageKind,
)
from postroom.handlers import HandlerContext, RetryPolicy, handles
from postroom.headers import Envelope, uuid7
from postroom.messages import Command, ErrorInfo, Event, Query, Reply, upcaster
from postroom.subscribers import subscribes

#: the bus of Celery's current app: import your deployment's config module first
bus = MessageBus()

__all__ = [
    "Command",
    "ContractError",
    "DuplicateHandler",
    "Envelope",
    "ErrorInfo",
    "Event",
    "HandlerContext",
    "InvalidMessage",
    "MessageBus",
    "PendingReply",
    "PostroomError",
    "Query",
    "Rejected",
    "Reply",
    "ReplyTimeout",
    "RetryPolicy",
    "TransientError",
    "UnknownMessageType",
    "WrongMessageKind",
    "bus",
    "handles",
    "subscribes",
    "upcaster",
    "uuid7",
]
