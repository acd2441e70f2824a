"""The pipeline's circuit breaker step (the state it keeps is postroom.breakers)."""

from __future__ import annotations

import logging

from pydantic_core import to_jsonable_python

from postroom.breakers import Admission, Limits, breaker_name
from postroom.errors import CircuitOpen, Rejected
from postroom.messages import CircuitClosed, CircuitOpened
from postroom.pipeline.context import HandlerContext
from postroom.pipeline.delivery import Delivery, Outcome
from postroom.pipeline.steps import GiveUp, Next, Step, reply

logger = logging.getLogger("postroom.breakers")


class Breaker(Step):
    """Holds a handler's messages in the broker while its breaker is open; counts its failures.

    It sits outside Retry, so it sees one outcome per run: a retry or a give-up is a failure
    (unless the error is a ``Rejected``), anything else a success. A partitioned message is
    retried in place to keep its order, so it is never held: it passes through unchanged. A
    store that cannot be reached leaves the breaker out of the way (the message runs).

    A query whose handler declares a fallback is not held: its asker is waiting, and a hold
    lasts up to a cool-down. The fallback answers it at once, and the reply says so; if the
    fallback has no answer (None, or an error) the query fails at once with ``CircuitOpen``."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        runtime = delivery.runtime
        limits = runtime.breakers.limits(delivery.handler)
        if limits is None or delivery.partitioned:
            return call_next(delivery)
        assert delivery.handler is not None
        name = breaker_name(delivery.owner, delivery.handler.contract.__message_type__)
        try:
            admission = runtime.breakers.store.admit(name, runtime.clock(), limits)
        except runtime.retry.retry_on as exc:
            logger.warning("breaker %s cannot be read (%r); the message runs", name, exc)
            admission = Admission()
        if admission.hold is not None:
            if delivery.kind == "query" and delivery.handler.fallback is not None:
                return self._fall_back(delivery, name, admission.hold)
            held = CircuitOpen(f"{name}'s circuit breaker is open: held {admission.hold:.1f}s")
            return Outcome("held", error=held, delay=admission.hold)
        try:
            outcome = call_next(delivery)
        except GiveUp as stop:
            if not isinstance(stop.error, Rejected):
                self._record(delivery, name, limits, admission.probe, stop.error)
            raise
        if outcome.status == "held":  # its rate limit's slot is ahead: not a run
            return outcome  # (a held probe's lease lapses after a cool-down, then another runs)
        failed = outcome.status == "retry"
        self._record(delivery, name, limits, admission.probe, outcome.error if failed else None)
        return outcome

    @staticmethod
    def _fall_back(delivery: Delivery, name: str, hold: float) -> Outcome:
        assert delivery.handler is not None
        assert delivery.handler.fallback is not None
        ctx = delivery.ctx = HandlerContext(delivery)
        try:
            answer = to_jsonable_python(delivery.handler.fallback(delivery.message, ctx))
        except Exception as exc:
            logger.warning("breaker %s: the fallback raised", name, exc_info=True)
            problem = f"its fallback raised {exc!r}"
        else:
            if answer is not None:
                value = reply(delivery, "succeeded", value=answer, fallback=True)
                return Outcome("succeeded", reply=value)
            problem = "its fallback had no answer"
        finally:
            ctx.discard()
        error = CircuitOpen(
            f"{name}'s circuit breaker is open (its handler keeps failing) and {problem}: ask "
            f"again in {hold:.0f}s or later"
        )
        return Outcome("failed", reply=reply(delivery, "failed", error=error), error=error)

    def _record(
        self,
        delivery: Delivery,
        name: str,
        limits: Limits,
        probe: bool,
        error: BaseException | None,
    ) -> None:
        runtime = delivery.runtime
        try:
            change, failures = runtime.breakers.store.record(
                name, error is None, probe, runtime.clock(), limits
            )
        except runtime.retry.retry_on as exc:
            logger.warning("breaker %s cannot be updated (%r)", name, exc)
            return
        if change == "opened":
            logger.warning(
                "breaker %s opened after %d failures in a row; held for %.1fs",
                name,
                failures,
                limits.cooldown,
            )
            self._announce(delivery, CircuitOpened(
                owner=delivery.owner,
                message_type=name.partition(":")[2],
                failures=failures,
                cooldown=limits.cooldown,
                error_type=type(error).__name__,
                error_message=str(error),
            ))  # fmt: skip
        elif change == "reopened":
            logger.warning(
                "breaker %s probe failed (%r); open for %.1fs more", name, error, limits.cooldown
            )
        elif change == "closed":
            logger.warning("breaker %s closed: its probe succeeded", name)
            self._announce(
                delivery, CircuitClosed(owner=delivery.owner, message_type=name.partition(":")[2])
            )

    @staticmethod
    def _announce(delivery: Delivery, event: CircuitOpened | CircuitClosed) -> None:
        envelope = delivery.envelope
        try:
            delivery.runtime.bus.publish(
                event,
                correlation_id=envelope.correlation_id if envelope else None,
                causation_id=envelope.message_id if envelope else None,
                source=delivery.owner,
            )
        except delivery.runtime.retry.retry_on as exc:
            logger.warning("could not announce %s (%r)", type(event).__name__, exc)
