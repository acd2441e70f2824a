"""The event log and replay, on Redis and RabbitMQ with real workers; the store on a private namespace.

Every published event is in the log with its envelope; ``postroom events`` shows it, follows it and
replays it to one pool only; the pool's inbox skips what it handled unless ``--force``; and a pool
that never existed is bootstrapped from history while events keep coming, with one effect each.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from config.pools import Pool
from postroom import MessageBus
from postroom.eventlog import RedisStreamStore, event_log, parse_since
from postroom.headers import Envelope
from postroom.pipeline.steps import replayed_id
from postroom.topology import EVENTS_EXCHANGE, event_queue_name
from tests.integration.services import NEW_POOL, POOLS, EmitProbe, ProbeHappened, ProbeLogged
from tests.support import REDIS, ROOT, STATE_DB, BrokerContext, WorkerProcess, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]
HAPPENED, LOGGED = ProbeHappened.__message_type__, ProbeLogged.__message_type__


def events_cli(broker: BrokerContext, *args: str) -> subprocess.CompletedProcess[str]:
    """``postroom events ...`` as a user runs it, in this test's broker context."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "events", *args], cwd=ROOT, env=broker.env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def deliveries(broker: BrokerContext, key: str, pool: str) -> list[str]:
    done = broker.state().lrange(broker.key("probe", key, "done", pool), 0, -1)
    return [json.loads(d)["message_id"] for d in done]


def runs(broker: BrokerContext, key: str) -> dict[str, int]:
    counted = broker.state().hgetall(broker.key("probe", key, "runs"))
    return {pool: int(n) for pool, n in counted.items()}


def queue_declared(broker: BrokerContext, pool: str) -> bool:
    name = event_queue_name(pool)
    with broker.app.connection_for_write() as conn:
        channel = conn.default_channel
        if broker.kind == "redis":  # declared = bound: kombu keeps the bindings in Redis
            return any(q == name for _, _, q in channel.get_table(EVENTS_EXCHANGE.name))
        try:
            channel.queue_declare(queue=name, passive=True)
        except conn.channel_errors:
            return False
        return True


def worker_of(broker: BrokerContext, pool: str) -> WorkerProcess:
    [worker] = [w for w in broker.workers if w.pool.name == pool and w.proc.poll() is None]
    return worker


def succeeded(worker: WorkerProcess, pool: str) -> int:
    """Deliveries of ProbeHappened the worker finished, skipped ones included (from its log)."""
    return len(re.findall(rf"{re.escape(HAPPENED)}@{pool}\[[^]]+\] succeeded", worker.output()))


def replayed_count(output: str) -> int:
    return int(output.split("replayed ", 1)[1].split(" ", 1)[0])


# --- the store, on a namespace of its own in the test Redis DB ------------------------------------


@pytest.fixture
def store() -> Iterator[RedisStreamStore]:
    namespace = f"t{uuid.uuid4().hex[:10]}-eventlog"
    made = RedisStreamStore(f"{REDIS}/{STATE_DB}", namespace=namespace, retention=0.5)
    yield made
    keys = list(made.client.scan_iter(f"{namespace}:*"))
    if keys:
        made.client.delete(*keys)


def logged(
    store: RedisStreamStore, message_type: str = "probe.ThingHappened", **payload: object
) -> str:
    envelope = Envelope.new(message_type, 1, source="tests")
    assert store.append(envelope.to_headers(), payload)
    return envelope.message_id


def test_an_event_is_logged_once_and_read_back_by_id_in_order_and_by_filters(
    store: RedisStreamStore,
) -> None:
    first = logged(store, n=1)
    envelope = Envelope.new("probe.ThingHappened", 1, source="tests", message_id=first)
    assert not store.append(envelope.to_headers(), {"n": 1})  # a handler's re-run: kept once
    time.sleep(0.01)
    since = datetime.now(UTC)
    second = logged(store, "probe.OtherHappened", n=2)
    third = logged(store, n=3)
    assert len(store) == 3
    found = store.get(second)
    assert found is not None
    assert (found.payload, found.envelope.message_type) == ({"n": 2}, "probe.OtherHappened")
    assert store.get(str(uuid.uuid4())) is None
    assert [e.message_id for e in store.read()] == [first, second, third]
    assert [e.message_id for e in store.read(since=since)] == [second, third]
    assert [e.message_id for e in store.read(event_type="probe.ThingHappened")] == [first, third]
    assert [e.message_id for e in store.read(limit=2)] == [first, second]
    assert [e.message_id for e in store.read(until=store.get(second).position)] == [first, second]  # type: ignore[union-attr]
    assert [e.message_id for e in store.tail(2)] == [second, third]
    assert store.position() == store.get(third).position  # type: ignore[union-attr]


