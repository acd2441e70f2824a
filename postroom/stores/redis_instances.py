"""Process managers' instances in Redis, next to the inbox they commit with (postroom.reliability).

```
 <ns>:process:<process>:<key>             hash: version, document (postroom.instances)
 <ns>:processes:<process>:running         sorted set of keys, by last update: what is running
 <ns>:processes:<process>:ended           the same for ended ones, kept POSTROOM_INBOX_RETENTION
```

A write is queued on the handling's pipeline with the inbox mark and the outbox, and guarded: the
commit script applies it only if the hash's version is still the one the handling loaded (see
``Inbox.commit``). An ended instance expires with the inbox's retention, as long as a late
message of it could still be told from a new one.
"""

from __future__ import annotations

from typing import Any

import redis

from postroom.instances import Instance


class RedisInstances:
    def __init__(self, client: redis.Redis, namespace: str, retention: int) -> None:
        self.client = client
        self.namespace = namespace
        self.retention = retention

    def _key(self, process: str, key: str) -> str:
        return f"{self.namespace}:process:{process}:{key}"

    def _index(self, process: str, running: bool) -> str:
        return f"{self.namespace}:processes:{process}:{'running' if running else 'ended'}"

    def write(self, pipe: Any, instance: Instance) -> tuple[str, str]:
        """Queue the instance's write at its next version on ``pipe``; the guard the commit
        script checks first: (the hash, the version it must still be at)."""
        key = self._key(instance.process, instance.key)
        pipe.hset(key, mapping={"version": instance.version + 1, "document": instance.document()})
        running, ended = self._index(instance.process, True), self._index(instance.process, False)
        if instance.ended:
            pipe.zrem(running, instance.key)
            pipe.zadd(ended, {instance.key: instance.updated_at})
            pipe.zremrangebyscore(ended, "-inf", instance.updated_at - self.retention)
            pipe.expire(key, self.retention)
        else:
            pipe.zadd(running, {instance.key: instance.updated_at})
        return key, str(instance.version)

    def get(self, process: str, key: str) -> Instance | None:
        version, document = self.client.hmget(self._key(process, key), ["version", "document"])
        if document is None:
            return None
        return Instance.load(process, key, document, int(str(version)))

    def list(self, process: str, *, running: bool, limit: int) -> list[Instance]:
        keys = [str(k) for k in self.client.zrevrange(self._index(process, running), 0, limit - 1)]
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(self._key(process, key), ["version", "document"])
            found = pipe.execute()
        return [
            Instance.load(process, key, document, int(version))
            for key, (version, document) in zip(keys, found, strict=True)
            if document is not None  # expired since the index was read
        ]
