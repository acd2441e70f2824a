"""postroom.testing keeps the callback a command sent with a callback URL would get: one per reply."""

from __future__ import annotations

from postroom import Command, HandlerContext, Rejected, RetryPolicy, TransientError, handles
from postroom.testing import Harness

URL = "https://hooks.example.com/in/1"


class Ring(Command, service="callbacked"):
    outcome: str  # "ok", "no" (rejected) or "broken" (fails for good)


@handles(Ring)
def ring(cmd: Ring, ctx: HandlerContext) -> str:
    if cmd.outcome == "no":
        raise Rejected("not now")
    if cmd.outcome == "broken":
        raise TransientError("the bell is broken")
    return "rang"


def harness() -> Harness:
    return Harness(retry=RetryPolicy(max_retries=1, backoff=0.01))


def test_each_reply_is_kept_for_its_callback_once_whatever_its_outcome() -> None:
    h = harness()
    sent = {outcome: h.send(Ring(outcome=outcome), callback_url=URL) for outcome in ("ok", "no")}
    sent["broken"] = h.send(Ring(outcome="broken"), callback_url=URL + "?broken")
    h.run()
    by_correlation = {c.reply["correlation_id"]: c for c in h.webhooks}
    assert len(h.webhooks) == 3
    for outcome, status in (("ok", "succeeded"), ("no", "rejected"), ("broken", "failed")):
        callback = by_correlation[sent[outcome].correlation_id]
        assert callback.reply == sent[outcome].reply().model_dump(mode="json")
        assert callback.reply["status"] == status
    assert by_correlation[sent["broken"].correlation_id].url == URL + "?broken"


def test_a_repeat_of_a_handled_command_sends_no_second_callback() -> None:
    h = harness()
    sent = h.send(Ring(outcome="ok"), callback_url=URL)
    h.run()
    h.deliver_again(sent)
    h.run()
    assert [c.reply["value"] for c in h.webhooks] == ["rang"]


def test_a_command_sent_without_a_callback_url_has_no_callback() -> None:
    h = harness()
    assert h.send(Ring(outcome="ok")).reply().status == "succeeded"
    assert h.webhooks == []