def test_events_older_than_the_retention_are_trimmed_on_append(store: RedisStreamStore) -> None:
    exact = RedisStreamStore(
        store.url, namespace=store.stream.rsplit(":", 1)[0], retention=0.5, approximate=False
    )
    old = [logged(exact, n=i) for i in range(3)]
    time.sleep(0.6)
    new = logged(exact, n=3)
    assert [e.message_id for e in exact.read()] == [new]
    assert [exact.get(message_id) for message_id in old] == [None, None, None]


def test_approximate_trimming_drops_whole_nodes_of_old_events(store: RedisStreamStore) -> None:
    """The default (``MINID ~``) is cheap: it drops whole stream nodes (100 entries each)."""
    for i in range(250):
        logged(store, n=i)
    time.sleep(0.6)
    new = logged(store, n=250)
    kept = [e.message_id for e in store.read()]
    assert kept[-1] == new
    assert len(kept) <= 51  # the two full nodes of old events are gone; the last may remain


def test_a_time_is_read_as_iso_8601_or_an_age() -> None:
    assert parse_since("2026-11-23T09:00:00") == datetime(2026, 11, 23, 9, tzinfo=UTC)
    assert parse_since("15m", now=3600.0) == datetime.fromtimestamp(2700, UTC)
    with pytest.raises(ValueError, match="ISO 8601 time"):
        parse_since("yesterday")


def test_a_forced_replay_is_a_delivery_of_its_own_stable_across_redeliveries() -> None:
    message_id = str(uuid.uuid4())
    assert replayed_id(message_id, None) == message_id
    forced = replayed_id(message_id, "r1")
    assert forced != message_id
    assert forced == replayed_id(message_id, "r1") != replayed_id(message_id, "r2")


# --- published events, the CLI, replay and bootstrap, on both brokers -----------------------------


def test_published_events_are_logged_with_their_envelope_and_shown_by_id(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key, cause = uuid.uuid4().hex, str(uuid.uuid4())
    message_id = bus.publish(ProbeLogged(key=key), correlation_id=cause, causation_id=cause)
    shown = events_cli(broker, "show", message_id)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["message_type"], record["payload"]) == (LOGGED, {"key": key})
    envelope = Envelope.from_headers(record["headers"])
    assert (envelope.message_id, envelope.correlation_id, envelope.causation_id) == (
        message_id,
        cause,
        cause,
    )
    assert envelope.source == "tests"

    pending = bus.send(EmitProbe(key=key))  # published by a handler, through ctx.publish
    event_id = pending.reply(timeout=30).value
    # the outbox is dispatched (event log, then broker) right after the reply is stored
    wait_for(lambda: event_log(broker.app).get(event_id) is not None, timeout=5)
    by_handler = event_log(broker.app).get(event_id)
    assert by_handler is not None
    assert by_handler.envelope.correlation_id == pending.correlation_id
    assert by_handler.envelope.causation_id == pending.message_id
    assert by_handler.envelope.source == "probe"

    missing = events_cli(broker, "show", str(uuid.uuid4()))
    assert missing.returncode == 1
    assert "no event" in missing.stderr
    assert "postroom events tail" in missing.stderr


def test_tail_prints_the_newest_events_oldest_first_then_follows_new_ones(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    published = [bus.publish(ProbeLogged(key=key)) for _ in range(3)]
    tail = events_cli(broker, "tail", "-n", "3")
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines] == published
    assert all(LOGGED in line and key in line for line in lines)

    follower = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "events", "tail", "-n", "1", "--follow"],
        cwd=ROOT, env=broker.env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    printed: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [printed.put(x) for x in follower.stdout or ()])
    reader.start()
    try:
        assert printed.get(timeout=60).split()[1] == published[-1]  # following from here on
        later = bus.publish(ProbeLogged(key=key))
        assert printed.get(timeout=30).split()[1] == later
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 0
        reader.join(timeout=10)


