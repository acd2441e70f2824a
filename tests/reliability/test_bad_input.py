"""Bad input never stops a worker and is never lost: each malformed message is rejected or kept.

A corpus of hand-made malformed messages (bad JSON, wrong shapes, wrong types, missing or forged
headers, unknown tasks, refused content types, 2 MB payloads) is put on the queues between good
commands, and hypothesis fuzzes the headers and payloads of ``probe.Echo``. Every bad message must
come out dead-lettered with its reason, and a rejected reply when it is a command postroom decoded;
the workers must keep running, the same processes, and every good message must succeed.

``HARSH`` holds the malformed messages that Celery itself chokes on (they used to stop a worker, or
vanish without a dead letter, until postroom's consumer checked a message's shape first). Each runs
on a queue and worker of its own, so one that regressed could not poison the rest of the module.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from celery.result import AsyncResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection

from config.pools import Pool
from postroom import MessageBus
from postroom.headers import PREFIX, Envelope
from postroom.messages import Reply
from postroom.reliability import DeadLetter, reliability
from tests.integration.services import Echo
from tests.support import BrokerContext, WorkerProcess, wait_for
from workers.launcher import node_name, wait_until_ready

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

JSON = "application/json"
COMMANDS, EVENTS = "commands.probe", "events.pool_a"
ECHO, PROBE_HAPPENED = "probe.Echo", "probe.ProbeHappened"
MARKER = "x-bad-input"  # a header of ours: finds a dead letter that has no usable task id
DROP = object()  # a header override that removes the header
TWO_MB = 2 * 1024 * 1024
PICKLE = "application/x-python-serialize"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def proto2(args: Any = (), kwargs: Any = None, embed: Any = EMBED) -> bytes:
    """A Celery protocol-2 body, ``[args, kwargs, embed]``, with any of the three made wrong."""
    return json.dumps(
        [list(args) if isinstance(args, tuple) else args, {} if kwargs is None else kwargs, embed]
    ).encode()


@dataclass(frozen=True)
class Bad:
    """One malformed message, and what postroom must do with it."""

    name: str
    body: bytes
    reason: str  # the dead letter's reason
    rejected: bool = False  # a command postroom decoded: its sender also gets a rejected reply
    content_type: str = JSON
    content_encoding: str = "utf-8"
    queue: str = COMMANDS
    task: str = ECHO
    envelope: bool = True  # carries valid postroom headers (before ``headers`` overrides them)
    headers: dict[str, Any] = field(default_factory=dict)  # overrides; DROP removes a header
    bug: str = ""  # what Celery did with it before postroom's consumer checked its shape

    def message(self, marker: str) -> tuple[str, dict[str, Any]]:
        """The task id and the headers to publish this message with."""
        task_id = str(uuid.uuid4())
        message_type = PROBE_HAPPENED if self.queue == EVENTS else ECHO
        headers: dict[str, Any] = {
            "id": task_id, "task": self.task, "lang": "py", "argsrepr": "", "kwargsrepr": "",
            MARKER: marker,
        }  # fmt: skip
        if self.envelope:
            envelope = Envelope.new(message_type, 1, source="bad-input", message_id=task_id)
            headers.update(envelope.to_headers())
        for name, value in self.headers.items():
            if value is DROP:
                headers.pop(name, None)
            else:
                headers[name] = value
        return task_id, headers


def invalid(name: str, body: bytes = b"", **kw: Any) -> Bad:
    """A command that reaches its task, which rejects it: a rejected reply and an invalid letter."""
    return Bad(name, body or proto2(kwargs={"text": "hello"}), "invalid", rejected=True, **kw)


def envelope_header(name: str, value: Any) -> dict[str, Any]:
    return {PREFIX + name: value}


GOOD = {"text": "hello"}
EVENT = {"key": "k"}
NESTED = b'[[], {"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}, {}]"
BINARY = {"content_encoding": "binary"}


def event(name: str, body: bytes, reason: str, **kw: Any) -> Bad:
    """A malformed event for pool_a: there is no reply to give, so a dead letter alone."""
    return Bad(name, body, reason, queue=EVENTS, task=kw.pop("task", PROBE_HAPPENED), **kw)


CORPUS: list[Bad] = [
    # malformed JSON, and bytes that are not JSON at all
    Bad("json-truncated", b'[[], {"text": "hel', "undecodable"),
    Bad("json-single-quotes", b"[[], {'text': 'hello'}, {}]", "undecodable"),
    Bad("json-trailing-comma", b'[[], {"text": "hello",}, {}]', "undecodable"),
    Bad("json-bare-word", b"hello", "undecodable"),
    Bad("json-nested-100k-deep", NESTED, "undecodable"),
    Bad("binary-garbage", bytes(range(256)) * 4, "undecodable"),
    Bad("utf16-json", json.dumps([[], GOOD, {}]).encode("utf-16"), "undecodable"),
    # wrong shapes and headers that Celery itself refuses
    Bad("body-protocol-1-string", b'"args and kwargs"', "invalid"),
    Bad("body-protocol-1-kwargs-a-string", b'{"args": [], "kwargs": "text=hello"}', "invalid"),
    Bad("eta-header-not-a-time", proto2(kwargs=GOOD), "invalid", headers={"eta": "tomorrow"}),
    Bad("expires-header-not-a-time", proto2(kwargs=GOOD), "invalid", headers={"expires": "never"}),
    # wrong shapes (today postroom's task refuses them; a check before Celery could instead: so
    # the dead letter is required, the rejected reply is not) and positional arguments
    Bad("args-a-string", proto2("xy", GOOD), "invalid"),
    Bad("args-a-mapping", proto2({"text": "hello"}, {}), "invalid"),
    invalid("body-protocol-1-mapping", b'{"args": [], "kwargs": {"txt": "hello"}}'),
    invalid("positional-args", proto2(("hello",), {})),
    invalid("positional-and-keyword-args", proto2(("hello",), GOOD)),
    # wrong field types, missing fields, extra fields, 2 MB fields
    invalid("text-an-int", proto2(kwargs={"text": 42})),
    invalid("text-null", proto2(kwargs={"text": None})),
    invalid("text-a-list", proto2(kwargs={"text": ["hello"]})),
    invalid("text-an-object", proto2(kwargs={"text": {"value": "hello"}})),
    invalid("text-a-bool", proto2(kwargs={"text": True})),
    invalid("text-nan", b'[[], {"text": NaN}, {}]'),
    invalid("kwargs-empty", proto2(kwargs={})),
    invalid("field-misspelt", proto2(kwargs={"txt": "hello"})),
    invalid("extra-field", proto2(kwargs={"text": "hello", "urgent": True})),
    invalid("extra-field-of-2mb", proto2(kwargs={"text": "hello", "attachment": "x" * TWO_MB})),
    invalid("text-2mb-in-a-list", proto2(kwargs={"text": ["x" * TWO_MB]})),
    # missing and malformed postroom headers
    # (a command with no postroom header at all is a plain Celery client's: handled, see
    # tests/integration/test_plain_celery.py; an event delivery without them is refused below)
    invalid("message-id-missing", headers=envelope_header("message_id", DROP)),
    invalid("message-type-missing", headers=envelope_header("message_type", DROP)),
    invalid("created-at-missing", headers=envelope_header("created_at", DROP)),
    invalid("message-id-not-a-uuid", headers=envelope_header("message_id", "message-1")),
    invalid("message-id-an-int", headers=envelope_header("message_id", 12345)),
    invalid("correlation-id-not-a-uuid", headers=envelope_header("correlation_id", "abc")),
    invalid("causation-id-not-a-uuid", headers=envelope_header("causation_id", "")),
    invalid("version-a-string", headers=envelope_header("version", "1")),
    invalid("version-a-float", headers=envelope_header("version", 1.5)),
    invalid("version-a-bool", headers=envelope_header("version", True)),
    invalid("message-type-empty", headers=envelope_header("message_type", "")),
    invalid("source-empty", headers=envelope_header("source", "")),
    invalid("created-at-not-a-time", headers=envelope_header("created_at", "yesterday")),
    invalid("created-at-an-int", headers=envelope_header("created_at", 1_700_000_000)),
    invalid("message-type-of-another", headers=envelope_header("message_type", "probe.Flaky")),
    invalid("message-type-unknown", headers=envelope_header("message_type", "probe.Nothing")),
    # tasks nobody knows, and messages that are no Celery task at all
    Bad("unknown-task", proto2(kwargs=GOOD), "unknown", task="probe.Nonexistent"),
    Bad("unknown-service", proto2(kwargs=GOOD), "unknown", task="nosuch.Thing"),
    Bad("empty-task-name", proto2(kwargs=GOOD), "unknown", task=""),
    Bad("task-name-an-int", proto2(kwargs=GOOD), "unknown", headers={"task": 123}),
    Bad("no-celery-headers", proto2(kwargs=GOOD), "unknown", headers={"id": DROP, "task": DROP}),
    # content types the workers refuse
    Bad("xml", b"<echo><text>hello</text></echo>", "undecodable", content_type="application/xml"),
    Bad("text-plain", b"hello", "undecodable", content_type="text/plain"),
    Bad(
        "octet-stream",
        b"\x00\x01",
        "undecodable",
        content_type="application/octet-stream",
        **BINARY,
    ),
    Bad(
        "msgpack",
        b"\x93\x90\x80\x80",
        "undecodable",
        content_type="application/x-msgpack",
        **BINARY,
    ),
    Bad("yaml", b"- []\n- {text: hello}\n- {}\n", "undecodable", content_type="application/x-yaml"),
    Bad("pickle", pickle.dumps(((), GOOD, {})), "undecodable", content_type=PICKLE, **BINARY),
    # events
    event("event-json-truncated", b'[[], {"key": ', "undecodable"),
    event("event-field-missing", proto2(kwargs={}), "invalid"),
    event("event-field-wrong-type", proto2(kwargs={"key": 5}), "invalid"),
    event("event-positional-args", proto2(("k",), {}), "invalid"),
    event("event-no-postroom-headers", proto2(kwargs=EVENT), "invalid", envelope=False),
    event(
        "event-message-id-not-a-uuid",
        proto2(kwargs=EVENT),
        "invalid",
        headers=envelope_header("message_id", "event-1"),
    ),
    event(
        "event-message-type-of-a-command",
        proto2(kwargs=EVENT),
        "invalid",
        headers=envelope_header("message_type", ECHO),
    ),
    event("event-unknown-task", proto2(kwargs=EVENT), "unknown", task="probe.Nonexistent"),
]


def stops(name: str, body: bytes, reason: str, why: str, **kw: Any) -> Bad:
    """Celery's consumer raises in the worker's main process, and DeadLetteringConsumer does not
    catch it: the worker exits with "Unrecoverable error" (on Redis, a missing id header makes it
    reconnect forever instead), and the unacked message goes to the next worker, which it stops."""
    return Bad(name, body, reason, bug=f"stops the worker: the consumer raises {why}", **kw)


def lost(name: str, body: bytes, reason: str, why: str, **kw: Any) -> Bad:
    """It passes the consumer and fails in the pool process before the task body runs, so no
    dead letter is written; at most the sender gets a "failed" reply naming a TypeError."""
    return Bad(name, body, reason, bug=f"vanishes without a dead letter: {why}", **kw)


OUTSIDE = "InvalidTaskError raised outside the task body"
CALLBACK = "'Pool callback raised exception'"
STAR = "a 'failed' reply, TypeError: argument after * must be an iterable"

HARSH: list[Bad] = [
    stops("body-two-elements", b'[[], {"text": "hello"}]', "invalid", "ValueError (unpacking)"),
    stops("body-a-mapping", b'{"text": "hello"}', "invalid", "ValueError (unpacking)"),
    stops("body-null", b"null", "invalid", "TypeError ('args' in None)"),
    stops(
        "application-text",
        b"hello",
        "undecodable",
        "ValueError (kombu trusts application/text, and 'hello' does not unpack into 3)",
        content_type="application/text",
    ),
    stops("empty-body", b"", "undecodable", "TypeError or ValueError (unpacking b'')"),
    stops(
        "no-content-type",
        proto2(kwargs=GOOD),
        "undecodable",
        "TypeError ('args' in bytes; kombu marks it application/data, binary)",
        content_type="",
        content_encoding="",
    ),
    stops(
        "id-header-missing", proto2(kwargs=GOOD), "invalid", "KeyError('id')", headers={"id": DROP}
    ),
    stops(
        "task-header-a-list",
        proto2(kwargs=GOOD),
        "unknown",
        "TypeError (unhashable)",
        headers={"task": [ECHO]},
    ),
    stops(
        "timelimit-malformed",
        proto2(kwargs=GOOD),
        "invalid",
        "ValueError",
        headers={"timelimit": "x"},
    ),
    lost("kwargs-a-list", proto2(kwargs=[]), "invalid", OUTSIDE),
    lost("kwargs-a-string", proto2(kwargs="text"), "invalid", OUTSIDE),
    lost("kwargs-null", b"[[], null, {}]", "invalid", OUTSIDE),
    lost("embed-a-string", proto2(kwargs=GOOD, embed="zz"), "invalid", f"{CALLBACK} TypeError"),
    # a string of exactly 3 characters unpacks into args, kwargs, embed; any other length stops
    lost("body-a-3-char-string", b'"abc"', "invalid", f"{CALLBACK} TypeError"),
    lost("body-three-numbers", b"[1, 2, 3]", "invalid", f"{CALLBACK} TypeError"),
    lost(
        "id-header-an-int",
        proto2(kwargs=GOOD),
        "invalid",
        "no result at all",
        headers={"id": 12345},
    ),
    lost("args-an-int", proto2(5, GOOD), "invalid", STAR),
    lost("args-null", proto2(None, GOOD), "invalid", STAR),
    lost(
        "kwarg-named-task",
        proto2(kwargs={"text": "hello", "task": 1}),
        "invalid",
        "a 'failed' reply, TypeError: run() got multiple values for argument 'task'",
    ),
    lost(
        "embed-callbacks-an-int",
        proto2(kwargs=GOOD, embed={"callbacks": 5}),
        "invalid",
        "a 'failed' reply, TypeError: object of type 'int' has no len()",
    ),
    lost(
        "retries-header-a-string",
        proto2(kwargs=GOOD),
        "invalid",
        "a 'failed' reply, TypeError: can only concatenate str",
        headers={"retries": "many"},
    ),
]
# The messages that stop a worker each get a worker of their own; the rest share one.
STOPPERS = [bad.name for bad in HARSH if bad.bug.startswith("stops")]


# --- helpers --------------------------------------------------------------------------------------


def connect(broker: BrokerContext) -> Connection:
    return Connection(
        broker.settings.broker_url, transport_options=broker.app.conf.broker_transport_options
    )


def publish(producer: Any, bad: Bad, marker: str, queue: str | None = None) -> str:
    """Put one malformed message on its queue as raw bytes; returns its task id."""
    task_id, headers = bad.message(marker)
    producer.publish(
        bad.body, exchange="", routing_key=queue or bad.queue, headers=headers,
        content_type=bad.content_type, content_encoding=bad.content_encoding,
    )  # fmt: skip
    return task_id


def publish_echo(producer: Any, queue: str, text: str) -> str:
    """A good Echo, published raw like the bad ones (so it can go to any queue); returns its id."""
    envelope = Envelope.new(ECHO, 1, source="bad-input")
    headers = {
        "id": envelope.correlation_id, "task": ECHO, "lang": "py", "argsrepr": "", "kwargsrepr": "",
        **envelope.to_headers(),
    }  # fmt: skip
    producer.publish(
        proto2(kwargs={"text": text}), exchange="", routing_key=queue, headers=headers,
        content_type=JSON, content_encoding="utf-8",
    )  # fmt: skip
    return envelope.correlation_id


class Letters:
    """The dead-letter store, read incrementally (a few letters are 2 MB)."""

    def __init__(self, broker: BrokerContext) -> None:
        self.store = reliability(broker.app).dead_letters
        self.seen: dict[str, DeadLetter] = {}

    def refresh(self) -> None:
        for letter_id in self.store.ids():
            if letter_id not in self.seen and (letter := self.store.get(letter_id)):
                self.seen[letter_id] = letter

    def marked(self, marker: str) -> DeadLetter | None:
        found = [letter for letter in self.seen.values() if letter.headers.get(MARKER) == marker]
        assert len(found) <= 1, f"{len(found)} dead letters for {marker}"
        return found[0] if found else None

    def of_task(self, task_id: str) -> list[DeadLetter]:
        return [letter for letter in self.seen.values() if letter.task_id == task_id]


def reply_of(bus: MessageBus, task_id: str, timeout: float = 30.0) -> Reply:
    return bus.reply_for(task_id, timeout=timeout)


def still_running(broker: BrokerContext, worker: WorkerProcess, pid: int) -> None:
    """The very process started for the module is running and answering, not a replacement."""
    assert worker.proc.poll() is None, (
        f"worker {worker.pool.name} exited:\n{worker.output()[-3000:]}"
    )
    node = node_name(worker.pool)
    stats = broker.app.control.inspect(destination=[node], timeout=5.0).stats() or {}
    assert stats.get(node, {}).get("pid") == pid, f"{node} answered {stats!r}, expected pid {pid}"
    assert "Unrecoverable error" not in worker.output()


@dataclass
class Workers:
    probe: WorkerProcess
    pool_a: WorkerProcess
    pids: dict[str, int]

    def check(self, broker: BrokerContext) -> None:
        for worker in (self.probe, self.pool_a):
            still_running(broker, worker, self.pids[worker.pool.name])


@pytest.fixture(scope="module")
def workers(broker: BrokerContext) -> Workers:
    probe = broker.start_worker(Pool("probe", (COMMANDS,), concurrency=1))
    pool_a = broker.start_worker(Pool("pool_a", (EVENTS,), concurrency=1))
    return Workers(probe, pool_a, {"probe": probe.proc.pid, "pool_a": pool_a.proc.pid})


@pytest.fixture(scope="module")
def bus(broker: BrokerContext, workers: Workers) -> MessageBus:
    return MessageBus(broker.app, source="tests")


# --- the corpus -----------------------------------------------------------------------------------


def test_the_corpus_has_a_malformed_message_of_every_kind() -> None:
    names = [bad.name for bad in CORPUS + HARSH]
    assert len(set(names)) == len(names)
    assert len(CORPUS) >= 30
    assert {bad.queue for bad in CORPUS} == {COMMANDS, EVENTS}
    assert {bad.reason for bad in CORPUS} == {"undecodable", "unknown", "invalid"}
    assert max(map(len, (bad.body for bad in CORPUS))) > TWO_MB


def test_every_malformed_message_is_dead_lettered_with_its_reason_and_the_good_ones_around_it_succeed(
    broker: BrokerContext, workers: Workers, bus: MessageBus
) -> None:
    run = uuid.uuid4().hex[:8]
    sent: dict[str, tuple[Bad, str]] = {}  # marker -> (message, task id)
    echoes = []
    with connect(broker) as conn:
        producer = conn.Producer()
        for i, bad in enumerate(CORPUS):
            marker = f"{run}:{bad.name}"
            sent[marker] = (bad, publish(producer, bad, marker))
            if i % 3 == 0 and len(echoes) < 20:
                echoes.append((f"good {i}", bus.send(Echo(text=f"good {i}"))))
    while len(echoes) < 20:
        echoes.append((f"good {len(echoes)}", bus.send(Echo(text=f"good {len(echoes)}"))))

    for text, pending in echoes:
        reply = pending.reply(timeout=60)
        assert (reply.status, reply.value and reply.value["text"]) == ("succeeded", text)

    letters = Letters(broker)

    def all_dead_lettered() -> bool:
        letters.refresh()
        return all(letters.marked(marker) for marker in sent)

    try:
        wait_for(all_dead_lettered, timeout=60, interval=0.5)
    except AssertionError:
        missing = [bad.name for marker, (bad, _) in sent.items() if not letters.marked(marker)]
        pytest.fail(f"no dead letter for {missing}")
    wrong = {}
    for marker, (bad, task_id) in sent.items():
        letter = letters.marked(marker)
        assert letter is not None
        if letter.reason != bad.reason or not letter.error_message.strip():
            wrong[bad.name] = (letter.reason, letter.error_type, letter.error_message[:200])
        if bad.rejected:
            reply = reply_of(bus, task_id)
            if reply.status != "rejected" or not (reply.error and reply.error.message):
                wrong[bad.name] = ("reply", reply.status, reply.error)
    assert not wrong, f"dead-lettered or replied to wrongly: {wrong}"
    workers.check(broker)


# --- fuzzing --------------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
NAME = st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=12)
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
GARBAGE = st.one_of(SCALAR, st.lists(SCALAR, max_size=3), st.dictionaries(NAME, SCALAR, max_size=2))
JSON_VALUE = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
# A fresh message ID for every example: a repeated one is (rightly) answered from the inbox with the
# reply its first message got, which is deduplication, not what this test is about.
FRESH_ID = st.builds(lambda: str(uuid.uuid4()))
VALID_FIELD = {
    "message_id": FRESH_ID,
    "correlation_id": st.uuids().map(str),
    "causation_id": st.one_of(st.none(), st.uuids().map(str)),
    "message_type": st.just(ECHO),
    # Echo's version, mostly; any other is refused (no upcaster reaches it), which is checked too
    "version": st.one_of(st.just(1), st.integers(-(2**31), 2**31 - 1)),
    "source": TEXT.filter(bool),
    "created_at": st.datetimes().map(datetime.isoformat),
}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Postroom headers: valid, with some fields made wrong or left out, or entirely random."""
    headers = {PREFIX + name: draw(value) for name, value in VALID_FIELD.items()}
    mode = draw(st.sampled_from(["valid", "mutated", "dropped", "random"]))
    if mode == "mutated":
        for name in draw(st.sets(st.sampled_from(sorted(VALID_FIELD)), min_size=1, max_size=3)):
            headers[PREFIX + name] = draw(st.one_of(GARBAGE, VALID_FIELD[name]))
    elif mode == "dropped":
        for name in draw(st.sets(st.sampled_from(sorted(VALID_FIELD)), min_size=1, max_size=3)):
            del headers[PREFIX + name]
    elif mode == "random":
        names = st.sampled_from([PREFIX + name for name in VALID_FIELD])
        headers = draw(st.dictionaries(names, GARBAGE, max_size=len(VALID_FIELD)))
    extra = st.one_of(NAME.map(lambda n: f"x-fuzz-{n}"), NAME.map(lambda n: f"{PREFIX}x-{n}"))
    headers.update(draw(st.dictionaries(extra, GARBAGE, max_size=3)))
    return headers


