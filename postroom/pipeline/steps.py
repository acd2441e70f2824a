"""The steps every message goes through, outermost first. Each does one thing and is small.

```
 Trace ─ Log ─ Callback ─ DeadLetter ─ Decode ─ VerifySignature ─ Upcast ─ Validate ─ Park
   ─ Dedupe ─ PoisonGuard ─ Breaker ─ Throttle ─ Retry ─ Commit ─ Webhook ─ [your steps] ─ Run
```

(Breaker is postroom.pipeline.breaker, Throttle postroom.pipeline.ratelimit, Park
postroom.pipeline.parking, Callback postroom.pipeline.callback, Webhook postroom.pipeline.webhook.)
A step is called with the delivery and the rest of the pipeline (``call_next``); it may act
before, after, or instead of calling it. An inner step that cannot go on raises ``GiveUp`` with
a reason, and DeadLetter keeps the message with that reason.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from postroom import tracing, webhooks
from postroom.errors import ConcurrentUpdate, InvalidMessage, Rejected
from postroom.headers import PREFIX, REPLAY, Envelope, uuid7
from postroom.messages import CommandFailed, ErrorInfo, Reply, upcast
from postroom.pipeline.context import HandlerContext
from postroom.pipeline.delivery import Delivery, Outcome, Status
from postroom.reliability import DeadLetter as Letter
from postroom.reliability import derived_id

Next = Callable[[Delivery], Outcome]
logger = logging.getLogger("postroom.handled")


class Step:
    """A stage of the pipeline. The base passes every delivery on unchanged: override ``__call__``."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        return call_next(delivery)


class GiveUp(Exception):
    """Raised by a step for a message that will not be handled: DeadLetter keeps it."""

    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


class PoisonMessage(Exception):
    """The message was delivered again and again and never finished: it kills its worker."""

    def __init__(self, runs: int) -> None:
        super().__init__(
            f"{runs} deliveries never finished (the worker died each time); "
            "dead-lettered instead of delivered again"
        )


class InvalidReply(Exception):
    """The handler returned something that cannot travel as JSON."""


def reply(
    delivery: Delivery,
    status: str,
    *,
    value: Any = None,
    error: BaseException | None = None,
    fallback: bool = False,
) -> dict[str, Any]:
    envelope = delivery.envelope
    return Reply(
        status=status,  # type: ignore[arg-type]
        value=value,
        error=None if error is None else ErrorInfo(type=_error_type(error), message=str(error)),
        correlation_id=envelope.correlation_id if envelope else delivery.task_id,
        message_id=uuid7(),
        causation_id=envelope.message_id if envelope else None,
        message_type=delivery.handler.contract.__message_type__ if delivery.handler else "",
        attempts=delivery.attempt,
        fallback=fallback,
    ).model_dump(mode="json")


def _error_type(error: BaseException) -> str:
    return "Rejected" if isinstance(error, Rejected) else type(error).__name__


def recorded(delivery: Delivery, done: dict[str, Any]) -> Outcome:
    """The outcome a repeat gets: what its first run recorded."""
    if delivery.one_way:
        return Outcome("handled")
    return Outcome(done.get("status", "succeeded"), reply=done)


class Trace(Step):
    """A span per handling, a child of the span that sent the message (see postroom.tracing)."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        with tracing.handling(dict(delivery.headers), delivery.name):
            return call_next(delivery)


class Log(Step):
    """One line per message handled, on the ``postroom.handled`` logger: owner, type, outcome,
    correlation ID and duration (``postroom up`` shows these lines on a terminal)."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        started = time.perf_counter()
        outcome = call_next(delivery)
        if logger.isEnabledFor(logging.INFO):
            envelope = delivery.envelope
            logger.info(
                "%s %s %s correlation_id=%s %.1fms",
                delivery.owner or "-",
                delivery.name,
                outcome.status,
                envelope.correlation_id if envelope else delivery.task_id,
                (time.perf_counter() - started) * 1000,
                extra={"pool": delivery.owner, "outcome": outcome.status},
            )
        return outcome


