"""The pipeline's rate-limit step (the slots it hands out are postroom.ratelimits)."""

from __future__ import annotations

import logging

from postroom.errors import RateLimited
from postroom.pipeline.delivery import Delivery, Outcome
from postroom.pipeline.steps import Next, Step
from postroom.ratelimits import RESERVATION, limit_name

logger = logging.getLogger("postroom.ratelimits")

#: seconds a message waits in the broker, then asks again, while its limit cannot be read
UNREADABLE_WAIT = 1.0


class Throttle(Step):
    """Runs a rate-limited handler's message in its slot: now, after a short wait in place, or,
    held in the broker, on its return with the reservation it carries.

    It sits inside Breaker (a message an open breaker holds spends no slot) and outside Retry, so
    every run the broker hands it asks for a slot, a retry's too; a partitioned message, retried
    in place, asks once. A store that cannot be read holds the message for UNREADABLE_WAIT:
    running it could break the limit, and waiting in the broker costs it nothing but time."""

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        handler, runtime = delivery.handler, delivery.runtime
        if handler is None or handler.rate_limit is None:
            return call_next(delivery)
        name = limit_name(delivery.owner, handler.contract.__message_type__)
        interval = handler.rate_limit.interval
        # at most one slot lies within an interval from now: one message per limit waits in place
        in_place = float("inf") if delivery.partitioned else min(runtime.wait_in_place, interval)
        carried = "" if delivery.partitioned else str(delivery.headers.get(RESERVATION) or "")
        try:
            slot = runtime.rate_limits.take(name, runtime.clock(), interval, carried, in_place)
        except runtime.retry.retry_on as exc:
            logger.warning("rate limit %s cannot be read (%r); the message waits", name, exc)
            unread = RateLimited(f"{name}'s rate limit cannot be read: held {UNREADABLE_WAIT}s")
            return Outcome("held", error=unread, delay=UNREADABLE_WAIT)
        if slot.token:
            held = RateLimited(f"{name} is over its rate limit: held {slot.wait:.2f}s, to its slot")
            return Outcome("held", error=held, delay=slot.wait, reservation=slot.token)
        if slot.wait > 0:
            runtime.sleep(slot.wait)
        return call_next(delivery)
