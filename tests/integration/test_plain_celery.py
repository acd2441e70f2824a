"""Plain Celery clients, as a user drives them: `celery call`, `app.send_task`, Flower's send-task.

None of them names a queue or sets a postroom header. A command's type name still reaches its
owner's queue, its envelope comes from Celery's own fields, and its reply is stored under the task
ID; a name no service owns is dead-lettered as unknown instead of waiting where nobody looks. With
signing keys set, such an unsigned message is refused.

Every postroom worker also drains the unrouted queue and would handle a probe command found there,
so a reply alone does not show where a message went: each client sends once while the probe pool
is down, and the queue its message waits on is read before the pool starts.

(No probe command is partitioned, so a plain client's partitioned command is not sent here.)
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import NotFound

from config.pools import Pool
from config.settings import Settings
from postroom import MessageBus
from postroom.headers import MESSAGE_ID, SOURCE
from postroom.reliability import DeadLetter, reliability
from postroom.topology import UNROUTED_QUEUE, command_queue_name
from tests.integration.services import SERVICE, Echo
from tests.support import (
    BROKERS,
    ROOT,
    TEST_SERVICES,
    BrokerContext,
    broker_context,
    last_line,
    run_python,
    wait_for,
)
from workers.launcher import flower_argv, wait_for_flower

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

AUTH = "watcher:correct-horse"
OWNER_QUEUE = command_queue_name(SERVICE)
PROBE = Pool("probe", (OWNER_QUEUE,), concurrency=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Flower:
    """``python -m workers.flower`` for one context, behind basic auth, as `postroom up` runs it."""

    def __init__(self, broker: BrokerContext, log: Path) -> None:
        env = dict(
            broker.env, POSTROOM_FLOWER_PORT=str(_free_port()), POSTROOM_FLOWER_BASIC_AUTH=AUTH
        )
        self.settings = Settings.from_env(env)
        env["FLOWER_BASIC_AUTH"] = self.settings.flower_basic_auth  # as launcher.flower_env does
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                flower_argv(self.settings), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def send_task(self, name: str, body: dict[str, Any], auth: str | None = AUTH) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.settings.flower_port}/api/task/send-task/{name}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def flower(broker: BrokerContext) -> Iterator[Flower]:
    running = Flower(broker, broker.workdir / "flower.log")
    try:
        wait_for_flower(running.settings, timeout=60)
        assert running.proc.poll() is None, running.log.read_text(errors="replace")
        yield running
    finally:
        running.stop()


def _celery_call(broker: BrokerContext, flower: Flower, text: str) -> str:
    argv = [
        "-m",
        "celery",
        "-A",
        "config",
        "call",
        "probe.Echo",
        "--kwargs",
        json.dumps({"text": text}),
    ]
    return last_line(run_python(broker.env, *argv))


def _send_task(broker: BrokerContext, flower: Flower, text: str) -> str:
    return str(broker.app.send_task("probe.Echo", kwargs={"text": text}).id)


def _flower_send_task(broker: BrokerContext, flower: Flower, text: str) -> str:
    return str(flower.send_task("probe.Echo", {"kwargs": {"text": text}})["task-id"])


CLIENTS: dict[str, Callable[[BrokerContext, Flower, str], str]] = {
    "celery call": _celery_call,
    "send_task": _send_task,
    "flower": _flower_send_task,
}


def _size(broker: BrokerContext, queue: str) -> int:
    try:
        return broker.queue_size(queue)
    except NotFound:  # RabbitMQ: not declared yet, so nothing waits in it
        return 0


def _sizes(broker: BrokerContext) -> dict[str, int]:
    return {queue: _size(broker, queue) for queue in (OWNER_QUEUE, UNROUTED_QUEUE)}


@pytest.fixture(scope="module")
def sent(broker: BrokerContext, flower: Flower) -> dict[str, tuple[str, dict[str, int]]]:
    """Each client's Echo, sent while no worker runs: its task ID and how each queue grew; then
    the probe pool (which also drains the unrouted queue, as every worker does) starts."""
    assert TEST_SERVICES in broker.env["POSTROOM_IMPORTS"].split(",")
    sent = {}
    for client, send in CLIENTS.items():
        before = _sizes(broker)
        task_id = send(broker, flower, f"via {client}")
        grown: dict[str, int] = {}

        def landed(before: dict[str, int] = before, grown: dict[str, int] = grown) -> bool:
            grown.update({q: n - before[q] for q, n in _sizes(broker).items()})
            return sum(grown.values()) > 0

        wait_for(landed, timeout=10)
        sent[client] = task_id, grown
    broker.start_worker(PROBE)
    return sent


def _echoed(app: Any, task_id: str, text: str) -> dict[str, Any]:
    """The succeeded reply stored under ``task_id``; its value's envelope headers."""
    reply = MessageBus(app).reply_for(task_id, timeout=30)
    assert (reply.status, reply.correlation_id) == ("succeeded", task_id), reply
    assert reply.value["text"] == text
    envelope: dict[str, Any] = reply.value["envelope"]
    return envelope


