"""The HTTP front door as a client uses it: `postroom api` over real workers, on Redis and RabbitMQ.

Each server is a real uvicorn process started with `postroom api` and the broker context's
settings; the assets and search pools are real `celery worker` processes; every request goes over
HTTP with httpx.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from config.pools import pool_named
from tasks.assets import RegisterAsset, assets
from tasks.state import database
from tests.support import ROOT, BrokerContext, WorkerProcess, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ApiServer:
    """`postroom api` in a process of its own, on a free port, with the broker context's settings."""

    def __init__(self, broker: BrokerContext, name: str, reply_wait: str, **overrides: str) -> None:
        self.port = _free_port()
        env = dict(
            broker.env,
            **overrides,
            POSTROOM_API_PORT=str(self.port),
            POSTROOM_API_REPLY_WAIT=reply_wait,
        )
        self.log = broker.workdir / f"api-{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "api"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_serving(self) -> None:
        def serving() -> bool:
            assert self.proc.poll() is None, f"postroom api exited:\n{self.output()}"
            try:
                return self.http.get("/openapi.json").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(serving, timeout=60, interval=0.2)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


class Pools:
    """The assets and search pools of this module; the assets pool can be stopped and restarted."""

    def __init__(self, broker: BrokerContext) -> None:
        self.broker = broker
        self.search = broker.start_worker(pool_named("search"))
        self.assets: WorkerProcess = broker.start_worker(pool_named("assets"))

    def restart_assets(self) -> None:
        self.assets.stop()
        self.assets = self.broker.start_worker(pool_named("assets"))


@pytest.fixture(scope="module")
def pools(broker: BrokerContext) -> Pools:
    return Pools(broker)


@contextmanager
def _serving(broker: BrokerContext, name: str, reply_wait: str) -> Iterator[ApiServer]:
    server = ApiServer(broker, name, reply_wait)
    try:
        server.wait_until_serving()
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()


@pytest.fixture(scope="module")
def api(broker: BrokerContext, pools: Pools) -> Iterator[httpx.Client]:
    """A server that waits long enough for any reply on a busy machine: POST answers 201."""
    with _serving(broker, "patient", reply_wait="20") as server:
        yield server.http


@pytest.fixture(scope="module")
def impatient(broker: BrokerContext, pools: Pools) -> Iterator[httpx.Client]:
    """A server that does not wait for replies at all (POSTROOM_API_REPLY_WAIT=0): POST answers 202."""
    with _serving(broker, "impatient", reply_wait="0") as server:
        yield server.http


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _poll(http: httpx.Client, location: str, timeout: float = 60.0) -> httpx.Response:
    """GET ``location`` until it answers something other than 202 pending."""
    seen: list[httpx.Response] = []

    def answered() -> bool:
        seen.append(http.get(location))
        return seen[-1].status_code != 202

    wait_for(answered, timeout=timeout, interval=0.1)
    return seen[-1]


def _assets_named(broker: BrokerContext, name: str) -> list[str]:
    """IDs of the assets the assets service stored under ``name`` (in its PostgreSQL schema): the
    effect itself, counted."""
    with database(broker.settings).engine.connect() as conn:
        found = conn.scalars(select(assets.c.asset_id).where(assets.c.name == name))
        return [str(asset_id) for asset_id in found]


def test_post_answers_201_with_the_asset_and_its_location(api: httpx.Client) -> None:
    name = f"Truck {_tag()}"
    created = api.post("/assets", json={"name": name, "attributes": {"fleet": "north"}})
    assert created.status_code == 201, created.text
    asset_id = created.json()["asset_id"]
    assert created.headers["location"] == f"/assets/{asset_id}"
    assert uuid.UUID(created.headers["x-correlation-id"])

    asset = api.get(created.headers["location"])
    assert asset.status_code == 200, asset.text
    assert asset.json()["asset_id"] == asset_id
    assert asset.json()["name"] == name
    assert asset.json()["attributes"] == {"fleet": "north"}
    assert asset.json()["devices"] == []