KWARG_NAME = st.one_of(st.just("text"), TEXT)
PAYLOADS = st.one_of(
    st.fixed_dictionaries({"text": TEXT}),
    st.fixed_dictionaries({"text": JSON_VALUE}),
    st.fixed_dictionaries({"text": TEXT}, optional={"extra": JSON_VALUE}),
    st.dictionaries(KWARG_NAME, JSON_VALUE, max_size=4),
)


def valid_envelope(headers: dict[str, Any]) -> bool:
    """The envelope rules, restated independently of postroom.headers."""

    def is_uuid(value: Any) -> bool:
        try:
            return isinstance(value, str) and bool(uuid.UUID(value))
        except ValueError:
            return False

    def is_time(value: Any) -> bool:
        try:
            return isinstance(value, str) and bool(datetime.fromisoformat(value))
        except ValueError:
            return False

    if not any(name.startswith(PREFIX) for name in headers):
        return True  # a plain Celery client's command: its envelope comes from Celery's fields
    get = headers.get
    required = [name for name in VALID_FIELD if name != "causation_id"]
    return (
        all(PREFIX + name in headers for name in required)
        and is_uuid(get(PREFIX + "message_id"))
        and is_uuid(get(PREFIX + "correlation_id"))
        and (get(PREFIX + "causation_id") is None or is_uuid(get(PREFIX + "causation_id")))
        and type(get(PREFIX + "version")) is int
        and get(PREFIX + "version") == 1  # Echo's version: others are refused (see upcasting)
        and get(PREFIX + "message_type") == ECHO
        and isinstance(get(PREFIX + "source"), str)
        and bool(get(PREFIX + "source"))
        and is_time(get(PREFIX + "created_at"))
    )


