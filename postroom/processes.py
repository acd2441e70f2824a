"""Process managers: a flow that spans services, waits for their replies and events, and acts when
one never comes (seed 004's order "conductor", and its "plan for failure").

```
                  starts                 handles, on_reply, its own timeouts           ends
 OrderPaid ──> ( instance fulfilment:<order_id> ) ── NotifyVendor ──────────> vendors
                 state · pending · steps          <── VendorConfirmed ──────── completed
                                                  <── VendorSilent (broker-held, 30 s later)
                                                       └─ CancelOrder, RefundPayment ── compensated
```

A ``ProcessManager`` is a pool whose handlers run against one **instance** each, found by a key
(a field of the message, or its correlation ID; a reply to what the instance sent, or a message it
sent itself, finds it by the ``postroom.process`` header it carries back). The instance's state
is a pydantic model; it is loaded before the handler runs and written back with the handling's
inbox mark and outbox (postroom.instances): the state, the messages it sent and the fact that the
message was handled commit together or not at all, in the pool's store (Redis, or SQL with
``stores={pool: SqlStore}``). A message of an instance that another message changed meanwhile
runs again against the new state (ConcurrentUpdate), so each instance handles one message at a
time in effect, with no lock held across a handler.

A timeout is a command the process sends itself with ``ctx.schedule(..., delay=...)``: the broker
holds it (postroom._celery.delays), and the instance remembers it as pending. It fires once: its
message ID is derived, so the inbox drops a copy, and when it arrives after the instance ended
or cancelled it (``ctx.cancel``) it is ignored. A message for an ended instance is ignored (a
command is rejected), and recorded among its steps; one for an instance not started yet is
retried with backoff, then dead-lettered (ProcessNotFound).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from postroom.errors import (
    ContractError,
    InvalidMessage,
    InvalidSchedule,
    ProcessNotFound,
    Rejected,
    WrongMessageKind,
)
from postroom.handlers import handles, on_reply, subscribes
from postroom.headers import PROCESS
from postroom.instances import Instance
from postroom.messages import Command, Event, Message, Query

if TYPE_CHECKING:
    from postroom.pipeline.context import HandlerContext
    from postroom.pipeline.delivery import Delivery
    from postroom.stores import InboxStore

S = TypeVar("S", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])


class _Correlation:
    def __repr__(self) -> str:
        return "CORRELATION"


#: ``key=CORRELATION``: the instance is the message's conversation (its correlation ID)
CORRELATION = _Correlation()
Key = str | Callable[[Any], object] | _Correlation

#: every process manager of this process by name (``postroom processes`` lists their instances)
_MANAGERS: dict[str, ProcessManager[Any]] = {}


def managers() -> list[ProcessManager[Any]]:
    return sorted(_MANAGERS.values(), key=lambda m: m.name)


def manager_named(name: str) -> ProcessManager[Any]:
    """The process manager called ``name``; LookupError naming the known ones."""
    try:
        return _MANAGERS[name]
    except KeyError:
        known = ", ".join(m.name for m in managers()) or "none (import the modules declaring them)"
        raise LookupError(f"no process manager is named {name!r}; known: {known}") from None


@dataclass(frozen=True)
class _Route:
    """How one message type reaches the process: its handler and how its instance is found."""

    fn: Callable[..., Any]
    key: Key | None
    starts: bool


class ProcessManager(Generic[S]):
    """A process manager named ``name``, running in pool ``pool`` (default: its name), whose
    instances keep a ``state`` model. Declare its handlers with ``starts``, ``handles`` and
    ``on_reply``; each is ``fn(message, ctx: ProcessContext)``."""

    name: str
    pool: str
    state: type[S]

    def __init__(self, name: str, *, state: type[S], pool: str | None = None) -> None:
        for what, value in (("name", name), ("pool", pool or name)):
            if not re.fullmatch(r"[a-z][a-z0-9_]*", value):
                raise ContractError(
                    f"a process manager's {what} must be lower_snake_case, not {value!r}"
                )
        if not (isinstance(state, type) and issubclass(state, BaseModel)):
            raise ContractError(
                f"process manager {name!r}: state= takes a pydantic model class, not {state!r}"
            )
        existing = _MANAGERS.get(name)
        if existing is not None and existing.state is not state:
            raise ContractError(
                f"two process managers are named {name!r} (states {existing.state.__qualname__} "
                f"and {state.__qualname__}): rename one"
            )
        self.name = name
        self.pool = pool or name
        self.state = state
        self._routes: dict[str, _Route] = {}
        _MANAGERS[name] = self

    def __repr__(self) -> str:
        return f"ProcessManager({self.name!r}, pool={self.pool!r})"

    def starts(self, contract: type[Command | Event], *, key: Key) -> Callable[[F], F]:
        """``fn`` starts an instance, keyed by ``key`` (a field's name, a function of the
        message, or CORRELATION). One that arrives for an instance already started is ignored
        (an event) or rejected (a command): a start runs once per key."""
        return self._route(contract, key, starts=True)

    def handles(
        self, contract: type[Command | Event], *, key: Key | None = None
    ) -> Callable[[F], F]:
        """``fn`` handles a message of a running instance. ``key`` finds it; a command the
        process sends itself (a timeout) needs none, since it carries its instance's address."""
        if key is None and not issubclass(contract, Command):
            raise ContractError(
                f"{self.name}.handles({contract.__name__}) needs key=: an event carries no "
                "instance's address; name the field that holds the key, e.g. key='order_id'"
            )
        return self._route(contract, key, starts=False)

    def on_reply(self, contract: type[Command | Query]) -> Callable[[F], F]:
        """``fn(reply, ctx)`` handles the reply to a ``contract`` this process sent with
        ``ctx.send(..., reply_to=True)``; the reply finds its instance by the address it
        carries back."""

        def decorate(fn: F) -> F:
            route = _Route(fn, None, starts=False)
            on_reply(contract, pool=self.pool)(self._wrap(route))
            return fn

        return decorate

    def _route(
        self, contract: type[Command | Event], key: Key | None, *, starts: bool
    ) -> Callable[[F], F]:
        if not (isinstance(contract, type) and issubclass(contract, Command | Event)):
            raise ContractError(
                f"process manager {self.name!r} takes commands and events, not {contract!r}: a "
                "query changes nothing, so it has no place in an instance's steps"
            )
        if isinstance(key, str) and key not in contract.model_fields:
            raise ContractError(
                f"{contract.__name__} has no field {key!r} to find the instance of "
                f"{self.name!r} by (its fields: {', '.join(contract.model_fields) or 'none'})"
            )
        if issubclass(contract, Command) and contract.__service__ != self.pool:
            raise ContractError(
                f"{contract.__name__} belongs to service {contract.__service__!r}, and process "
                f"manager {self.name!r} handles the commands of its own pool only: declare "
                f"class {contract.__name__}(Command, service={self.pool!r})"
            )

        def decorate(fn: F) -> F:
            route = _Route(fn, key, starts)
            self._routes[contract.__message_type__] = route
            if issubclass(contract, Command):
                handles(contract, service=self.pool)(self._wrap(route))
            else:
                subscribes(contract, pool=self.pool)(self._wrap(route))
            return fn

        return decorate

    def _wrap(self, route: _Route) -> Callable[..., Any]:
        @wraps(route.fn)
        def handle(message: Message, ctx: HandlerContext) -> Any:
            return self._handle(route, message, ctx)

        return handle

    def handles_itself(self, contract: type[Message]) -> bool:
        """Whether ``contract`` is a command this process handles (one it may send itself)."""
        route = self._routes.get(contract.__message_type__)
        return route is not None and issubclass(contract, Command)

    def _handle(self, route: _Route, message: Message, ctx: HandlerContext) -> Any:
        delivery = ctx._delivery
        key, own = self._key_of(route, message, ctx, delivery)
        store: InboxStore = delivery.store
        now = delivery.runtime.clock()
        found = store.instance(self.name, key)
        step: dict[str, Any] = {
            "at": now,
            "message_type": _type_of(delivery),
            "message_id": ctx.message_id,
        }
        if found is None:
            if not route.starts:
                raise ProcessNotFound(
                    f"{_type_of(delivery)} is for {self.name}:{key}, which has not started (its "
                    "starting message may still be on its way): retried, then dead-lettered"
                )
            found = Instance(self.name, key, started_at=now, updated_at=now)
        elif why := self._ignored(route, found, own, ctx.message_id, delivery):
            if delivery.kind == "command" and not own:
                raise Rejected(f"{self.name}:{key} {why}")
            ctx.instances.append(found.step({**step, "result": f"ignored: {why}"}, updated_at=now))
            return {"ignored": why} if delivery.kind == "command" else None
        state = None if found.state is None else self.state.model_validate(found.state)
        pending = {m: t for m, t in found.pending.items() if m != ctx.message_id}
        process = ProcessContext(ctx, self, found, state, pending)
        result = route.fn(message, process)
        ctx.instances.append(process.written(step, now))
        return result

    def _ignored(
        self, route: _Route, found: Instance, own: bool, message_id: str, delivery: Delivery
    ) -> str:
        """Why a message of an existing instance is not run ("" to run it)."""
        if found.ended:
            return f"has {found.status}"
        if route.starts and not own:
            return "has started already"
        if own and delivery.kind == "command" and message_id not in found.pending:
            return "no longer waits for it (cancelled)"
        return ""

    def _key_of(
        self, route: _Route, message: Message, ctx: HandlerContext, delivery: Delivery
    ) -> tuple[str, bool]:
        """The instance's key, and whether the message carries this process's own address (a
        reply to what it sent, or a message it sent itself)."""
        address = delivery.headers.get(PROCESS)
        if isinstance(address, str):
            name, _, key = address.partition(":")
            if name == self.name and key:
                return key, True
        if route.key is None:
            raise InvalidMessage(
                f"{_type_of(delivery)} reached process {self.name!r} without the address of an "
                "instance (it is not a reply to, nor a message sent by, one of its instances), "
                "and its handler declares no key="
            )
        if isinstance(route.key, _Correlation):
            return ctx.correlation_id, False
        value = route.key(message) if callable(route.key) else getattr(message, route.key)
        return str(value), False