def test_an_unknown_asset_is_404_and_a_malformed_id_422(api: httpx.Client) -> None:
    missing = uuid.uuid4()
    unknown = api.get(f"/assets/{missing}")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == f"asset {missing} does not exist"

    malformed = api.get("/assets/truck-12")
    assert malformed.status_code == 422
    assert malformed.json()["detail"][0]["loc"] == ["path", "asset_id"]


def test_no_reply_in_time_answers_202_with_a_location_to_poll(impatient: httpx.Client) -> None:
    accepted = impatient.post("/assets", json={"name": f"Barge {_tag()}"})
    assert accepted.status_code == 202, accepted.text
    correlation_id = accepted.json()["correlation_id"]
    assert accepted.json()["status"] == "pending"
    assert accepted.headers["location"] == f"/commands/{correlation_id}"
    assert accepted.json()["location"] == accepted.headers["location"]

    done = _poll(impatient, accepted.headers["location"])
    assert done.status_code == 200, done.text
    reply = done.json()
    assert (reply["status"], reply["correlation_id"]) == ("succeeded", correlation_id)
    assert impatient.get(f"/assets/{reply['value']['asset_id']}").status_code == 200


def test_while_the_assets_pool_is_down_the_command_waits_and_is_answered_when_it_is_back(
    impatient: httpx.Client, pools: Pools
) -> None:
    pools.assets.stop()
    try:
        accepted = impatient.post("/assets", json={"name": f"Tug {_tag()}"})
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["location"]
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # nobody consumes commands.assets: pending it stays
            assert impatient.get(location).status_code == 202
            time.sleep(0.25)
    finally:
        pools.restart_assets()
    done = _poll(impatient, location)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded"


def test_an_unknown_correlation_id_is_pending_and_a_malformed_one_422(api: httpx.Client) -> None:
    unknown = api.get(f"/commands/{uuid.uuid4()}")
    assert unknown.status_code == 202
    assert unknown.json()["status"] == "pending"
    assert api.get("/commands/not-a-uuid").status_code == 422


@pytest.mark.parametrize(
    ("body", "loc", "error"),
    [
        ({}, ["body", "name"], "missing"),
        ({"name": ""}, ["body", "name"], "string_too_short"),
        ({"name": "x" * 201}, ["body", "name"], "string_too_long"),
        ({"name": "Crane", "attributes": {"floors": 3}}, ["body", "attributes", "floors"], None),
        ({"name": "Crane", "colour": "red"}, ["body", "colour"], "extra_forbidden"),
    ],
)
def test_an_invalid_body_is_422_naming_the_field(
    api: httpx.Client, body: dict[str, Any], loc: list[str], error: str | None
) -> None:
    refused = api.post("/assets", json=body)
    assert refused.status_code == 422, refused.text
    [detail] = refused.json()["detail"]
    assert detail["loc"] == loc
    if error:
        assert detail["type"] == error


def test_a_retried_post_with_the_same_idempotency_key_creates_one_asset(
    api: httpx.Client, impatient: httpx.Client, broker: BrokerContext
) -> None:
    name = f"Crane {_tag()}"
    headers = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = api.post("/assets", json={"name": name}, headers=headers)
    again = api.post("/assets", json={"name": name}, headers=headers)
    # the stored outcome comes back at once, even from a server that never waits for replies
    third = impatient.post("/assets", json={"name": name}, headers=headers)
    for response in (first, again, third):
        assert response.status_code == 201, response.text
        assert response.json() == first.json()
        assert response.headers["location"] == first.headers["location"]
        assert response.headers["x-correlation-id"] == first.headers["x-correlation-id"]
    assert _assets_named(broker, name) == [first.json()["asset_id"]]

    another = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    other = api.post("/assets", json={"name": name}, headers=another)
    assert other.status_code == 201
    assert other.json()["asset_id"] != first.json()["asset_id"]  # a new key is a new command
    assert sorted(_assets_named(broker, name)) == sorted(
        [first.json()["asset_id"], other.json()["asset_id"]]
    )


