"""The broker-side poison backstop as declared: on quorum queues, a delivery limit dead-lettering
at least once into postroom's given-up queue; nothing of it on classic queues or on Redis."""

from __future__ import annotations

from typing import Any, cast

from postroom import Command, HandlerContext, handles
from postroom._celery.consumer import GIVEN_UP_IN, last_death, record_given_up
from postroom._celery.delays import DUE
from postroom.headers import Envelope
from postroom.settings import Settings
from postroom.topology import (
    GIVEN_UP_QUEUE,
    command_queue,
    declared_queues,
    event_queue,
    partition_queue,
)

BACKSTOP = {
    "x-delivery-limit": 7,
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": GIVEN_UP_QUEUE,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def test_a_quorum_command_partition_and_event_queue_give_up_into_the_given_up_queue() -> None:
    queues = [
        command_queue("limited", "quorum", delivery_limit=7),
        partition_queue("limited", 0, "quorum", delivery_limit=7),
        event_queue("limited", ["limited.Happened"], "quorum", delivery_limit=7),
    ]
    for queue in queues:
        assert queue.queue_arguments is not None
        assert queue.queue_arguments.items() >= {"x-queue-type": "quorum", **BACKSTOP}.items()
    assert queues[1].queue_arguments["x-single-active-consumer"] is True


def test_a_classic_queue_has_no_delivery_limit() -> None:
    assert command_queue("unlimited", "classic", delivery_limit=7).queue_arguments == {}


def test_the_given_up_queue_is_declared_quorum_without_a_limit_of_its_own() -> None:
    queues = {q.name: q for q in declared_queues(["s"], {}, queue_type="quorum", delivery_limit=7)}
    assert queues[GIVEN_UP_QUEUE].queue_arguments == {"x-queue-type": "quorum"}
    assert queues["commands.s"].queue_arguments["x-delivery-limit"] == 7


def test_no_given_up_queue_without_a_delivery_limit_or_on_classic_queues() -> None:
    for queue_type, limit in (("quorum", 0), ("classic", 7)):
        names = [
            q.name for q in declared_queues(["s"], {}, queue_type=queue_type, delivery_limit=limit)
        ]
        assert GIVEN_UP_QUEUE not in names


def test_the_delivery_limit_defaults_well_above_poison_after_and_is_off_on_classic_and_redis() -> (
    None
):
    rabbit = "amqp://guest:guest@localhost:5672//"
    settings = Settings(broker_url=rabbit)
    assert settings.declared_delivery_limit == 20 > settings.poison_after
    assert Settings(broker_url=rabbit, queue_type="classic").declared_delivery_limit == 0
    assert Settings(broker_url="redis://localhost:6379/0").declared_delivery_limit == 0


def test_a_quorum_queue_without_a_delivery_limit_is_declared_as_before() -> None:
    assert command_queue("before", "quorum", delivery_limit=0).queue_arguments == {
        "x-queue-type": "quorum"
    }


class _Message:
    """What kombu hands the consumer for a message RabbitMQ dead-lettered into the given-up queue."""

    def __init__(self) -> None:
        self.headers = {
            "task": "probe.Explode",
            "id": "m-1",
            "x-delivery-count": 2,
            "x-first-death-queue": "commands.probe",
            "x-first-death-reason": "delivery_limit",
            "x-first-death-exchange": "postroom.commands",
            "x-death": [{"queue": "commands.probe", "reason": "delivery_limit", "count": 1}],
        }
        self.body = b'[[], {"key": "k"}, {}]'
        self.delivery_info = {"exchange": "", "routing_key": GIVEN_UP_QUEUE}
        self.content_type, self.content_encoding = "application/json", "utf-8"
        self.done: list[str] = []

    def ack(self) -> None:
        self.done.append("ack")

    def requeue(self) -> None:
        self.done.append("requeue")


class Sort(Command, service="limited", partition_key="lane"):
    lane: int


@handles(Sort)
def sort(cmd: Sort, ctx: HandlerContext) -> None:
    """Never runs here: the broker gave up on it."""


def test_a_partitioned_command_the_broker_gave_up_on_heads_its_keys_line() -> None:
    message, store = _Message(), _Store(fails=False)
    envelope = Envelope.new("limited.Sort", 1, source="tests")
    message.headers.update({"task": "limited.Sort", **envelope.to_headers()})
    message.body = b'[[], {"lane": 7}, {}]'
    record_given_up(cast(Any, store), message, hold=_no_hold)
    [letter] = store.added
    assert (letter.owner, letter.partition) == ("limited", "7")  # its key waits behind it
    message.body = b'[[], {"lane": "not a lane"}, {}]'  # its key cannot be trusted: on its own
    record_given_up(cast(Any, store), message, hold=_no_hold)
    assert store.added[1].partition is None


class _Store:
    def __init__(self, fails: bool) -> None:
        self.fails, self.added = fails, []

    def add(self, letter: Any) -> str:
        if self.fails:
            raise ConnectionError("the dead letters' Redis is down")
        self.added.append(letter)
        return str(letter.id)


def test_a_given_up_message_is_stored_as_a_dead_letter_of_its_origin_queue_then_acknowledged() -> (
    None
):
    message, store = _Message(), _Store(fails=False)
    record_given_up(cast(Any, store), message, hold=_no_hold)
    [letter] = store.added
    assert (letter.reason, letter.queue, letter.task_id) == (
        "delivery-limit",
        "commands.probe",
        "m-1",
    )
    assert letter.headers == {"task": "probe.Explode", "id": "m-1"}  # no death headers
    assert letter.exchange == ""  # a raw redrive goes through the default exchange, by queue name
    assert message.done == ["ack"]


def _no_hold(message: Any, headers: dict[str, Any]) -> None:
    raise AssertionError("held, though its dead letter was stored")


def test_a_given_up_message_whose_dead_letter_cannot_be_stored_waits_in_the_broker() -> None:
    message, held = _Message(), []
    record_given_up(cast(Any, _Store(fails=True)), message, hold=lambda m, h: held.append((m, h)))
    [(copy_of, headers)] = held
    assert copy_of is message
    assert headers == {"task": "probe.Explode", "id": "m-1", GIVEN_UP_IN: "commands.probe"}
    assert message.done == ["ack"]  # once the held copy is confirmed


def test_a_given_up_message_that_can_be_neither_stored_nor_held_goes_back_at_once() -> None:
    def broker_down(message: Any, headers: dict[str, Any]) -> None:
        raise ConnectionError("the broker refused the held copy")

    message = _Message()
    record_given_up(cast(Any, _Store(fails=True)), message, hold=broker_down)
    assert message.done == ["requeue"]


def test_a_held_message_back_from_its_wait_is_recorded_as_one_of_its_origin_queue() -> None:
    message, store = _Message(), _Store(fails=False)
    message.headers = {  # its last death: its TTL in the given-up queue's delay queue
        "task": "probe.Explode",
        "id": "m-1",
        GIVEN_UP_IN: "commands.probe",
        DUE: 1.0,
        "x-first-death-queue": "postroom.given-up.delay.200",
        "x-first-death-reason": "expired",
        "x-death": [{"queue": "postroom.given-up.delay.200", "reason": "expired", "count": 1}],
    }
    record_given_up(cast(Any, store), message, hold=_no_hold)
    [letter] = store.added
    assert (letter.reason, letter.queue) == ("delivery-limit", "commands.probe")
    assert letter.headers == {"task": "probe.Explode", "id": "m-1"}
    assert message.done == ["ack"]


def test_a_message_rejected_in_its_queue_is_acknowledged_unrecorded_as_before() -> None:
    message, store = _Message(), _Store(fails=False)
    message.headers["x-first-death-reason"] = "rejected"  # postroom dead-lettered it already
    message.headers["x-death"][0]["reason"] = "rejected"
    record_given_up(cast(Any, store), message, hold=_no_hold)
    assert store.added == []
    assert message.done == ["ack"]


def _died_in_a_delay_queue_first(message: _Message) -> _Message:
    """As RabbitMQ 3.10 hands over a scheduled (or retried) message given up in its queue: its
    first death is its TTL's in the delay queue, its last (first in x-death) the delivery limit."""
    message.headers |= {
        "x-first-death-queue": "commands.probe.delay.100",
        "x-first-death-reason": "expired",
        "x-first-death-exchange": "",
        "x-death": [
            {"queue": "commands.probe", "reason": "delivery_limit", "count": 1},
            {"queue": "commands.probe.delay.100", "reason": "expired", "count": 1},
        ],
    }
    return message


def test_a_message_given_up_after_its_delay_queue_is_recorded_as_one_of_the_queue_it_died_in_last() -> (
    None
):
    message, store = _died_in_a_delay_queue_first(_Message()), _Store(fails=False)
    record_given_up(cast(Any, store), message, hold=_no_hold)
    [letter] = store.added
    assert (letter.reason, letter.queue) == ("delivery-limit", "commands.probe")
    assert "'commands.probe' (delivery_limit)" in letter.error_message
    assert message.done == ["ack"]


def test_rabbitmqs_last_death_headers_name_the_queue_where_they_are_set() -> None:
    message = _died_in_a_delay_queue_first(_Message())  # RabbitMQ 3.13+ adds x-last-death-*
    message.headers |= {
        "x-last-death-queue": "events.pool_a",
        "x-last-death-reason": "delivery_limit",
    }
    assert last_death(message.headers) == ("events.pool_a", "delivery_limit")
    record_given_up(cast(Any, store := _Store(fails=False)), message, hold=_no_hold)
    assert store.added[0].queue == "events.pool_a"
    assert "x-last-death-queue" not in store.added[0].headers


def test_a_message_rejected_after_its_delay_queue_is_acknowledged_unrecorded() -> None:
    message, store = _died_in_a_delay_queue_first(_Message()), _Store(fails=False)
    message.headers["x-death"][0]["reason"] = "rejected"  # postroom dead-lettered it already
    record_given_up(cast(Any, store), message, hold=_no_hold)
    assert (store.added, message.done) == ([], ["ack"])
