"""One message on its way through the pipeline, where it runs, and what came of it.

The pipeline knows nothing of Celery: a worker (postroom._celery) or the in-memory harness
(postroom.testing) builds a Delivery from what it received, runs the steps, and turns the Outcome
into its own terms (a task result, a retry, a dead letter already written).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from postroom.breakers import Breakers, MemoryBreakers
from postroom.headers import Envelope
from postroom.messages import Command, Event, Message, Query, Reply, ReplyMessage
from postroom.outbox import Relay, Removals
from postroom.ratelimits import WAIT_IN_PLACE, MemoryRateLimits, RateLimitStore
from postroom.registry import Handler
from postroom.retries import RetryPolicy
from postroom.signing import Signer

if TYPE_CHECKING:
    from postroom.pipeline.context import HandlerContext
    from postroom.reliability import DeadLetter
    from postroom.stores import DeadLetterStore, InboxStore

#: reply: a Reply delivered to the pool its command or query named with ``reply_to``
Kind = Literal["command", "query", "event", "reply"]
#: succeeded / rejected / failed: a command's or query's reply; handled: an event delivery done;
#: retry: run again after ``Outcome.delay`` seconds, from the broker; held: not run (its breaker
#: is open, or its rate limit's slot is ahead), back from the broker after ``Outcome.delay``
#: seconds as the same attempt, nothing is recorded; parked: not run, kept behind its key's dead
#: letter (postroom.parking), acknowledged
Status = Literal["succeeded", "rejected", "failed", "handled", "retry", "held", "parked"]


class Publisher(Protocol):
    """What a handler's context publishes and sends through: the bus, or the harness's."""

    def publish(
        self,
        event: Event,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        source: str | None = None,
        message_id: str | None = None,
    ) -> str: ...

    def send(
        self,
        command: Command | Query,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        message_id: str | None = None,
        reply_to: str | None = None,
        delay: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any: ...

    def send_reply(
        self,
        reply: Reply,
        *,
        pool: str,
        message_id: str,
        source: str,
        headers: Mapping[str, str] | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class Runtime:
    """Where the pipeline runs: the stores it records in, the bus it speaks through, its limits."""

    inbox: InboxStore
    dead_letters: DeadLetterStore
    bus: Publisher
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    poison_after: int = 3
    signer: Signer | None = None
    sleep: Callable[[float], None] = time.sleep
    #: the time now, in seconds since the epoch (the harness's fake clock)
    clock: Callable[[], float] = time.time
    #: the handlers' circuit breakers (postroom.breakers)
    breakers: Breakers = field(default_factory=lambda: Breakers(MemoryBreakers()))
    #: the handlers' rate limits (postroom.ratelimits)
    rate_limits: RateLimitStore = field(default_factory=MemoryRateLimits)
    #: a rate limit's slot this close (seconds) is waited for in place, the broker's delays
    #: being less precise; the harness's are exact, and its in-place waits would be one at a time
    wait_in_place: float = WAIT_IN_PLACE
    #: owners (services, pools) whose inbox, outbox and writes live elsewhere (a SQL database)
    stores: Mapping[str, InboxStore] = field(default_factory=dict)
    #: batches the removal of sent outbox entries (a worker's); None removes them at once
    removals: Removals | None = None
    #: sends a dead letter back to its queue (the next of a parked key's line, postroom.parking)
    redrive: Callable[[DeadLetter], None] | None = None

    def store(self, owner: str) -> InboxStore:
        return self.stores.get(owner, self.inbox)

    @property
    def relay(self) -> Relay:
        return Relay(self.bus, self.removals, self.clock)


def kind_of(contract: type[Message] | type[ReplyMessage]) -> Kind:
    if issubclass(contract, ReplyMessage):
        return "reply"
    if issubclass(contract, Command):
        return "command"
    return "query" if issubclass(contract, Query) else "event"


@dataclass
class Delivery:
    """One run of the pipeline for one received message. Steps fill in what they learn."""

    runtime: Runtime
    handler: Handler | None  # None: nobody here handles this type (a stray event)
    kind: Kind
    owner: str  # the service (commands, queries) or the pool (events) handling it
    queue: str  # where it came from, and where a dead letter's redrive sends it
    name: str  # the task name as shown: the type, or <event type>@<pool> for a delivery
    task_id: str
    headers: Mapping[str, Any]
    args: tuple[Any, ...]
    body: dict[str, Any]  # the fields as received, kept unchanged for a dead letter
    attempt: int = 1
    #: Celery's own IDs, which give a plain Celery client's message its envelope
    root_id: str | None = None
    parent_id: str | None = None
    envelope: Envelope | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # the body, upcast to the current version
    message: Message | ReplyMessage | None = None
    inbox_id: str = ""  # what the owner's inbox knows this run by
    runs: int = 0  # runs begun and not ended, this one included (0: not counted)
    committed: bool = False
    ctx: HandlerContext | None = None
    #: what waits until the reply is out (the outbox's dispatch): nobody waits for it, and a run
    #: that dies first leaves it to the outbox sweep
    after_reply: list[Callable[[], None]] = field(default_factory=list)

    @property
    def store(self) -> InboxStore:
        """Where this owner's inbox, outbox and writes are committed."""
        return self.runtime.store(self.owner)

    @property
    def one_way(self) -> bool:
        """An event's or a reply's delivery: nobody waits for it, so it has no reply of its own."""
        return self.kind in {"event", "reply"}

    @property
    def partitioned(self) -> bool:
        return self.handler is not None and self.handler.contract.__partition_key__ is not None

    @property
    def partition(self) -> str | None:
        """A validated partitioned command's key value: what its key's line is known by.

        (Events and queries are not ordered by key; an invalid message has no trustworthy key.)
        """
        if self.kind != "command" or self.message is None or not self.partitioned:
            return None
        assert self.handler is not None
        return str(getattr(self.message, str(self.handler.contract.__partition_key__)))


@dataclass(frozen=True)
class Outcome:
    status: Status
    reply: dict[str, Any] | None = None  # a command's or query's Reply, as JSON
    error: BaseException | None = None
    delay: float = 0.0  # with status "retry" or "held"
    #: with status "held": the rate-limit slot it was given, carried back in its header
    #: (postroom.ratelimits), and then its delay is exact, not spread
    reservation: str = ""
