"""When a scheduled message is due: ``delay=`` or ``not_before=`` of ``bus.send``, ``bus.publish``
and a handler's ``ctx.send``, checked once, the same way everywhere (postroom._celery.delays holds
the message in the broker until then)."""

from __future__ import annotations

import time
from datetime import datetime

from postroom.errors import InvalidSchedule


def due_time(
    delay: float | None, not_before: datetime | None, now: float | None = None
) -> float | None:
    """The due time of a message sent with ``delay`` seconds from ``now`` (default: the time
    now) or ``not_before`` (at most one of them; an aware datetime), as seconds since the epoch;
    None for a message due at once."""
    if delay is not None and not_before is not None:
        raise InvalidSchedule("give a delay or a not_before time, not both")
    if delay is not None:
        if not delay >= 0:  # also refuses NaN
            raise InvalidSchedule(f"delay must be a number of seconds >= 0, not {delay!r}")
        return (time.time() if now is None else now) + delay if delay > 0 else None
    if not_before is not None:
        if not isinstance(not_before, datetime) or not_before.utcoffset() is None:
            raise InvalidSchedule(
                f"not_before must be a timezone-aware datetime, not {not_before!r}: "
                "use datetime.now(timezone.utc) + timedelta(...), say"
            )
        return not_before.timestamp()
    return None
