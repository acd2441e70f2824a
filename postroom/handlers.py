"""``@handles``, ``@subscribes`` and ``@on_reply``: plain functions become the handlers of message types.

The function stays a plain function (returned unchanged, callable in a unit test); postroom
registers it and a Celery task named after the type, whose body runs the one handling pipeline
(postroom.pipeline) and so decodes, deduplicates, retries, commits and dead-letters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from postroom._celery.tasks import register_task
from postroom.breakers import CircuitBreaker
from postroom.errors import ContractError
from postroom.messages import Command, Event, Message, Query, reply_contract
from postroom.pipeline import kind_of
from postroom.ratelimits import RateLimit
from postroom.registry import Handler, registry

F = TypeVar("F", bound=Callable[..., Any])


def handles(
    contract: type[Message],
    *,
    service: str | None = None,
    breaker: CircuitBreaker | bool | None = None,
    fallback: Callable[..., Any] | None = None,
    rate_limit: RateLimit | str | None = None,
) -> Callable[[F], F]:
    """Make ``fn(message, ctx)`` the one handler of a command or query type, run as a Celery task.

    The task is named after the contract's type and consumed from ``commands.<service>``.
    ``breaker``: its circuit breaker (postroom.breakers): a ``CircuitBreaker(failures=...,
    cooldown=...)``, True for the settings' limits, False for none; None (the default) gives it
    one only if POSTROOM_BREAKER_FAILURES is set.
    ``fallback``: a query's ``fallback(query, ctx)``, which answers it while its breaker is open
    (its asker is waiting: holding the query for a cool-down would outlast the ask); the reply
    says ``fallback=True``. None or an error from it fails the query at once (``CircuitOpen``).
    ``rate_limit``: at most so many runs per period across every worker (postroom.ratelimits):
    ``RateLimit(50, per=1.0)`` or ``"50/s"``; the messages over it wait in the broker for their
    slot.
    """
    if not (isinstance(contract, type) and issubclass(contract, Command | Query)):
        raise ContractError(
            f"@handles takes a Command or Query class, not {contract!r}; "
            "events get subscribers with @subscribes"
        )
    if service is not None and service != contract.__service__:
        raise ContractError(
            f"{contract.__name__} belongs to service {contract.__service__!r}, not {service!r}: "
            f"declare it with class {contract.__name__}({contract.kind.capitalize()}, "
            f"service={service!r})"
        )
    if fallback is not None:
        _check_fallback(contract, breaker, fallback)

    limit = None if rate_limit is None else RateLimit.parse(rate_limit)

    def decorate(fn: F) -> F:
        handler = Handler(contract, fn, contract.__service__, breaker, fallback, rate_limit=limit)
        registry.add_owner(handler)
        register_task(
            contract.__message_type__, kind_of(contract), fn.__module__, fn.__doc__, handler=handler
        )
        return fn

    return decorate


def _check_fallback(
    contract: type[Message], breaker: CircuitBreaker | bool | None, fallback: object
) -> None:
    """A fallback is for a query behind a breaker of its own; anywhere else it would never run."""
    name = contract.__name__
    if not issubclass(contract, Query):
        raise ContractError(
            f"fallback= answers a query while its breaker is open, and {name} is a command: its "
            "sender waits for an outcome, not data, and while the breaker is open it waits in "
            "the broker. Leave fallback= out"
        )
    if breaker is None or breaker is False:
        raise ContractError(
            f"{name}'s fallback= is used while its circuit breaker is open: declare one, "
            "breaker=CircuitBreaker(failures=..., cooldown=...) or breaker=True"
        )
    if contract.__partition_key__ is not None:
        raise ContractError(
            f"{name} is partitioned, and a partitioned message has no circuit breaker (its "
            "retries run in place, in order): its fallback= would never be used. Leave it out"
        )
    if not callable(fallback):
        raise ContractError(f"fallback= takes a function fallback(query, ctx), not {fallback!r}")


def subscribes(
    event: type[Event],
    *,
    pool: str,
    breaker: CircuitBreaker | bool | None = None,
    rate_limit: RateLimit | str | None = None,
) -> Callable[[F], F]:
    """Make ``fn(event, ctx)`` pool ``pool``'s handler of an event type; any number of pools may.

    ``breaker`` and ``rate_limit`` as for ``@handles``: each pool's handler has its own."""
    if not (isinstance(event, type) and issubclass(event, Event)):
        raise ContractError(
            f"@subscribes takes an Event class, not {event!r}; commands and queries have one "
            "owner, declared with @handles"
        )

    limit = None if rate_limit is None else RateLimit.parse(rate_limit)

    def decorate(fn: F) -> F:
        first = not registry.pools_subscribed(event.__message_type__)
        registry.add_subscriber(Handler(event, fn, pool, breaker, rate_limit=limit))
        if first:  # one task per event type; each worker runs its own pool's handler
            register_task(
                event.__message_type__,
                "event",
                __name__,
                f"Delivers {event.__message_type__} to the @subscribes handler of this pool.",
            )
        return fn

    return decorate


def on_reply(contract: type[Command | Query], *, pool: str | None = None) -> Callable[[F], F]:
    """Make ``fn(reply, ctx)`` pool ``pool``'s handler of the replies to ``contract`` sent with
    ``reply_to=pool`` (``ctx.send`` or ``bus.send``): no worker waits for them.

    ``reply`` is the Reply the result backend stores too; ``ctx.correlation_id`` and
    ``ctx.causation_id`` are the original's correlation and message IDs. The replies arrive on
    ``commands.<pool>``, the queue a service's pool (and a subscriber pool, for its queries)
    already consumes, so no worker needs a queue of its own for them; they are deduplicated by
    the pool's inbox, and the handler may write, send and publish as a command's handler does.
    """
    if not (isinstance(contract, type) and issubclass(contract, Command | Query)):
        raise ContractError(
            f"@on_reply takes a Command or Query class, not {contract!r}: only they have replies"
        )
    if pool is None or not re.fullmatch(r"[a-z][a-z0-9_]*", pool):
        raise ContractError(
            f"@on_reply({contract.__name__}) needs pool=, the lower_snake_case name of the service "
            f"or pool whose workers receive the replies (on commands.<pool>), not {pool!r}: "
            f"@on_reply({contract.__name__}, pool='my_service')"
        )
    reply = reply_contract(contract)

    def decorate(fn: F) -> F:
        first = not registry.reply_pools(reply.__message_type__)
        registry.add_reply_handler(Handler(reply, fn, pool))
        if first:  # one task per reply type; each worker runs the handler of the reply's pool
            register_task(
                reply.__message_type__,
                "reply",
                __name__,
                f"Delivers a reply to {contract.__message_type__} to the @on_reply handler of "
                "its pool.",
            )
        return fn

    return decorate
