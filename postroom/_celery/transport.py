"""kombu's Redis transport, with an atomic fetch and minus a client construction per publish.

**Atomic fetch.** kombu consumes with ``BRPOP`` and records the message as unacknowledged one round
trip later, so a worker killed in between loses it (celery/celery#7950). Here the consumer runs
postroom._celery.fetch's script instead, which does both in one step, behind a wait on its queues'
doorbells when they were empty. kombu's poller still drives it all: the commands are sent and read
through ``_brpop_start`` and ``_brpop_read``, so its pausing under a full prefetch, its health
check of the blocked connection and its re-authentication keep working. Every push of this channel
(publishes and kombu's restores) rings the queue's doorbell.

**Delays.** A message published with a due time (or a Celery ETA) still ahead is parked in the
deployment's delayed set instead of its queue, and moved there when due (postroom._celery.delays).

**One client per channel.** kombu builds a fresh ``redis.Redis`` for every synchronous operation
(each publish, each queue-size check). The client is a thin wrapper over the channel's connection
pool, but building one fills a response-callback table of ~170 entries: on a one-message-per-call
producer that was a quarter of the time ``bus.send`` took. A client is safe to share across threads
(each command borrows a pooled connection), so each channel keeps one, rebuilt whenever kombu
replaces the pool (after a fork or a reconnect).
"""

from __future__ import annotations

from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import NoScriptError

from postroom._celery.delays import due_of, park
from postroom._celery.fetch import FETCH, fetch_command, ring, wait_command


class QoS(redis.QoS):  # type: ignore[misc]
    def append(self, message: Any, delivery_tag: str) -> None:
        """Track a delivered message; in Redis too unless the fetch script already recorded it."""
        if delivery_tag == self.channel.fetched_tag:
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(redis.Channel):  # type: ignore[misc]
    QoS = QoS
    _sync_client: Any = None
    #: the delivery tag of the message being delivered, if the fetch script recorded it
    fetched_tag: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._no_ack: set[str] = set()  # queues whose consumer never acknowledges
        self._fetch_next = True  # else wait on the doorbells first
        self._waiting = False  # whether the fetch in flight waits on the doorbells first
        self._fetched_from: list[str] = []  # each list's queue, in the last fetch's order

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        (self._no_ack.add if no_ack else self._no_ack.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Send the consumer's next fetch; once one found its queues empty, behind a wait on their
        doorbells of at most ``brpop_timeout``, in the same write: Redis runs the fetch the moment
        a doorbell rings or the wait times out, so a woken consumer reads the message at once.
        Queues come in kombu's round-robin order, all of their first priority before any of the
        next, as kombu's ``BRPOP`` takes them."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        lists = [
            (self._q_for_pri(queue, priority), position)
            for priority in self.priority_steps
            for position, queue in enumerate(queues)
        ]
        self._fetched_from = [queues[position] for _, position in lists]
        commands = [
            fetch_command(
                self.global_keyprefix,
                (self.unacked_key, self.unacked_index_key),
                lists=lists,
                queues=queues,
                recorded=[self.ack_emulation and queue not in self._no_ack for queue in queues],
                now=time(),
            )
        ]
        self._waiting = not self._fetch_next
        if self._waiting:
            wait = self.brpop_timeout if timeout is None else timeout
            commands.insert(0, wait_command(self.global_keyprefix, queues, wait or 0))
        connection = self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        connection.send_packed_command(connection.pack_commands(commands))

    def _brpop_read(self, **options: Any) -> bool:
        try:
            reply = self._read_fetch(self.client.connection, **options)
            self._fetch_next = bool(reply)  # else wait on the doorbells first
            if not reply:
                raise Empty()
            self._deliver_fetched(*reply)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()  # the connection is idle: kombu's moment to re-auth

    def _read_fetch(self, connection: Any, **options: Any) -> Any:
        """The fetch's reply, read after the wait's if one was sent."""
        try:
            if self._waiting:
                self.client.parse_response(connection, "BZPOPMIN", **options)
            return self.client.parse_response(connection, "EVALSHA", **options)
        except NoScriptError:  # a restarted Redis forgot the script: load it, fetch again
            self._fetch_next = True
            with self.conn_or_acquire() as client:
                client.script_load(FETCH)
            raise Empty() from None
        except BaseException:
            # a lost connection, or an error before the fetch's reply was read: start afresh on a
            # new connection (the next poll makes it), as kombu does after a failed BRPOP
            connection.disconnect()
            self._fetch_next = True
            raise

    def _deliver_fetched(self, position: int, raw: bytes, recorded: int) -> None:
        queue = self._fetched_from[position - 1]
        self._queue_cycle.rotate(queue)
        payload = loads(bytes_to_str(raw))
        self.fetched_tag = payload["properties"]["delivery_tag"] if recorded else None
        try:
            self.connection._deliver(payload, queue)
        finally:
            self.fetched_tag = None

    def _poll_error(self, type: str, **options: Any) -> None:
        """kombu reads the reply of a connection in error; here that is the wait's and the
        fetch's, and a message fetched is delivered rather than dropped."""
        if type == "BRPOP":
            self._brpop_read(**options)
        else:
            super()._poll_error(type, **options)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """kombu's push, with the doorbell rung in the same round trip; a message not due yet
        is parked until it is instead (postroom._celery.delays)."""
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:
            due = due_of(message.get("headers"))
            if due is not None and due > time():
                pri = self._get_message_priority(message, reverse=False)
                park(batch.add, self._q_for_pri(queue, pri), queue, message, due)
                return
            super()._put(queue, message, _publish_batch=batch, **kwargs)
            ring(batch.add, queue)
            return
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            self._put(queue, message, _publish_batch=_PipelineBatch(pipe), **kwargs)
            pipe.execute()

    def _do_restore_message(
        self,
        payload: dict[str, Any],
        exchange: str,
        routing_key: str,
        pipe: Any,
        leftmost: bool = False,
    ) -> None:
        """kombu's restore (``restore_visible``, a requeue, a shutdown), ringing the doorbell."""
        pushes = _RingingPipeline(pipe, self.sep)
        super()._do_restore_message(payload, exchange, routing_key, pushes, leftmost)


class _PipelineBatch:
    """A pipeline behind kombu's publish-batch interface, so that ``_put`` queues its commands
    (the push, and an expiring queue's ``PEXPIRE``) where the doorbell's go."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def add(self, command: str, *args: Any) -> None:
        getattr(self.pipe, command)(*args)


class _RingingPipeline(_PipelineBatch):
    """The pipeline kombu's restore pushes on, ringing the queue's doorbell after each push."""

    def __init__(self, pipe: Any, sep: str) -> None:
        super().__init__(pipe)
        self.sep = sep

    def lpush(self, key: str, *values: Any) -> None:
        self.pipe.lpush(key, *values)
        self._ring(key)

    def rpush(self, key: str, *values: Any) -> None:
        self.pipe.rpush(key, *values)
        self._ring(key)

    def _ring(self, key: str) -> None:
        queue = key.rsplit(self.sep, 1)[0]  # a priority's list is "<queue><sep><priority>"
        ring(self.add, queue)


class Transport(redis.Transport):  # type: ignore[misc]
    Channel = Channel


#: the value of Celery's ``broker_transport`` setting that selects this transport
NAME = f"{__name__}:Transport"
