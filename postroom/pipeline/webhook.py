"""The Webhook step: a command's reply goes to its sender's callback URL (postroom.webhooks)."""

from __future__ import annotations

from postroom import webhooks
from postroom.pipeline.delivery import Delivery, Outcome
from postroom.pipeline.steps import Next, Step


class Webhook(Step):
    """Records the ``DeliverWebhook`` of a committing reply in the run's outbox, kept even when
    the command is rejected (a rejection announces nothing, but its sender still gets the reply).

    It sits just inside Commit, so what it records commits with the handler's writes and the
    inbox mark, and a repeat that finds the reply recorded sends nothing again. A reply that
    never commits (the command failed for good) is sent by DeadLetter instead.
    """

    def __call__(self, delivery: Delivery, call_next: Next) -> Outcome:
        outcome = call_next(delivery)
        url = webhooks.callback_url(delivery.headers)
        if url and delivery.kind == "command" and outcome.reply is not None:
            assert delivery.ctx is not None
            ctx = delivery.ctx
            ctx.replies.append(webhooks.entry(ctx.message_id, ctx.owner, url, outcome.reply))
        return outcome
