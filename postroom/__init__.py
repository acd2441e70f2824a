"""postroom: the command / reply / event model of distributed messaging, made real on Celery."""

from postroom.breakers import CircuitBreaker
from postroom.bus import MessageBus, PendingReply
from postroom.errors import (
    CallbackFailed,
    CallbackRefused,
    CircuitOpen,
    ConcurrentUpdate,
    ContractError,
    DuplicateHandler,
    InvalidMessage,
    InvalidSchedule,
    NotInstalled,
    OutOfLine,
    PostroomError,
    ProcessNotFound,
    RateLimited,
    Rejected,
    ReplyTimeout,
    SendFailed,
    TransientError,
    UnknownMessageType,
    WrongMessageKind,
)
from postroom.handlers import handles, on_reply, subscribes
from postroom.headers import Envelope, uuid7
from postroom.install import Installation, install, installation
from postroom.messages import (
    CircuitClosed,
    CircuitOpened,
    Command,
    ErrorInfo,
    Event,
    Query,
    Reply,
    upcaster,
)
from postroom.pipeline import Delivery, HandlerContext, Outcome, Step
from postroom.processes import CORRELATION, ProcessContext, ProcessManager
from postroom.ratelimits import RateLimit
from postroom.retries import RetryPolicy
from postroom.settings import Settings
from postroom.webhooks import DeliverWebhook

#: the bus of Celery's current app, which must have postroom installed (import your config first)
bus = MessageBus()

__all__ = [
    "CORRELATION",
    "CallbackFailed",
    "CallbackRefused",
    "CircuitBreaker",
    "CircuitClosed",
    "CircuitOpen",
    "CircuitOpened",
    "Command",
    "ConcurrentUpdate",
    "ContractError",
    "DeliverWebhook",
    "Delivery",
    "DuplicateHandler",
    "Envelope",
    "ErrorInfo",
    "Event",
    "HandlerContext",
    "Installation",
    "InvalidMessage",
    "InvalidSchedule",
    "MessageBus",
    "NotInstalled",
    "OutOfLine",
    "Outcome",
    "PendingReply",
    "PostroomError",
    "ProcessContext",
    "ProcessManager",
    "ProcessNotFound",
    "Query",
    "RateLimit",
    "RateLimited",
    "Rejected",
    "Reply",
    "ReplyTimeout",
    "RetryPolicy",
    "SendFailed",
    "Settings",
    "Step",
    "TransientError",
    "UnknownMessageType",
    "WrongMessageKind",
    "bus",
    "handles",
    "install",
    "installation",
    "on_reply",
    "subscribes",
    "upcaster",
    "uuid7",
]