def test_replay_goes_to_one_pool_only_and_its_inbox_skips_what_it_handled_unless_forced(
    broker: BrokerContext, bus: MessageBus, pools: dict[str, Pool]
) -> None:
    key = uuid.uuid4().hex
    first = [bus.publish(ProbeHappened(key=key)) for _ in range(3)]
    time.sleep(0.01)
    since = datetime.now(UTC).isoformat()
    later = [bus.publish(ProbeHappened(key=key)) for _ in range(2)]
    bus.publish(ProbeLogged(key=key))  # a type pool_b does not subscribe to: never replayed
    handled = dict.fromkeys(POOLS, 5)
    wait_for(lambda: runs(broker, key) == handled, timeout=60)

    worker_of(broker, "pool_b").stop()
    out = events_cli(broker, "replay", "--pool", "pool_b", "--since", since)
    assert out.returncode == 0, out.stderr
    assert replayed_count(out.stdout) == 2
    assert broker.queue_size("events.pool_b") == 2
    assert broker.queue_size("events.pool_a") == broker.queue_size("events.pool_c") == 0
    out = events_cli(broker, "replay", "--pool", "pool_b", "--type", HAPPENED)  # whole history
    assert replayed_count(out.stdout) >= 5
    waiting = broker.queue_size("events.pool_b")
    assert waiting == 2 + replayed_count(out.stdout)
    worker = broker.start_worker(pools["pool_b"])
    wait_for(lambda: succeeded(worker, "pool_b") >= waiting, timeout=60)  # each copy delivered...
    time.sleep(1.0)
    assert runs(broker, key) == handled  # ...and skipped: no second effect anywhere
    assert sorted(deliveries(broker, key, "pool_b")) == sorted(first + later)

    worker.stop()
    forced = events_cli(broker, "replay", "--pool", "pool_b", "--since", since, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "forced" in forced.stdout
    assert replayed_count(forced.stdout) == 2
    broker.start_worker(pools["pool_b"])
    wait_for(lambda: runs(broker, key).get("pool_b") == 7, timeout=60)
    time.sleep(1.0)
    assert runs(broker, key) == {"pool_a": 5, "pool_b": 7, "pool_c": 5}
    assert sorted(deliveries(broker, key, "pool_b")) == sorted(first + later + later)


def test_replay_refuses_a_pool_or_type_it_cannot_deliver_naming_what_it_knows(
    broker: BrokerContext,
) -> None:
    unknown = events_cli(broker, "replay", "--pool", "nobody")
    assert unknown.returncode == 2
    assert "pool 'nobody' subscribes to no event type" in unknown.stderr
    assert "pool_a" in unknown.stderr
    wrong = events_cli(broker, "replay", "--pool", "pool_b", "--type", LOGGED)
    assert wrong.returncode == 2
    assert f"does not subscribe to {LOGGED!r}" in wrong.stderr
    bad_time = events_cli(broker, "replay", "--pool", "pool_b", "--since", "last week")
    assert bad_time.returncode == 2
    assert "ISO 8601" in bad_time.stderr


def test_a_new_pool_is_bootstrapped_from_history_then_continues_live_with_one_effect_each(
    broker: BrokerContext, bus: MessageBus
) -> None:
    key = uuid.uuid4().hex
    assert not queue_declared(broker, NEW_POOL)  # it exists in code only: no queue keeps copies
    published = [bus.publish(ProbeHappened(key=key)) for _ in range(200)]
    assert not queue_declared(broker, NEW_POOL)

    stop = threading.Event()

    def keep_publishing() -> None:
        while not stop.is_set():
            published.append(bus.publish(ProbeHappened(key=key)))
            time.sleep(0.005)

    publisher = threading.Thread(target=keep_publishing)
    publisher.start()
    try:
        wait_for(lambda: len(published) >= 230, timeout=60)
        out = events_cli(broker, "replay", "--pool", NEW_POOL)  # declares, then replays
        assert out.returncode == 0, out.stderr
        assert replayed_count(out.stdout) >= 230
        assert queue_declared(broker, NEW_POOL)
        after_replay = len(published)
        wait_for(lambda: len(published) >= after_replay + 30, timeout=60)
        broker.start_worker(Pool(NEW_POOL, (event_queue_name(NEW_POOL),), concurrency=1))
        time.sleep(1.0)
    finally:
        stop.set()
        publisher.join(timeout=30)

    wait_for(lambda: len(deliveries(broker, key, NEW_POOL)) >= len(published), timeout=180)
    again = events_cli(broker, "replay", "--pool", NEW_POOL)  # a second run changes nothing
    assert replayed_count(again.stdout) >= len(published)
    wait_for(lambda: broker.queue_size(event_queue_name(NEW_POOL)) == 0, timeout=120)
    time.sleep(2.0)
    handled = deliveries(broker, key, NEW_POOL)
    assert len(handled) == len(set(handled)) == len(published)  # no duplicate
    assert set(handled) == set(published)  # no gap
    assert runs(broker, key)[NEW_POOL] == len(published)  # the handler ran once per event
