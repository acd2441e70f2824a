"""``postroom.testing``: run handlers in this process, through the real pipeline, with no broker.

The harness is a broker and a worker in one: ``send``, ``ask`` and ``publish`` queue messages as
the bus would (the same headers, the payload through JSON), and ``run()`` hands each to the same
pipeline a Celery worker runs (decode, signature, upcast, validate, parked keys, inbox, poison
guard, breaker, rate limit, retry, commit, dead letters), until every message a send caused has
been handled: the events it published, each subscribed pool's delivery of them, and retries and
held messages, whose wait passes on a fake clock. Then a test asserts on replies, published events
and dead letters (and redrives them, ``harness.redrive()``, as ``postroom dlq redrive`` does)::

    def test_registering_announces_the_asset(postroom_harness):
        reply = postroom_harness.ask(RegisterAsset(name="Truck 12"))
        assert reply.status == "succeeded"
        assert [type(e) for e in postroom_harness.published] == [AssetRegistered]

Handlers are found in postroom's registry, so import the modules that declare them. A handler
that writes through ``ctx.transaction()`` needs the Redis its state lives in:
``Harness(state=redis_client)``, or, for a service whose state is in SQL, its store:
``Harness(stores={"assets": SqlStore.from_url(...)})`` (its inbox and outbox are kept there
too); the writes are applied when the message settles, as in a worker.

Real brokers prove what only they can (redelivery, crashes, ordering across processes): the
integration tests run the same pipeline in real Celery workers.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import pytest
import redis

from postroom.breakers import Breakers, MemoryBreakers
from postroom.errors import InvalidMessage, ReplyTimeout, WrongMessageKind
from postroom.headers import REPLY_TO, Envelope
from postroom.instances import Instance
from postroom.messages import Command, Event, Message, Query, Reply, reply_type
from postroom.parking import purge_one, redrive_all, redrive_one
from postroom.partitions import partition_of
from postroom.pipeline import Delivery, Pipeline, Runtime, Step, default_steps, kind_of
from postroom.processes import ProcessManager, manager_named
from postroom.ratelimits import RESERVATION, MemoryRateLimits
from postroom.registry import registry
from postroom.reliability import DeadLetter
from postroom.retries import RetryPolicy
from postroom.schedules import due_time
from postroom.signing import SIGNATURE, Signer
from postroom.stores import InboxStore
from postroom.stores.memory import MemoryDeadLetters, MemoryInbox
from postroom.topology import (
    command_queue_name,
    event_delivery_name,
    event_queue_name,
    partition_queue_name,
)
from postroom.webhooks import CALLBACK_URL, DeliverWebhook

__all__ = ["FakeClock", "Harness", "postroom_harness"]


class FakeClock:
    """Time that passes only when the harness waits: a retry's backoff costs a test nothing."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclass(order=True)
class _Queued:
    due: float
    seq: int
    delivery: Delivery = field(compare=False)


@dataclass
class Sent:
    """A command or query the harness holds: its envelope, and its reply once it has one."""

    harness: Harness
    envelope: Envelope

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlation_id

    def reply(self) -> Reply:
        """Run until every queued message is handled, then the reply; ReplyTimeout if none."""
        self.harness.run()
        found = self.harness.replies.get(self.correlation_id)
        if found is None:
            raise ReplyTimeout(
                f"no reply for {self.envelope.message_type} ({self.correlation_id}): it was "
                "dead-lettered or no handler of its type is registered (import its module); "
                "see harness.dead_letters"
            )
        return found


