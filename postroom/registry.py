"""Who owns each command and query (exactly one handler), and which pools subscribe to each event."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postroom.breakers import CircuitBreaker
from postroom.errors import DuplicateHandler
from postroom.messages import Message
from postroom.ratelimits import RateLimit


@dataclass(frozen=True)
class Handler:
    """A plain function bound to the contract it handles and the service or pool that runs it."""

    contract: type[Message]
    fn: Callable[..., Any]
    owner: str  # the service for commands and queries, the pool for events
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
        key = (handler.contract.__message_type__, handler.owner)
        existing = self._subscribers.get(key)
        if existing is not None and existing.where != handler.where:
            raise DuplicateHandler(
                f"pool {handler.owner!r} already handles {key[0]} with {existing.where}; "
                f"{handler.where} cannot too. Do both things in one handler, or subscribe the "
                "second from another pool (each pool gets its own copy of every event)"
            )
        self._subscribers[key] = handler

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

    def handlers(self) -> list[Handler]:
        """Every handler: each command's and query's owner, then each pool's of each event."""
        return [*self._owners.values(), *self._subscribers.values()]

    def partitioned_services(self) -> list[str]:
        """Every service owning a contract that declares a partition key: it has partition queues."""
        return sorted({h.owner for h in self._owners.values() if h.contract.__partition_key__})

    def services(self) -> list[str]:
        """Every service that owns a command or query."""
        return sorted({h.owner for h in self._owners.values()})


registry = Registry()