class DeadLetter(Step):
    """Keeps what an inner step gave up on, with the reason, so it can be redriven; a command
    that failed for good is announced (``CommandFailed``) and its reply says why. An error no
    step expected (a defect in a step or a store) is kept the same way, as a failure: Celery
    would acknowledge the message unhandled and keep nothing of it."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        try:
            return call_next(delivery)
        except GiveUp as stop:
            return self.keep(delivery, stop)
        except Exception as exc:
            logger.error("%s: unexpected error in the pipeline", delivery.name, exc_info=True)
            return self.keep(delivery, GiveUp("failed", exc))

    def keep(self, delivery: Delivery, stop: GiveUp) -> Outcome:
        """A dead-letter store or broker that cannot be reached for the moment must not lose the
        message: it goes back to its queue after the longest backoff, and is kept once they
        answer again. Its attempt budget is spent, so a returning message that fails again is
        kept at once (a handler that fails for good runs once more per return)."""
        retry = delivery.runtime.retry
        try:
            return self.give_up(delivery, stop)
        except retry.retry_on as exc:
            logger.warning(
                "%s: could not keep it as a dead letter (%r); it goes back to its queue",
                delivery.task_id,
                exc,
            )
            return Outcome("retry", error=exc, delay=retry.backoff_max)

    def give_up(self, delivery: Delivery, stop: GiveUp) -> Outcome:
        """A partitioned command's letter heads its key's line: the key's later messages wait
        behind it (postroom.parking)."""
        runtime, error = delivery.runtime, stop.error
        runtime.dead_letters.add(
            letter_of(
                delivery,
                stop.reason,
                type(error).__name__,
                str(error),
                "".join(traceback.format_exception(error)),
            )
        )
        refused = stop.reason in {"invalid", "unknown"}
        envelope = delivery.envelope
        if delivery.kind == "command" and not refused and envelope is not None:
            runtime.bus.publish(
                CommandFailed(
                    command_type=envelope.message_type,
                    error_type=type(error).__name__,
                    error_message=str(error),
                    attempts=delivery.attempt,
                ),
                correlation_id=envelope.correlation_id,
                causation_id=envelope.message_id,
                source=delivery.owner,
                message_id=derived_id(envelope.message_id, 0),
            )
        status: Status = "rejected" if refused else "failed"
        answer = None if delivery.one_way else reply(delivery, status, error=error)
        url = webhooks.callback_url(delivery.headers)
        if delivery.kind == "command" and answer is not None and url and envelope is not None:
            # no commit carries this reply: sent now, under the ID the Webhook step would use
            message_id, callback = webhooks.callback_for(envelope.message_id, url, answer)
            runtime.bus.send(callback, causation_id=envelope.message_id, message_id=message_id)
        return Outcome(status, reply=answer, error=error)


def letter_of(
    delivery: Delivery, reason: str, error_type: str, error_message: str, trace: str = ""
) -> Letter:
    """The dead letter that keeps this delivery as it was received, to be redriven."""
    return Letter(
        reason=reason,
        error_type=error_type,
        error_message=error_message,
        queue=delivery.queue,
        owner=delivery.owner,
        task=delivery.name.partition("@")[0],
        task_id=delivery.task_id,
        headers={k: v for k, v in delivery.headers.items() if k != "x-death"},
        kwargs=delivery.body,
        traceback=trace,
        attempts=delivery.attempt,
        partition=delivery.partition,
    )


class Decode(Step):
    """Reads the envelope from the headers; a plain Celery client's command or query (no postroom
    header at all) gets one from Celery's own fields: task ID, root ID, parent ID."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        handler = delivery.handler
        if handler is None:
            lacks = (
                "has no @on_reply handler of it"
                if delivery.kind == "reply"
                else "does not subscribe to it"
            )
            raise GiveUp(
                "unknown",
                InvalidMessage(
                    f"{delivery.name} reached a worker of pool {delivery.owner!r}, which {lacks}"
                ),
            )
        try:
            envelope = delivery.envelope = _envelope(delivery)
            expected = handler.contract.__message_type__
            if envelope.message_type != expected:
                raise InvalidMessage(
                    f"header says {envelope.message_type!r} but the task handles {expected!r}"
                )
            if delivery.args:
                raise InvalidMessage(
                    "a postroom message carries its fields as keyword arguments only"
                )
        except InvalidMessage as exc:
            raise GiveUp("invalid", exc) from exc
        replay = delivery.headers.get(REPLAY) if delivery.kind == "event" else None
        delivery.inbox_id = replayed_id(envelope.message_id, replay)
        return call_next(delivery)


