"""The one redis-py internal postroom reads: the commands a pipeline has queued."""

from __future__ import annotations

from typing import Any

import redis


def take_queued(client: redis.Redis, pipe: Any) -> list[list[Any]]:
    """The commands queued on ``pipe``, each encoded as redis-py would send it; ``pipe`` is
    emptied. postroom applies them inside its commit script instead of executing the pipeline
    (see postroom.reliability.Inbox.commit)."""
    encode: Any = client.connection_pool.get_encoder().encode
    commands = [[encode(part) for part in command] for command, _options in pipe.command_stack]
    pipe.reset()
    return commands
