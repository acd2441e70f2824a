"""The webhooks service: POSTs each ``DeliverWebhook`` to its URL, signed (postroom.webhooks).

Import this module in the workers of the pool serving ``commands.webhooks`` (this deployment's
config/celery.py does; in your own, ``install(app, imports=["postroom.webhook_handler"])``) and
give that pool workers of its own, so a slow receiver holds up callbacks only.

A receiver answering 2xx has the reply. Any other status, a connection that fails, or no answer
within POSTROOM_CALLBACK_TIMEOUT is a ``CallbackFailed``: a transient failure, retried with
backoff through the broker like any other (POSTROOM_MAX_RETRIES, POSTROOM_RETRY_BACKOFF), then
dead-lettered with the status or the error as its reason (``postroom dlq list``). Redirects are
not followed (a 3xx is a failure): a receiver cannot send postroom to an address off the
allow-list. Proxy variables of the environment are ignored for the same reason.
"""

from __future__ import annotations

import time

import httpx
from celery import current_app

from postroom import webhooks
from postroom.errors import CallbackFailed
from postroom.handlers import handles
from postroom.install import installation
from postroom.pipeline import HandlerContext
from postroom.webhooks import DeliverWebhook


# no circuit breaker: one handler serves every receiver, so one receiver down would hold the
# webhooks of all the others
@handles(DeliverWebhook, breaker=False)
def deliver_callback(cmd: DeliverWebhook, ctx: HandlerContext) -> dict[str, int]:
    """POST the reply; the receiver's status code is this command's reply."""
    settings = installation(current_app).settings
    url = webhooks.allowed(cmd.url, settings)  # checked again: anyone may send this command
    body = webhooks.body_of(cmd.reply)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        webhooks.SIGNATURE_HEADER: webhooks.signature(settings.callback_secret, timestamp, body),
        webhooks.TIMESTAMP_HEADER: timestamp,
        webhooks.CORRELATION_HEADER: str(cmd.reply.get("correlation_id", "")),
        webhooks.DELIVERY_HEADER: ctx.message_id,
    }
    try:
        response = httpx.post(
            url,
            content=body,
            headers=headers,
            timeout=settings.callback_timeout,
            follow_redirects=False,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise CallbackFailed(f"{type(exc).__name__} ({exc}): POST {url}") from exc
    if not response.is_success:
        raise CallbackFailed(f"answered {response.status_code}: POST {url}")
    return {"status_code": response.status_code}