def replayed_id(message_id: str, replay: object) -> str:
    """What a pool's inbox knows a delivery by: its message ID, or for a forced replay's copy
    (``postroom.replay`` set, see postroom.replay) an ID of its own, new for each replay run, so
    the pool runs it again, yet the same across that copy's retries and redeliveries."""
    if replay is None:
        return message_id
    return str(uuid.uuid5(uuid.UUID(message_id), f"replay:{replay}"))


def _envelope(delivery: Delivery) -> Envelope:
    plain = not any(name.startswith(PREFIX) for name in delivery.headers)
    if delivery.one_way or not plain:
        # an event or a reply is only ever sent by postroom, never by a plain Celery client
        return Envelope.from_headers(dict(delivery.headers))
    assert delivery.handler is not None
    contract = delivery.handler.contract
    try:
        task_id = str(uuid.UUID(delivery.task_id))
    except ValueError:
        raise InvalidMessage(
            f"a plain Celery message's task id must be a UUID, not {delivery.task_id!r}: "
            "leave task_id unset, or send it through postroom's bus"
        ) from None
    return Envelope.new(
        contract.__message_type__,
        contract.__message_version__,
        source="celery",
        message_id=task_id,
        correlation_id=_uuid_or(delivery.root_id, task_id),
        causation_id=_uuid_or(delivery.parent_id, None),
    )


def _uuid_or(value: str | None, default: str | None) -> str | None:
    try:
        return str(uuid.UUID(str(value))) if value else default
    except ValueError:
        return default


class VerifySignature(Step):
    """With signing keys configured, only a message signed by one of them, unchanged, goes on."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        signer = delivery.runtime.signer
        if signer is not None:
            assert delivery.envelope is not None
            try:
                signer.verify(delivery.envelope.message_type, delivery.body, dict(delivery.headers))
            except InvalidMessage as exc:
                raise GiveUp("invalid", exc) from exc
        return call_next(delivery)


class Upcast(Step):
    """Turns a payload an older version wrote into the current shape (after the signature check,
    which covers the payload as it was sent)."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        assert delivery.handler is not None
        assert delivery.envelope is not None
        try:
            delivery.fields = upcast(
                delivery.handler.contract, delivery.envelope.version, dict(delivery.body)
            )
        except InvalidMessage as exc:
            raise GiveUp("invalid", exc) from exc
        return call_next(delivery)


class Validate(Step):
    """Validates the payload against the contract again on receipt."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        assert delivery.handler is not None
        contract = delivery.handler.contract
        try:
            delivery.message = contract.model_validate(delivery.fields)
        except ValidationError as exc:
            error = InvalidMessage(f"invalid {contract.__name__} payload: {exc}")
            raise GiveUp("invalid", error) from exc
        return call_next(delivery)


class Dedupe(Step):
    """A message its owner already handled gets the outcome recorded then, without running again.

    Queries change nothing, so they are never deduplicated; their runs are counted all the same,
    for the poison guard. A run that ends any way but a commit is ended here, once. A store that
    cannot be reached at the start is a transient failure: the message is retried later; one that
    cannot be reached at the end leaves the run counted (as if its worker had died) and the
    outcome as it was.
    """

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        store, retry = delivery.store, delivery.runtime.retry
        try:
            done, delivery.runs = store.begin(
                delivery.owner, delivery.inbox_id, dedupe=delivery.kind != "query"
            )
        except retry.retry_on as exc:
            if delivery.attempt > retry.max_retries:
                raise GiveUp("failed", exc) from exc
            return Outcome("retry", error=exc, delay=retry.delay(delivery.attempt - 1))
        if done is not None:
            return recorded(delivery, done)
        try:
            return call_next(delivery)
        finally:
            if not delivery.committed:
                self._end(delivery)

    @staticmethod
    def _end(delivery: Delivery) -> None:
        """Ends the run in the store; the outcome (a retry, a dead letter) stands if it cannot."""
        retry_on = delivery.runtime.retry.retry_on
        for attempt in (1, 2):  # a dropped connection is replaced at once: worth a second try
            try:
                delivery.store.ended(delivery.owner, delivery.inbox_id)
                return
            except retry_on:
                if attempt == 2:
                    logger.warning(
                        "could not end the run of %s in its store; it stays counted",
                        delivery.inbox_id,
                        exc_info=True,
                    )


class PoisonGuard(Step):
    """A message whose runs keep killing their worker is dead-lettered instead of run again."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        if delivery.runs > delivery.runtime.poison_after:
            raise GiveUp("poison", PoisonMessage(delivery.runs))
        return call_next(delivery)