def valid_payload(kwargs: dict[str, Any]) -> bool:
    return set(kwargs) == {"text"} and isinstance(kwargs["text"], str)


def test_fuzzed_headers_and_payloads_each_get_a_reply_or_a_dead_letter_and_the_worker_keeps_running(
    broker: BrokerContext, workers: Workers, bus: MessageBus
) -> None:
    sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(headers=envelopes(), kwargs=PAYLOADS)
    def send(headers: dict[str, Any], kwargs: dict[str, Any]) -> None:
        task_id = str(uuid.uuid4())
        broker.app.send_task(ECHO, kwargs=kwargs, task_id=task_id, headers=headers, queue=COMMANDS)
        sent.append((task_id, headers, kwargs))

    send()
    valid = [valid_envelope(h) and valid_payload(k) for _, h, k in sent]
    assert any(valid), "no valid example was generated"
    assert not all(valid), "no invalid example was generated"

    letters = Letters(broker)
    for (task_id, headers, kwargs), ok in zip(sent, valid, strict=True):
        example = f"headers={headers!r} kwargs={kwargs!r}"
        reply = reply_of(bus, task_id)
        if ok:
            assert reply.status == "succeeded", f"{reply!r} for valid {example}"
            assert reply.value is not None
            assert reply.value["text"] == kwargs["text"]
            continue
        assert reply.status == "rejected", f"{reply!r} for invalid {example}"
        assert reply.error is not None
        assert reply.error.message
        letters.refresh()
        [letter] = letters.of_task(task_id)
        assert letter.reason == "invalid", f"{letter.reason} for {example}"
        assert letter.error_message
    workers.check(broker)


