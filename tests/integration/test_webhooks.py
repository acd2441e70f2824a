"""HTTP callbacks end to end: `postroom api`, the assets and webhooks pools, and a real receiver.

The receiver (tests/integration/receiver.py) is an ``http.server`` in a thread of this process,
on a free port the allow-list names; the API and the workers are real processes on Redis and on
RabbitMQ. Each path of the receiver behaves its own way: ``ok`` answers 200, ``flaky`` 500 twice
then 200, ``down`` always 500, ``moved`` redirects to ``ok``, ``slow`` answers its first request
after the callback timeout.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select

from config.pools import Pool, pool_named
from postroom import CallbackRefused, DeliverWebhook, MessageBus
from postroom.reliability import reliability
from tasks.assets import RegisterAsset, assets
from tasks.state import database
from tests.integration import receiver as callbacks
from tests.integration.receiver import (
    ALLOWED,
    PORT,
    SLOW,
    TIMED_OUT,
    TIMEOUT,
    Receiver,
    path_to,
    verified,
)
from tests.integration.services import Announce
from tests.integration.test_api import ApiServer
from tests.support import BrokerContext, run_python, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]
SETTINGS = callbacks.SETTINGS


@pytest.fixture(scope="module")
def api(broker: BrokerContext, receiver: Receiver) -> Iterator[httpx.Client]:
    broker.start_worker(pool_named("assets"))
    broker.start_worker(pool_named("webhooks"))
    server = ApiServer(broker, "webhooks", reply_wait="20")
    try:
        server.wait_until_serving()
        yield server.http
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()


def _register(api: httpx.Client, callback: str) -> httpx.Response:
    return api.post(
        "/assets", json={"name": "Truck 12"}, headers={"Postroom-Callback-Url": callback}
    )


def test_the_reply_is_posted_to_the_callback_once_and_correctly_signed(
    api: httpx.Client, receiver: Receiver
) -> None:
    path = path_to("ok")
    response = _register(api, f"http://127.0.0.1:{PORT}{path}")
    assert response.status_code == 201, response.text
    wait_for(lambda: receiver.to(path), timeout=30)
    time.sleep(2)  # a second POST of the same reply would come within this
    [received] = receiver.to(path)
    reply = verified(received)
    assert reply["status"] == "succeeded"
    assert reply["value"] == response.json()
    correlation_id = response.headers["X-Correlation-ID"]
    assert reply["correlation_id"] == correlation_id
    assert received.headers["postroom-correlation-id"] == correlation_id
    assert received.headers["content-type"] == "application/json"
    uuid.UUID(received.headers["postroom-delivery-id"])


def test_a_receiver_failing_twice_gets_the_reply_on_the_third_try_and_not_again(
    api: httpx.Client, receiver: Receiver
) -> None:
    path = path_to("flaky")
    response = _register(api, f"http://127.0.0.1:{PORT}{path}")
    assert response.status_code == 201, response.text
    wait_for(lambda: any(r.answered == 200 for r in receiver.to(path)), timeout=30)
    time.sleep(2)
    tries = receiver.to(path)
    assert [r.answered for r in tries] == [500, 500, 200]
    assert len({r.headers["postroom-delivery-id"] for r in tries}) == 1  # one delivery, retried
    assert {verified(r)["correlation_id"] for r in tries} == {response.headers["X-Correlation-ID"]}


def test_a_receiver_that_always_fails_leaves_a_dead_letter_saying_why(
    api: httpx.Client, receiver: Receiver, broker: BrokerContext
) -> None:
    path = path_to("down")
    assert _register(api, f"http://127.0.0.1:{PORT}{path}").status_code == 201
    retries = int(broker.settings.max_retries)
    wait_for(lambda: len(receiver.to(path)) == retries + 1, timeout=30)
    store = reliability(broker.app).dead_letters

    def letter() -> Any:
        found = [store.get(i) for i in store.ids()]
        return next((x for x in found if x and path in x.kwargs.get("url", "")), None)

    wait_for(lambda: letter() is not None, timeout=30)
    kept = letter()
    assert (kept.reason, kept.queue, kept.error_type) == (
        "failed",
        "commands.webhooks",
        "CallbackFailed",
    )
    assert kept.error_message.startswith("answered 500: POST ")
    assert kept.attempts == retries + 1
    listed = run_python(broker.env, "-m", "workers.cli", "dlq", "list")
    [line] = [line for line in listed.splitlines() if kept.id in line]
    assert "webhooks.DeliverWebhook" in line
    assert "CallbackFailed: answered 500" in line
    time.sleep(1)
    assert len(receiver.to(path)) == retries + 1  # nothing more once it is a dead letter


@pytest.mark.parametrize(
    "callback",
    [
        "http://127.0.0.1:1/hooks/ok/x",  # another port
        f"http://127.0.0.1:{PORT}/elsewhere",  # not under the prefix
        f"http://user:pw@127.0.0.1:{PORT}/hooks/ok/x",  # credentials
        f"ftp://127.0.0.1:{PORT}/hooks/ok/x",
    ],
)
def test_a_callback_url_off_the_allow_list_is_refused_with_422_and_nothing_is_sent(
    api: httpx.Client, receiver: Receiver, broker: BrokerContext, callback: str
) -> None:
    name = f"refused {uuid.uuid4().hex[:8]}"
    response = api.post("/assets", json={"name": name}, headers={"Postroom-Callback-Url": callback})
    assert response.status_code == 422
    assert ALLOWED in response.json()["detail"]
    assert "POSTROOM_CALLBACK_ALLOW" in response.json()["detail"]
    time.sleep(1)  # a command sent all the same would be handled by the running assets pool
    with database(broker.settings).engine.connect() as conn:
        assert conn.execute(select(assets.c.asset_id).filter_by(name=name)).all() == []


def test_a_reply_later_than_the_post_waits_still_reaches_the_callback(
    broker: BrokerContext, api: httpx.Client, receiver: Receiver
) -> None:
    impatient = ApiServer(broker, "webhooks-impatient", reply_wait="0")
    try:
        impatient.wait_until_serving()
        path = path_to("ok")
        response = _register(impatient.http, f"http://127.0.0.1:{PORT}{path}")
    finally:
        impatient.stop()
    assert response.status_code == 202, response.text
    wait_for(lambda: receiver.to(path), timeout=30)
    [received] = receiver.to(path)
    reply = verified(received)
    assert (reply["status"], reply["correlation_id"]) == (
        "succeeded",
        response.json()["correlation_id"],
    )


def test_a_repeat_with_the_same_idempotency_key_causes_no_second_callback(
    api: httpx.Client, receiver: Receiver
) -> None:
    path = path_to("ok")
    key = {
        "Idempotency-Key": uuid.uuid4().hex,
        "Postroom-Callback-Url": f"http://127.0.0.1:{PORT}{path}",
    }
    first = api.post("/assets", json={"name": "Crane 3"}, headers=key)
    wait_for(lambda: receiver.to(path), timeout=30)
    again = api.post("/assets", json={"name": "Crane 3"}, headers=key)
    assert (first.status_code, again.status_code) == (201, 201)
    assert first.json() == again.json()
    time.sleep(2)
    assert len(receiver.to(path)) == 1


def test_a_receiver_slower_than_the_timeout_gets_it_on_the_next_try(
    api: httpx.Client, receiver: Receiver
) -> None:
    path = path_to("slow")
    started = time.monotonic()
    assert _register(api, f"http://127.0.0.1:{PORT}{path}").status_code == 201
    wait_for(lambda: len(receiver.to(path)) == 2, timeout=30)
    assert [r.answered for r in receiver.to(path)] == [TIMED_OUT, 200]
    assert time.monotonic() - started >= TIMEOUT  # the second came once the first timed out
    time.sleep(SLOW)
    assert len(receiver.to(path)) == 2


def test_a_redirect_is_not_followed(
    api: httpx.Client, receiver: Receiver, broker: BrokerContext
) -> None:
    path = path_to("moved")
    assert _register(api, f"http://127.0.0.1:{PORT}{path}").status_code == 201
    attempts = int(broker.settings.max_retries) + 1
    wait_for(lambda: len(receiver.to(path)) == attempts, timeout=30)
    time.sleep(1)
    assert receiver.to(path.replace("/moved/", "/ok/")) == []
    assert len(receiver.to(path)) == attempts


def test_a_deliver_callback_sent_by_hand_to_a_url_off_the_allow_list_is_never_posted(
    api: httpx.Client, receiver: Receiver, broker: BrokerContext
) -> None:
    """The webhooks pool checks the allow-list again: anyone on the broker may send it this."""
    bus = MessageBus(broker.app, source="tests")
    off_list = f"http://127.0.0.1:{PORT}/elsewhere/{uuid.uuid4().hex[:8]}"
    reply = bus.send(DeliverWebhook(url=off_list, reply={"status": "succeeded"})).reply(timeout=30)
    assert reply.status == "failed"
    assert reply.error is not None
    assert reply.error.type == "CallbackRefused"
    assert receiver.to(urlsplit(off_list).path) == []
    with pytest.raises(CallbackRefused, match="POSTROOM_CALLBACK_ALLOW"):
        bus.send(RegisterAsset(name="Truck 12"), callback_url=off_list)


@pytest.fixture(scope="module")
def probe(broker: BrokerContext, api: httpx.Client) -> MessageBus:
    """The probe service of the test services, whose Announce can be rejected, fail, or have its
    worker killed between commit and the outbox's dispatch."""
    broker.start_worker(Pool("probe", ("commands.probe",), concurrency=1))
    return MessageBus(broker.app, source="tests")


@pytest.mark.parametrize(
    ("then", "status"),
    [("reject", "rejected"), ("fail", "failed"), ("die_before_dispatch", "succeeded")],
)
def test_every_outcome_reaches_the_callback_once_even_if_its_worker_dies_before_dispatch(
    probe: MessageBus, receiver: Receiver, then: str, status: str
) -> None:
    path = path_to("ok")
    pending = probe.send(
        Announce(key=f"{then}-{uuid.uuid4().hex}", then=then),  # type: ignore[arg-type]
        callback_url=f"http://127.0.0.1:{PORT}{path}",
    )
    assert pending.reply(timeout=60).status == status
    wait_for(lambda: receiver.to(path), timeout=30)
    time.sleep(2)
    [received] = receiver.to(path)
    reply = verified(received)
    assert (reply["status"], reply["correlation_id"]) == (status, pending.correlation_id)
