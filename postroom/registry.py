"""Who owns each command and query (exactly one handler), which pools subscribe to each event, and
which pools receive the replies to each command or query sent with ``reply_to`` (``@on_reply``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postroom.breakers import CircuitBreaker
from postroom.errors import ContractError, DuplicateHandler
from postroom.messages import Message, ReplyMessage, reply_type
from postroom.ratelimits import RateLimit


@dataclass(frozen=True)
class Handler:
    """A plain function bound to the contract it handles and the service or pool that runs it."""

    contract: type[Message | ReplyMessage]
    fn: Callable[..., Any]
    owner: str  # the service for commands and queries, the pool for events and replies
    #: its circuit breaker: None the settings' (POSTROOM_BREAKER_FAILURES), False none, True or a
    #: CircuitBreaker one of its own (see postroom.breakers)
    breaker: CircuitBreaker | bool | None = None
    #: a query's ``fn(query, ctx)`` that answers it while its breaker is open (postroom.breakers)
    fallback: Callable[..., Any] | None = None
    #: at most so many runs a second across the deployment, or None (see postroom.ratelimits)
    rate_limit: RateLimit | None = None

    @property
    def where(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"


class Registry:
    def __init__(self) -> None:
        self._owners: dict[str, Handler] = {}
        self._subscribers: dict[tuple[str, str], Handler] = {}
        self._reply_handlers: dict[tuple[str, str], Handler] = {}

    def add_owner(self, handler: Handler) -> None:
        """Record the one handler of a command or query type; a second one is a mistake."""
        message_type = handler.contract.__message_type__
        existing = self._owners.get(message_type)
        if existing is not None and existing.where != handler.where:
            raise DuplicateHandler(
                f"{message_type} already has a handler, {existing.where}; "
                f"{handler.where} cannot handle it too. A command or query has exactly one "
                "owner: remove one of them, or publish an event that both can subscribe to"
            )
        self._owners[message_type] = handler

    def owner_of(self, message_type: str) -> Handler | None:
        return self._owners.get(message_type)

    def owners(self) -> list[Handler]:
        return list(self._owners.values())

    def add_subscriber(self, handler: Handler) -> None:
        """Record a pool's handler of an event type; one per (event type, pool), any number of pools."""
        _add_once(
            self._subscribers, handler, "handles",
            "Do both things in one handler, or subscribe the second from another pool (each pool "
            "gets its own copy of every event)",
        )  # fmt: skip

    def subscriber(self, event_type: str, pool: str) -> Handler | None:
        return self._subscribers.get((event_type, pool))

    def subscriptions(self, pool: str) -> list[str]:
        """The event types a pool subscribes to: the routing keys its queue is bound with."""
        return sorted(event for event, owner in self._subscribers if owner == pool)

    def pools_subscribed(self, event_type: str) -> list[str]:
        return sorted(owner for event, owner in self._subscribers if event == event_type)

    def pools(self) -> dict[str, list[str]]:
        """Every subscriber pool with the event types it subscribes to."""
        return {pool: self.subscriptions(pool) for pool in {o for _, o in self._subscribers}}

    def add_reply_handler(self, handler: Handler) -> None:
        """Record a pool's handler of the replies to a command or query type; one per pool."""
        _add_once(
            self._reply_handlers, handler, "receives",
            "Handle both cases in one @on_reply handler",
        )  # fmt: skip

    def reply_handler(self, reply_type: str, pool: str) -> Handler | None:
        return self._reply_handlers.get((reply_type, pool))

    def check_reply_to(self, contract: type[Message], pool: str) -> None:
        """ContractError unless ``pool`` has an ``@on_reply`` handler of ``contract``'s replies:
        said at send, since a reply nobody handles would only be dead-lettered on arrival."""
        if self.reply_handler(reply_type(contract.__message_type__), pool) is None:
            known = ", ".join(self.reply_pools(reply_type(contract.__message_type__))) or "none"
            raise ContractError(
                f"reply_to={pool!r}, but pool {pool!r} has no @on_reply({contract.__name__}) "
                f"handler (pools with one: {known}): declare one with "
                f"@on_reply({contract.__name__}, pool={pool!r}), or import its module"
            )

    def reply_pools(self, reply_type: str | None = None) -> list[str]:
        """The pools with an ``@on_reply`` handler (of ``reply_type``, if given)."""
        return sorted({p for t, p in self._reply_handlers if reply_type in (None, t)})

    def handlers(self) -> list[Handler]:
        """Every handler: each command's and query's owner, each pool's of each event, then each
        pool's of each reply."""
        return [*self._owners.values(), *self._subscribers.values(), *self._reply_handlers.values()]

    def partitioned_services(self) -> list[str]:
        """Every service owning a contract that declares a partition key: it has partition queues."""
        return sorted({h.owner for h in self._owners.values() if h.contract.__partition_key__})

    def services(self) -> list[str]:
        """Every service that owns a command or query."""
        return sorted({h.owner for h in self._owners.values()})


registry = Registry()


def _add_once(
    table: dict[tuple[str, str], Handler], handler: Handler, verb: str, advice: str
) -> None:
    """Record a pool's handler of a message type, one per (type, pool); the same function
    registered again (a module imported twice) is no duplicate."""
    key = (handler.contract.__message_type__, handler.owner)
    existing = table.get(key)
    if existing is not None and existing.where != handler.where:
        raise DuplicateHandler(
            f"pool {handler.owner!r} already {verb} {key[0]} with {existing.where}; "
            f"{handler.where} cannot too. {advice}"
        )
    table[key] = handler