def _type_of(delivery: Delivery) -> str:
    assert delivery.handler is not None
    return delivery.handler.contract.__message_type__


class ProcessContext(Generic[S]):
    """What a process manager's handler knows and does: its message's context (IDs, publish,
    send, transaction), and its instance: ``state``, ``schedule``, ``cancel``, ``end``."""

    def __init__(
        self,
        ctx: HandlerContext,
        manager: ProcessManager[S],
        instance: Instance,
        state: S | None,
        pending: dict[str, str],
    ) -> None:
        self._ctx = ctx
        self._manager = manager
        self._instance = instance
        #: the instance's state: None until a handler sets one; change it or assign a new one
        self.state: S | None = state
        self.status = instance.status
        self.pending = pending

    @property
    def key(self) -> str:
        return self._instance.key

    @property
    def new(self) -> bool:
        """True for the message that starts the instance."""
        return self._instance.version == 0

    @property
    def message_id(self) -> str:
        return self._ctx.message_id

    @property
    def correlation_id(self) -> str:
        return self._ctx.correlation_id

    @property
    def causation_id(self) -> str | None:
        return self._ctx.causation_id

    @property
    def attempt(self) -> int:
        return self._ctx.attempt

    def transaction(self) -> Any:
        """The pool's transaction (as ``HandlerContext.transaction``): writes of the handler's
        own, committed with the instance."""
        return self._ctx.transaction()

    def publish(self, event: Event) -> str:
        """Publish an event once this handling commits (as ``HandlerContext.publish``)."""
        return self._ctx.publish(event)

    def send(
        self,
        command: Command | Query,
        *,
        reply_to: bool | str = False,
        delay: float | None = None,
        not_before: datetime | None = None,
    ) -> str:
        """Send a command or query once this handling commits; its message ID. It carries
        this instance's address, so its reply (``reply_to=True``: to this process's
        ``on_reply`` handler) finds the instance. A command this process handles itself is
        remembered as pending until it arrives (see ``schedule``)."""
        if not isinstance(command, Command | Query):
            raise WrongMessageKind(
                f"ctx.send() takes a Command or Query, not {command!r}: publish events"
            )
        message_id = self._ctx._send(
            command,
            reply_to=reply_to,
            delay=delay,
            not_before=not_before,
            headers={PROCESS: self._instance.address},
        )
        if self._manager.handles_itself(type(command)):
            self.pending[message_id] = type(command).__message_type__
        return message_id

    def schedule(
        self,
        command: Command,
        *,
        delay: float | None = None,
        not_before: datetime | None = None,
    ) -> str:
        """A timeout: send this process a command of its own, held by the broker until
        ``delay`` seconds from now or ``not_before``; its message ID, to ``cancel`` it. It runs
        once, unless the instance ended or cancelled it meanwhile (then it is ignored)."""
        if delay is None and not_before is None:
            raise InvalidSchedule("ctx.schedule() needs delay= (seconds) or not_before= (a time)")
        if not self._manager.handles_itself(type(command)):
            raise ContractError(
                f"ctx.schedule() sends process {self._manager.name!r} a command it handles "
                f"itself; it has no handler of {type(command).__name__}: declare one with "
                f"@{self._manager.name}.handles({type(command).__name__}), or ctx.send() it"
            )
        return self.send(command, delay=delay, not_before=not_before)

    def cancel(self, message_id: str) -> None:
        """Stop waiting for a scheduled message: when it arrives, it is ignored."""
        self.pending.pop(message_id, None)

    def end(self, status: Literal["completed", "compensated"]) -> None:
        """End the instance: it takes no more messages (late ones are ignored, and recorded),
        and what it scheduled is cancelled."""
        if status not in {"completed", "compensated"}:
            raise ValueError(f"an instance ends completed or compensated, not {status!r}")
        self.status = status
        self.pending.clear()

    def written(self, step: dict[str, Any], now: float) -> Instance:
        """The instance as this handling leaves it, this step recorded."""
        state = self.state
        if state is not None and not isinstance(state, self._manager.state):
            raise TypeError(
                f"ctx.state of process {self._manager.name!r} must be a "
                f"{self._manager.state.__name__} (or None), not {type(state).__name__}"
            )
        ended = self.status if self.status != self._instance.status else ""
        result = ", ".join(r for r in ("started" if self.new else "", ended) if r) or "handled"
        sent = [
            {"type": e.message_type, "message_id": e.message_id}
            | ({"due": e.due} if e.due is not None else {})
            for e in self._ctx.outbox
        ]
        return self._instance.step(
            {**step, "result": result, "sent": sent},
            status=self.status,
            state=None if state is None else state.model_dump(mode="json"),
            pending=self.pending,
            updated_at=now,
        )
