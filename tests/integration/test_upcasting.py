"""Schema evolution on Redis and RabbitMQ: messages written by old versions of a contract are
upcast on receipt; a message of a version newer than the worker knows is dead-lettered."""

from __future__ import annotations

import json
import uuid

import pytest

from config.pools import Pool
from postroom import MessageBus, upcaster
from postroom.errors import ContractError, InvalidMessage
from postroom.messages import upcast
from postroom.reliability import reliability
from tests.integration.versions import Relocate
from tests.support import BrokerContext, last_line, run_python, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]
SETTINGS = {"imports": "tests.integration.services,tests.integration.versions"}

#: a producer still running an old (or a future) version of the contracts: no handler code
OLD_PRODUCER = """
import json, sys
from postroom import Command, Event, MessageBus
import config

version = int(sys.argv[1])
if version == 1:
    class Relocate(Command, service="versioned", version=1):
        asset: str
        lat: float
        lon: float
    command = Relocate(asset=sys.argv[2], lat=52.5, lon=13.4)
elif version == 2:
    class Position(dict): pass
    class Relocate(Command, service="versioned", version=2):
        asset: str
        position: dict[str, float]
    command = Relocate(asset=sys.argv[2], position={"lat": 52.5, "lon": 13.4})
else:
    class Relocate(Command, service="versioned", version=version):
        asset: str
        position: dict[str, float]
        note: str
        priority: int
    command = Relocate(asset=sys.argv[2], position={"lat": 1, "lon": 2}, note="", priority=1)

class Relocated(Event, service="versioned", version=1):
    asset: str
    lat: float
    lon: float

bus = MessageBus(config.app)
if len(sys.argv) > 3:
    bus.publish(Relocated(asset=sys.argv[2], lat=52.5, lon=13.4))
print(json.dumps({"correlation_id": bus.send(command).correlation_id}))
"""


def produce(broker: BrokerContext, version: int, asset: str, *, event: bool = False) -> str:
    env = dict(broker.env, POSTROOM_IMPORTS="")
    args = [str(version), asset, *(["event"] if event else [])]
    return str(json.loads(last_line(run_python(env, "-c", OLD_PRODUCER, *args)))["correlation_id"])


def test_messages_queued_by_old_versions_are_upcast_before_the_handler_sees_them(
    broker: BrokerContext,
) -> None:
    run = uuid.uuid4().hex[:8]
    # the subscriber's queue must exist (be bound) before an event is published to it
    broker.start_worker(Pool("versioned_sub", ("events.versioned_sub",), concurrency=1))
    # written while the owner's pool is down: they wait in the queue in their old shapes
    v1 = produce(broker, 1, f"{run}-v1", event=True)
    v2 = produce(broker, 2, f"{run}-v2")
    broker.start_worker(Pool("versioned", ("commands.versioned",), concurrency=1))
    bus = MessageBus(broker.app, source="tests")
    first, second = bus.reply_for(v1, timeout=60), bus.reply_for(v2, timeout=60)
    assert first.status == second.status == "succeeded"
    assert first.value == {
        "asset": f"{run}-v1",
        "position": {"lat": 52.5, "lon": 13.4},
        "note": "(written before notes existed)",
    }
    assert second.value["position"] == {"lat": 52.5, "lon": 13.4}
    assert second.value["note"] == "(written before notes existed)"
    db = broker.state()
    event_key = broker.key("versioned", "event", f"{run}-v1")
    wait_for(lambda: db.get(event_key) is not None, timeout=60)
    assert json.loads(db.get(event_key) or "{}") == {
        "asset": f"{run}-v1",
        "position": {"lat": 52.5, "lon": 13.4},
    }


def test_a_message_from_a_future_version_is_dead_lettered_with_the_reason(
    broker: BrokerContext,
) -> None:
    broker.start_worker(Pool("versioned-b", ("commands.versioned",), concurrency=1))
    asset = f"{uuid.uuid4().hex[:8]}-v4"
    reply = MessageBus(broker.app).reply_for(produce(broker, 4, asset), timeout=60)
    assert reply.status == "rejected"
    assert reply.error is not None
    assert "version 4 is newer than this process knows (version 3)" in reply.error.message
    store = reliability(broker.app).dead_letters
    letters = [store.get(i) for i in store.ids()]
    found = [x for x in letters if x is not None and x.kwargs.get("asset") == asset]
    assert len(found) == 1
    assert found[0].reason == "invalid"
    assert "newer than this process knows" in found[0].error_message
    assert broker.state().get(broker.key("versioned", "got", asset)) is None


def test_a_missing_upcaster_step_is_named_and_a_bad_one_is_refused_at_import() -> None:
    with pytest.raises(InvalidMessage, match=r"no upcaster from version 0"):
        upcast(Relocate, 0, {"asset": "x"})
    with pytest.raises(ContractError, match="between 1 and 2"):
        upcaster(Relocate, from_version=3)
    broken = upcast.__globals__["_UPCASTERS"][Relocate.__message_type__][1]
    with pytest.raises(InvalidMessage, match="upcaster from version 1 failed"):
        upcast(Relocate, 1, {"asset": "x"})  # no lat/lon: the upcaster raises KeyError
    assert broken.__name__ == "nest_position"
