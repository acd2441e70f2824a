"""Where a message goes when a plain Celery client sends it: routes derived from the registry.

``bus.send`` names its queue itself. ``celery call TYPE``, ``app.send_task(TYPE, kwargs=...)``
and Flower's send-task API name none, and Celery would put the message on its default queue,
which no pool reads. This router sends a command or query to its owner's queue (its partition
queue, for a partitioned contract whose fields validate) and anything else to the unrouted queue,
which every worker drains and dead-letters as "unknown": nothing waits where nobody looks.
"""

from __future__ import annotations

from typing import Any

import celery
from pydantic import ValidationError

from postroom.messages import Command, Query
from postroom.registry import registry
from postroom.topology import QueueType, command_queue


class Router:
    """A Celery router (``task_routes``): consulted only when the sender named no queue.

    It routes to queues of the deployment's ``queue_type``: Celery declares the queue it is given
    before sending, and that declaration must match the workers'.
    """

    def __init__(self, app: celery.Celery, queue_type: QueueType, delivery_limit: int) -> None:
        self.app = app
        self.queue_type, self.delivery_limit = queue_type, delivery_limit

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: dict[str, Any], **_: Any
    ) -> dict[str, Any] | None:
        if options.get("queue") or options.get("routing_key"):
            return None  # the sender chose (bus.send does): nothing to derive
        handler = registry.owner_of(name)
        if handler is None:
            return None  # Celery's default queue: the unrouted queue (see postroom.install)
        contract = handler.contract
        if contract.__partition_key__ is not None and issubclass(contract, Command | Query):
            from postroom.bus import route  # noqa: PLC0415 - the bus imports this module's app

            try:
                return {"queue": route(self.app, contract.model_validate(kwargs or {}))}
            except ValidationError:
                pass  # refused as invalid by the owner, which says why
        return {
            "queue": command_queue(
                handler.owner, self.queue_type, delivery_limit=self.delivery_limit
            )
        }