#: runs in a row that lose to another message of the same process instance before the run is
#: retried from the broker instead (postroom.instances): each loser reruns at once, on the state
#: the winner left, so only a storm of messages for one instance gets this far
CONFLICT_RERUNS = 10


class Retry(Step):
    """Transient failures run again, within one budget: a message runs at most
    ``max_retries + 1`` times in all. A partitioned message is retried in place, blocking its
    partition (sent back to its queue, the messages behind it would overtake it); any other goes
    back to its owner's queue after a backoff. Any other exception fails at once. A run that
    loses to another message of its process instance (ConcurrentUpdate) runs again at once,
    spending none of the budget: it failed nothing, it only read a state that has moved on."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        conflicts = 0
        while True:
            delivery.ctx = HandlerContext(delivery)
            try:
                return call_next(delivery)
            except GiveUp:
                raise
            except ConcurrentUpdate as exc:
                conflicts += 1
                if conflicts > CONFLICT_RERUNS and (retry := self._failed(delivery, exc)):
                    return retry
            except delivery.runtime.retry.retry_on as exc:
                if retry := self._failed(delivery, exc):
                    return retry
            except Exception as exc:
                raise GiveUp("failed", exc) from exc

    @staticmethod
    def _failed(delivery: Delivery, exc: BaseException) -> Outcome | None:
        """A transient failure: the retry from the broker, or None once it waited out its
        backoff in place (a partitioned message); GiveUp when the budget is spent."""
        policy = delivery.runtime.retry
        if delivery.attempt > policy.max_retries:
            raise GiveUp("failed", exc) from exc
        delay = policy.delay(delivery.attempt - 1)
        if not delivery.partitioned:
            return Outcome("retry", error=exc, delay=delay)
        logger.warning(
            "%s attempt %d failed (%r); retrying in place, in order",
            delivery.inbox_id,
            delivery.attempt,
            exc,
        )
        delivery.runtime.sleep(delay)
        delivery.attempt += 1
        return None


class Commit(Step):
    """The handler's writes, its outbox and the inbox mark land together, or not at all; the
    outbox is dispatched once the reply is out. A rejection records the mark alone: it changes and announces nothing.
    If a concurrent copy of the message committed first, this run's effects are dropped and its
    outcome is returned. A run that ends any other way leaves no writes behind (nor, on SQL, an
    open transaction holding its connection and locks)."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        try:
            outcome = call_next(delivery)
        except BaseException:
            self._discard(delivery)
            raise
        if delivery.kind == "query" or outcome.status not in {"succeeded", "rejected", "handled"}:
            self._discard(delivery)
            return outcome
        ctx = delivery.ctx
        assert ctx is not None
        record = outcome.reply or {"status": "handled", "attempts": delivery.attempt}
        store = delivery.store
        if ctx.commit(record, effects=outcome.status != "rejected"):
            delivery.committed = True
            if ctx.outbox:  # sent once the reply is out: the reply need not wait for them
                dispatch = partial(
                    delivery.runtime.relay.dispatch, store, delivery.owner, ctx.outbox
                )
                delivery.after_reply.append(tracing.carried(dispatch))
            return outcome
        done = store.outcome(delivery.owner, delivery.inbox_id) or {}
        return recorded(delivery, done)

    @staticmethod
    def _discard(delivery: Delivery) -> None:
        if delivery.ctx is not None:
            delivery.ctx.discard()


class Run(Step):
    """Calls the handler. Its return value becomes the reply's; ``Rejected`` refuses a command."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        assert delivery.handler is not None
        assert delivery.ctx is not None
        try:
            result = delivery.handler.fn(delivery.message, delivery.ctx)
        except Rejected as exc:
            if delivery.one_way:
                raise
            return Outcome("rejected", reply=reply(delivery, "rejected", error=exc), error=exc)
        if delivery.one_way:
            return Outcome("handled")
        try:
            value = to_jsonable_python(result)
        except PydanticSerializationError as exc:
            error = InvalidReply(f"the handler's return value is not JSON-serialisable: {exc}")
            raise GiveUp("failed", error) from exc
        return Outcome("succeeded", reply=reply(delivery, "succeeded", value=value))