# --- known bugs -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    worker: WorkerProcess
    echo: str  # the task id of the good Echo sent right after the bad message, to the same queue
    marker: str
    letter: DeadLetter | None = None
    echo_status: str = "no reply"


def _start_workers(broker: BrokerContext, pools: list[Pool]) -> list[WorkerProcess]:
    """Start several workers at once (one at a time would take most of the module's budget)."""
    started = [broker.spawn_worker(pool) for pool in pools]
    wait_until_ready(broker.app, pools, timeout=120)
    return started


@pytest.fixture(scope="module")
def known_bug_outcomes(broker: BrokerContext) -> Iterator[dict[str, Outcome]]:
    """Each known bug sent to a queue of its own worker(s), followed there by a good Echo."""
    groups = [[bad] for bad in HARSH if bad.name in STOPPERS]
    groups.append([bad for bad in HARSH if bad.name not in STOPPERS])
    pools = [Pool(f"bad{i}", (f"bad-input.{i}",), concurrency=1) for i in range(len(groups))]
    started = _start_workers(broker, pools)
    run = uuid.uuid4().hex[:8]
    outcomes: dict[str, Outcome] = {}
    with connect(broker) as conn:
        producer = conn.Producer()
        for group, worker in zip(groups, started, strict=True):
            queue = worker.pool.queues[0]
            for bad in group:
                marker = f"{run}:{bad.name}"
                publish(producer, bad, marker, queue)
                echo = publish_echo(producer, queue, f"after {bad.name}")
                outcomes[bad.name] = Outcome(worker, echo, marker)

    bus = MessageBus(broker.app)
    waiting = dict(outcomes)
    deadline = time.monotonic() + 20  # a worker that hangs rather than exits is given this long
    while waiting and time.monotonic() < deadline:
        for name, outcome in list(waiting.items()):
            if AsyncResult(outcome.echo, app=broker.app).ready():
                outcome.echo_status = bus.reply_for(outcome.echo, timeout=5).status
                del waiting[name]
            elif outcome.worker.proc.poll() is not None:
                del waiting[name]
        time.sleep(0.2)
    time.sleep(0.5)  # a dead letter is written before the next message is taken: this is margin
    letters = Letters(broker)
    letters.refresh()
    for outcome in outcomes.values():
        outcome.letter = letters.marked(outcome.marker)
    yield outcomes

    stoppers = [threading.Thread(target=w.stop) for w in started]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()


@pytest.mark.parametrize("bad", [pytest.param(bad, id=bad.name) for bad in HARSH])
def test_a_message_celery_itself_chokes_on_is_dead_lettered_and_its_worker_keeps_running(
    known_bug_outcomes: dict[str, Outcome], bad: Bad
) -> None:
    outcome = known_bug_outcomes[bad.name]
    worker = outcome.worker
    if outcome.echo_status != "succeeded":
        state = "running" if worker.proc.poll() is None else "exited"
        pytest.fail(
            f"the worker ({state}) did not answer the Echo sent after this message: "
            f"{outcome.echo_status}\n{worker.output()[-2000:]}"
        )
    assert outcome.letter is not None, "no dead letter"
    assert outcome.letter.reason in {"undecodable", "unknown", "invalid"}
    assert outcome.letter.error_message
