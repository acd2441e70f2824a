"""One correlation ID, one trace: a command, its reply and every pool's delivery of its event,
on Redis and RabbitMQ, exported by real workers over OTLP/HTTP to a collector run by the test;
and JSON log lines carrying the message's IDs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from config.pools import Pool, pool_named
from postroom import MessageBus
from tests.integration.services import EmitProbe
from tests.integration.test_api import ApiServer
from tests.support import ROOT, BrokerContext, run_python, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]
SETTINGS = {"tracing": "otlp", "log_format": "json"}


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: what a collector (or Jaeger, Tempo) would get."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receive)
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Receive(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            for resource in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource.resource.attributes
                     if a.key == "service.name"), "")  # fmt: skip
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.server.spans.append({
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                            "service": service,
                            "attributes": {a.key: a.value.string_value for a in span.attributes},
                        })  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


class _WhileCollecting(SpanProcessor):
    """Exports this process's spans to the collector until the module ends, then drops them.

    OpenTelemetry lets a process set its tracer provider once, so the provider outlives this
    module: without the switch, every later test's sends would export synchronously to a
    collector that is gone and wait out the exporter's retries each time.
    """

    def __init__(self, endpoint: str) -> None:
        self._export = SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
        self._open = True

    def on_end(self, span: ReadableSpan) -> None:
        if self._open:
            self._export.on_end(span)

    def shutdown(self) -> None:
        if self._open:
            self._open = False
            self._export.shutdown()


@pytest.fixture(scope="module")
def tracer(collector: Collector) -> Iterator[trace.Tracer]:
    """This test process plays the client (an HTTP front end, say), exporting to the collector."""
    processor = _WhileCollecting(collector.endpoint)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    yield trace.get_tracer("tests")
    processor.shutdown()


@pytest.fixture(scope="module")
def bus(broker: BrokerContext, collector: Collector) -> MessageBus:
    broker.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    broker.start_workers(
        Pool("probe", ("commands.probe",), concurrency=1),
        *(Pool(pool, (f"events.{pool}",), concurrency=1) for pool in ("pool_a", "pool_b")),
    )
    return MessageBus(broker.app, source="tests")


def test_a_command_its_event_and_every_pools_delivery_share_one_trace(
    bus: MessageBus, tracer: trace.Tracer, collector: Collector
) -> None:
    key = uuid.uuid4().hex
    with tracer.start_as_current_span("POST /probes") as root:
        pending = bus.send(EmitProbe(key=key))
    trace_id = format(root.get_span_context().trace_id, "032x")
    event_id = pending.reply(timeout=60).value

    def ours() -> list[dict[str, Any]]:
        with collector.lock:
            return [s for s in collector.spans if s["trace_id"] == trace_id]

    wanted = {"POST /probes", "send probe.EmitProbe", "handle probe.EmitProbe",
              "publish probe.ProbeHappened", "handle probe.ProbeHappened@pool_a",
              "handle probe.ProbeHappened@pool_b"}  # fmt: skip
    try:
        wait_for(lambda: wanted <= {s["name"] for s in ours()}, timeout=60)
    except AssertionError:
        raise AssertionError(
            f"spans of the trace: {sorted(s['name'] for s in ours())}; "
            f"all: {[(s['name'], s['trace_id']) for s in collector.spans]}"
        ) from None
    spans = {s["name"]: s for s in ours()}
    # each hop is a child of the one before: client -> send -> handle -> publish -> deliveries
    chain = ["POST /probes", "send probe.EmitProbe", "handle probe.EmitProbe",
             "publish probe.ProbeHappened"]  # fmt: skip
    for parent, child in itertools.pairwise(chain):
        assert spans[child]["parent_id"] == spans[parent]["span_id"], (parent, child)
    for pool in ("pool_a", "pool_b"):
        delivery = spans[f"handle probe.ProbeHappened@{pool}"]
        assert delivery["parent_id"] == spans["publish probe.ProbeHappened"]["span_id"]
        assert delivery["attributes"]["messaging.message.id"] == event_id
        assert delivery["attributes"]["messaging.message.conversation_id"] == pending.correlation_id
    assert spans["handle probe.EmitProbe"]["attributes"]["messaging.message.id"] == (
        pending.message_id
    )


def test_log_lines_written_while_handling_are_json_with_the_messages_ids(
    bus: MessageBus, broker: BrokerContext
) -> None:
    pending = bus.send(EmitProbe(key=uuid.uuid4().hex))
    pending.reply(timeout=60)
    probe = next(w for w in broker.workers if w.pool.name == "probe")

    def lines() -> list[dict[str, Any]]:
        found = []
        for line in probe.output().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("correlation_id") == pending.correlation_id:
                found.append(entry)
        return found

    wait_for(lambda: any("succeeded" in e["message"] for e in lines()), timeout=30)
    entry = next(e for e in lines() if "succeeded" in e["message"])
    assert entry["message_id"] == pending.message_id
    assert entry["message_type"] == "probe.EmitProbe"
    assert {"time", "level", "logger", "process"} <= set(entry)


def test_postroom_trace_prints_the_command_its_event_and_each_pools_delivery(
    bus: MessageBus, broker: BrokerContext
) -> None:
    pending = bus.send(EmitProbe(key=uuid.uuid4().hex))
    event_id = pending.reply(timeout=60).value
    db = broker.state()
    wait_for(lambda: all(db.exists(broker.key("inbox", "done", pool, event_id))
                         for pool in ("pool_a", "pool_b")), timeout=60)  # fmt: skip
    out = run_python(broker.env, "-m", "workers.cli", "trace", pending.correlation_id)
    assert f"conversation {pending.correlation_id}" in out
    assert f"probe.EmitProbe {pending.correlation_id}: succeeded" in out
    assert f"event probe.ProbeHappened {event_id}" in out
    assert "pool_a: handled" in out
    assert "pool_b: handled" in out
    assert "pool_c: pending" in out  # subscribed, but no worker of it runs in this test
    as_json = json.loads(
        run_python(broker.env, "-m", "workers.cli", "trace", pending.correlation_id, "--json")
    )
    [event] = as_json["events"]
    assert event["event"]["message_id"] == event_id
    assert {d["pool"]: d["status"] for d in event["deliveries"]}["pool_a"] == "handled"


def test_postroom_trace_of_an_unknown_id_says_so_and_fails() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "trace", str(uuid.uuid4())],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "nothing is known of conversation" in done.stdout


def test_an_http_request_is_the_root_of_its_commands_trace(
    bus: MessageBus, broker: BrokerContext, collector: Collector
) -> None:
    broker.start_workers(
        *(pool_named(pool) for pool in ("assets", "search", "analytics", "notifications"))
    )
    server = ApiServer(broker, "tracing", reply_wait="10")
    try:
        server.wait_until_serving()
        created = server.http.post("/assets", json={"name": f"traced {uuid.uuid4().hex[:6]}"})
        assert created.status_code == 201, created.text
        correlation_id = created.headers["X-Correlation-ID"]

        def names() -> dict[str, dict[str, Any]]:
            with collector.lock:
                by_id = [s for s in collector.spans
                         if s["attributes"].get("messaging.message.conversation_id") == correlation_id]  # fmt: skip
                trace_ids = {s["trace_id"] for s in by_id}
                return {s["name"]: s for s in collector.spans if s["trace_id"] in trace_ids}

        wanted = {"POST /assets", "send assets.RegisterAsset", "handle assets.RegisterAsset",
                  "publish assets.AssetRegistered", "handle assets.AssetRegistered@search",
                  "handle assets.AssetRegistered@notifications"}  # fmt: skip
        wait_for(lambda: wanted <= set(names()), timeout=60)
        spans = names()
        assert len({s["trace_id"] for s in spans.values()}) == 1
        assert spans["send assets.RegisterAsset"]["parent_id"] == spans["POST /assets"]["span_id"]
    finally:
        server.stop()