def test_a_retry_sent_before_the_first_was_answered_is_still_one_asset(
    impatient: httpx.Client, broker: BrokerContext, pools: Pools
) -> None:
    """Both requests reach the queue as one message ID: the assets service makes one asset."""
    name = f"Dredger {_tag()}"
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    pools.assets.stop()  # so that the retry certainly comes before any reply
    try:
        first = impatient.post("/assets", json={"name": name}, headers=headers)
        again = impatient.post("/assets", json={"name": name}, headers=headers)
    finally:
        pools.restart_assets()
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["correlation_id"] == again.json()["correlation_id"]

    done = _poll(impatient, first.headers["location"])
    assert done.json()["status"] == "succeeded"
    asset_id = done.json()["value"]["asset_id"]
    handled = f"assets.RegisterAsset[{first.json()['correlation_id']}] succeeded"
    wait_for(lambda: pools.assets.output().count(handled) == 2)  # both deliveries, not just one
    assert _assets_named(broker, name) == [asset_id]
    wait_for(lambda: impatient.get("/assets", params={"name": name}).json() != [])
    search = impatient.get("/assets", params={"name": name})
    assert [hit["asset_id"] for hit in search.json()] == [asset_id]


def test_search_by_name_finds_a_registered_asset(api: httpx.Client) -> None:
    tag = _tag()
    created = api.post("/assets", json={"name": f"Forklift {tag}"})
    assert created.status_code == 201, created.text
    asset_id = created.json()["asset_id"]

    # the search pool indexes AssetRegistered events: the asset appears a moment after its 201
    wait_for(lambda: api.get("/assets", params={"name": f"forklift {tag}"}).json() != [])
    hits = api.get("/assets", params={"name": f"FORKLIFT {tag}"})
    assert hits.status_code == 200
    assert hits.json() == [{"asset_id": asset_id, "name": f"Forklift {tag}"}]
    assert api.get("/assets", params={"name": f"crane {tag}"}).json() == []
    assert api.get("/assets").status_code == 422  # name is required


def test_docs_and_the_openapi_document_are_served(api: httpx.Client) -> None:
    docs = api.get("/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text

    document = api.get("/openapi.json").json()
    assert {"/assets", "/assets/{asset_id}", "/commands/{correlation_id}"} <= set(document["paths"])
    assert {"201", "202", "409", "422", "502"} <= set(
        document["paths"]["/assets"]["post"]["responses"]
    )


def test_the_post_body_mirrors_the_register_asset_contract(api: httpx.Client) -> None:
    """The HTTP schema is declared apart from the contract; this keeps the two in step."""

    def fields(schema: dict[str, Any]) -> dict[str, Any]:
        drop = {"title", "examples", "description", "default"}  # optionality: "required"
        return {
            name: {k: v for k, v in spec.items() if k not in drop}
            for name, spec in schema["properties"].items()
        }

    document = api.get("/openapi.json").json()
    body = document["components"]["schemas"]["NewAsset"]
    contract = RegisterAsset.model_json_schema()
    assert fields(body) == fields(contract)
    assert body.get("required", []) == contract.get("required", [])
    assert body["additionalProperties"] is False


def test_an_unreachable_broker_answers_503_saying_what_to_do(broker: BrokerContext) -> None:
    port = _free_port()  # nothing listens there
    dead = (
        f"redis://127.0.0.1:{port}/0"
        if broker.kind == "redis"
        else f"amqp://guest:guest@127.0.0.1:{port}//"
    )
    server = ApiServer(broker, "no-broker", reply_wait="5", POSTROOM_BROKER_URL=dead)
    try:
        server.wait_until_serving()
        refused = server.http.post("/assets", json={"name": "Truck 13"})
    finally:
        server.stop()
    assert refused.status_code == 503, refused.text
    assert "unreachable (SendFailed)" in refused.json()["detail"]
    assert "Idempotency-Key" in refused.json()["detail"]