class Harness:
    """A broker and a worker in this process, running postroom's own pipeline.

    Events reach every subscriber pool registered in the process, as in a deployment that runs
    them all; ``pools`` names the only ones that get them, so a test of one service is not
    touched by the subscribers of others its process happens to import (another test module's,
    a CommandFailed subscriber that needs state the test did not give)."""

    def __init__(
        self,
        *,
        state: redis.Redis | None = None,
        stores: Mapping[str, InboxStore] | None = None,
        retry: RetryPolicy | None = None,
        poison_after: int = 3,
        signing_keys: Sequence[str] = (),
        steps: Sequence[Step] = (),
        source: str = "tests",
        partitions: int = 4,
        breaker_failures: int = 0,
        breaker_cooldown: float = 30.0,
        breaker_ratio: float = 0.0,
        breaker_window: float = 60.0,
        pools: Collection[str] | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.pools = None if pools is None else frozenset(pools)
        self.inbox = MemoryInbox(state)
        self._dead_letters = MemoryDeadLetters()
        self.signer = Signer(list(signing_keys)) if signing_keys else None
        self.source = source
        self.partitions = partitions
        self.runtime = Runtime(
            inbox=self.inbox,
            dead_letters=self._dead_letters,
            bus=self,
            retry=retry or RetryPolicy(),
            poison_after=poison_after,
            signer=self.signer,
            sleep=self.clock.sleep,
            clock=lambda: self.clock.now,
            stores=dict(stores or {}),
            redrive=self._redriven,
            breakers=Breakers(
                MemoryBreakers(),
                breaker_failures,
                breaker_cooldown,
                breaker_ratio,
                breaker_window,
            ),
            rate_limits=MemoryRateLimits(),
            wait_in_place=0.0,  # its delays are exact, and its worker runs one message at a time
        )
        self.pipeline = Pipeline(default_steps(steps))
        self.replies: dict[str, Reply] = {}
        #: every event published, in order (by a handler or by the test)
        self.published: list[Event] = []
        #: every reply a callback would carry, in order (postroom.webhooks)
        self.webhooks: list[DeliverWebhook] = []
        self._queue: list[_Queued] = []
        self._history: list[Delivery] = []
        self._seq = itertools.count()

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return list(self._dead_letters.letters)

    def send(
        self,
        command: Command | Query,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        message_id: str | None = None,
        reply_to: str | None = None,
        callback_url: str | None = None,
        delay: float | None = None,
        not_before: datetime | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Sent:
        """Queue a command or query for its owner, as ``bus.send`` does; nothing runs yet.

        With ``reply_to``, its reply is also delivered to that pool's ``@on_reply`` handler.
        With ``callback_url``, the reply's ``DeliverWebhook`` is kept in ``webhooks`` (nothing
        is POSTed, and no allow-list applies: the harness has no settings). ``delay`` or
        ``not_before`` makes it due then, on the harness's fake clock, which reads seconds since
        the epoch and starts at 0 (1970): ``run()`` moves it forward to the due time.
        """
        if not isinstance(command, Command | Query):
            raise WrongMessageKind(
                f"send() takes a Command or Query, not {command!r}: publish events"
            )
        contract = type(command)
        if reply_to is not None:
            registry.check_reply_to(contract, reply_to)
        due = due_time(delay, not_before, self.clock.now)
        envelope = self._envelope(contract, correlation_id, causation_id, message_id, self.source)
        if isinstance(command, DeliverWebhook):
            self.webhooks.append(command)
            return Sent(self, envelope)
        extra: dict[str, Any] = dict(headers or {})
        if reply_to:
            extra[REPLY_TO] = reply_to
        if callback_url is not None:
            extra[CALLBACK_URL] = callback_url
        handler = registry.owner_of(contract.__message_type__)
        owner = handler.owner if handler else contract.__service__
        self._enqueue(
            Delivery(
                runtime=self.runtime,
                handler=handler,
                kind=kind_of(contract),
                owner=owner,
                queue=self._queue_of(command, owner),
                name=contract.__message_type__,
                task_id=envelope.correlation_id,
                headers=self._headers(envelope, command, extra),
                args=(),
                body=_wire(command),
            ),
            delay=0.0 if due is None else max(0.0, due - self.clock.now),
        )
        return Sent(self, envelope)

    def send_reply(
        self,
        reply: Reply,
        *,
        pool: str,
        message_id: str,
        source: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue a reply's delivery to ``pool``'s ``@on_reply`` handler, as ``bus.send_reply``
        does (a worker, for a message sent with ``reply_to``)."""
        message_type = reply_type(reply.message_type or "")
        envelope = Envelope.new(
            message_type,
            1,
            source=source,
            correlation_id=reply.correlation_id,
            causation_id=reply.causation_id,
            message_id=message_id,
        )
        body = reply.model_dump(mode="json")
        sent = envelope.to_headers() | dict(headers or {}) | {REPLY_TO: pool}
        if self.signer is not None:
            sent[SIGNATURE] = self.signer.sign(message_type, body, sent)
        self._enqueue(
            Delivery(
                runtime=self.runtime,
                handler=registry.reply_handler(message_type, pool),
                kind="reply",
                owner=pool,
                queue=command_queue_name(pool),
                name=message_type,
                task_id=message_id,
                headers=sent,
                args=(),
                body=body,
            )
        )

    def ask(self, query: Query) -> Reply:
        """Send a query and run until its reply is in."""
        return self.send(query).reply()

    def publish(
        self,
        event: Event,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        source: str | None = None,
        message_id: str | None = None,
    ) -> str:
        """Queue one delivery of the event per pool subscribed to its type, as the broker does."""
        if not isinstance(event, Event):
            raise WrongMessageKind(f"publish() takes an Event, not {event!r}: send commands")
        contract = type(event)
        envelope = self._envelope(
            contract, correlation_id, causation_id, message_id, source or self.source
        )
        self.published.append(event)
        headers, body = self._headers(envelope, event), _wire(event)
        for pool in registry.pools_subscribed(contract.__message_type__):
            if self.pools is not None and pool not in self.pools:
                continue
            self._enqueue(
                Delivery(
                    runtime=self.runtime,
                    handler=registry.subscriber(contract.__message_type__, pool),
                    kind="event",
                    owner=pool,
                    queue=event_queue_name(pool),
                    name=event_delivery_name(contract.__message_type__, pool),
                    task_id=str(uuid.uuid5(uuid.UUID(envelope.message_id), pool)),
                    headers=headers,
                    args=(),
                    body=body,
                )
            )
        return envelope.message_id

    def deliver_again(self, sent: Sent) -> None:
        """Queue a duplicate of a sent message (at-least-once delivery does this)."""
        originals = [d for d in self._history if d.task_id == sent.correlation_id]
        if not originals:
            raise InvalidMessage(f"{sent.correlation_id} was never sent through this harness")
        self._enqueue(_fresh(originals[0]))

    def redrive(self, letter_id: str | None = None) -> list[str]:
        """Send a dead letter back to its queue (every one without ``letter_id``), as
        ``postroom dlq redrive`` does: a line's head takes the messages parked behind it along,
        one by one, in order, and a parked one alone is refused (``OutOfLine``). Nothing runs
        until ``run()``; what was done, a sentence per letter."""
        letters = self._dead_letters
        if letter_id is None:
            return redrive_all(letters, self._redriven)
        return [redrive_one(letters, self._redriven, letter_id)]

    def purge(self, letter_id: str) -> str:
        """Delete a dead letter, as ``postroom dlq purge ID`` does (never a parked one alone)."""
        return purge_one(self._dead_letters, letter_id)

    def run(self, max_messages: int = 10_000, *, until: float | None = None) -> int:
        """Handle queued messages in due order until none is left; the number handled.

        A retry waiting for its backoff, or a scheduled message, moves the fake clock forward
        instead of waiting. ``until`` (a time on that clock) stops at the messages due later,
        and leaves the clock there: what a process manager does before its timeout fires.
        """
        handled = 0
        while self._queue and (until is None or self._queue[0].due <= until):
            if handled >= max_messages:
                raise RuntimeError(
                    f"still {len(self._queue)} message(s) queued after {max_messages}: "
                    "do the handlers cause messages in a loop?"
                )
            queued = heapq.heappop(self._queue)
            self.clock.now = max(self.clock.now, queued.due)
            self._handle(queued.delivery)
            handled += 1
        if until is not None:
            self.clock.now = max(self.clock.now, until)
        return handled

    def instance(self, process: ProcessManager[Any] | str, key: object) -> Instance | None:
        """A process manager's instance (by manager or name, and key) as last committed: its
        status, state, pending messages and steps (postroom.processes)."""
        manager = manager_named(process) if isinstance(process, str) else process
        return self.runtime.store(manager.pool).instance(manager.name, str(key))

    def events(self, of_type: type[Event] | None = None) -> list[Event]:
        """The events published so far, optionally of one type only."""
        return [e for e in self.published if of_type is None or isinstance(e, of_type)]

    def _handle(self, delivery: Delivery) -> None:
        outcome = self.pipeline(delivery)
        for deferred in delivery.after_reply:
            deferred()
        if outcome.status in {"retry", "held"}:  # held: not run now, the same attempt later
            again = _fresh(delivery)
            again.attempt = delivery.attempt + (outcome.status == "retry")
            headers = {k: v for k, v in delivery.headers.items() if k != RESERVATION}
            if outcome.reservation:  # its rate-limit slot, carried back as a worker's does
                headers[RESERVATION] = outcome.reservation
            again.headers = headers
            self._enqueue(again, delay=outcome.delay)
        elif outcome.reply is not None:
            reply = Reply.model_validate(outcome.reply)
            self.replies[reply.correlation_id] = reply

    def _redriven(self, letter: DeadLetter) -> None:
        """Queue a decoded dead letter again, with its headers and message ID."""
        if letter.kwargs is None:
            raise InvalidMessage(f"{letter.id} never decoded: the harness cannot redrive it")
        handler = registry.owner_of(letter.task) or registry.subscriber(letter.task, letter.owner)
        assert handler is not None, f"no handler of {letter.task} is registered"
        kind = kind_of(handler.contract)
        self._enqueue(
            Delivery(
                runtime=self.runtime,
                handler=handler,
                kind=kind,
                owner=letter.owner,
                queue=letter.queue,
                name=letter.task
                if kind != "event"
                else event_delivery_name(letter.task, letter.owner),
                task_id=letter.task_id,
                headers=letter.headers,
                args=(),
                body=letter.kwargs,
            )
        )

    def _enqueue(self, delivery: Delivery, delay: float = 0.0) -> None:
        if delivery.handler is None and delivery.kind != "event":
            self._dead_letters.add(
                DeadLetter(
                    reason="unknown",
                    error_type="UnknownMessageType",
                    error_message=f"no handler of {delivery.name} is registered: import its module",
                    queue=delivery.queue,
                    task=delivery.name,
                    task_id=delivery.task_id,
                    headers=dict(delivery.headers),
                    kwargs=delivery.body,
                )
            )
            return
        self._history.append(delivery)
        heapq.heappush(self._queue, _Queued(self.clock.now + delay, next(self._seq), delivery))

    def _queue_of(self, command: Command | Query, owner: str) -> str:
        key = type(command).__partition_key__
        if key is None:
            return command_queue_name(owner)
        return partition_queue_name(owner, partition_of(getattr(command, key), self.partitions))

    def _envelope(
        self,
        contract: type[Message],
        correlation_id: str | None,
        causation_id: str | None,
        message_id: str | None,
        source: str,
    ) -> Envelope:
        return Envelope.new(
            contract.__message_type__,
            contract.__message_version__,
            source=source,
            correlation_id=correlation_id,
            causation_id=causation_id,
            message_id=message_id,
        )

    def _headers(
        self, envelope: Envelope, message: Message, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        headers = envelope.to_headers() | dict(extra or {})
        if self.signer is not None:
            headers[SIGNATURE] = self.signer.sign(envelope.message_type, _wire(message), headers)
        return headers


def _wire(message: Message) -> dict[str, Any]:
    """The payload as a receiver gets it: through JSON, as on the wire."""
    payload: dict[str, Any] = orjson.loads(orjson.dumps(message.payload()))
    return payload


def _fresh(delivery: Delivery) -> Delivery:
    """The same message as received again: nothing a step learned is kept."""
    return Delivery(
        runtime=delivery.runtime,
        handler=delivery.handler,
        kind=delivery.kind,
        owner=delivery.owner,
        queue=delivery.queue,
        name=delivery.name,
        task_id=delivery.task_id,
        headers=delivery.headers,
        args=delivery.args,
        body=delivery.body,
        attempt=delivery.attempt,
    )


@pytest.fixture
def postroom_harness() -> Harness:
    """A fresh harness per test, with no state store (give one with ``Harness(state=...)``)."""
    return Harness()