def _reaches_the_owner(broker: BrokerContext, sent: Any, client: str) -> dict[str, Any]:
    task_id, grown = sent[client]
    assert grown == {OWNER_QUEUE: 1, UNROUTED_QUEUE: 0}
    envelope = _echoed(broker.app, task_id, f"via {client}")
    assert (envelope[MESSAGE_ID], envelope[SOURCE]) == (task_id, "celery")
    return envelope


def test_celery_call_reaches_the_owner_and_gets_a_reply(broker: BrokerContext, sent: Any) -> None:
    _reaches_the_owner(broker, sent, "celery call")


def test_send_task_without_a_queue_reaches_the_owner_with_an_envelope_from_celerys_fields(
    broker: BrokerContext, sent: Any
) -> None:
    _reaches_the_owner(broker, sent, "send_task")
    # and once the pool is up, the same holds for a message sent now
    result = broker.app.send_task("probe.Echo", kwargs={"text": "now"})
    envelope = _echoed(broker.app, result.id, "now")
    assert (envelope[MESSAGE_ID], envelope[SOURCE]) == (result.id, "celery")


def test_flowers_send_task_api_reaches_the_owner_and_asks_for_credentials(
    broker: BrokerContext, sent: Any, flower: Flower
) -> None:
    _reaches_the_owner(broker, sent, "flower")
    with pytest.raises(urllib.error.HTTPError) as refused:
        flower.send_task("probe.Echo", {"kwargs": {"text": "no login"}}, auth=None)
    assert refused.value.code == 401


def _dead_letters(app: Any, task_id: str) -> list[DeadLetter]:
    store = reliability(app).dead_letters
    letters = (store.get(letter_id) for letter_id in store.ids())
    return [d for d in letters if d is not None and d.task_id == task_id]


def _dead_letter(app: Any, task_id: str) -> DeadLetter:
    """The dead letter of task ``task_id``, once some worker wrote it."""
    wait_for(lambda: _dead_letters(app, task_id), timeout=30)
    return _dead_letters(app, task_id)[0]


def test_an_unknown_task_name_is_dead_lettered_and_left_in_no_queue(
    broker: BrokerContext, sent: Any
) -> None:
    result = broker.app.send_task("nobody.DoesNothing", kwargs={})
    letter = _dead_letter(broker.app, result.id)
    assert (letter.reason, letter.task, letter.queue) == (
        "unknown",
        "nobody.DoesNothing",
        UNROUTED_QUEUE,
    )
    time.sleep(1.0)  # a message put back would be in the queue, and dead-lettered again, by now
    assert broker.queue_size(UNROUTED_QUEUE) == 0
    assert len(_dead_letters(broker.app, result.id)) == 1


@pytest.mark.parametrize("kind", BROKERS)
def test_with_signing_on_an_unsigned_plain_celery_message_is_dead_lettered_as_invalid(
    kind: str, tmp_path: Path
) -> None:
    signed = broker_context(kind, tmp_path, signing_keys="k1")
    try:
        signed.start_worker(PROBE)
        # The worker handles what postroom's bus signs: the refusal below is about the signature.
        assert MessageBus(signed.app).send(Echo(text="signed")).reply(timeout=30).ok

        result = signed.app.send_task("probe.Echo", kwargs={"text": "unsigned"})
        letter = _dead_letter(signed.app, result.id)
        assert (letter.reason, letter.task) == ("invalid", "probe.Echo")
        assert "unsigned" in letter.error_message
    finally:
        signed.close()
