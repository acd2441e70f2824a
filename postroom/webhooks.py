"""HTTP callbacks: a command's reply POSTed, signed, to a URL its sender named, at the owner's pace.

A sender that cannot wait (an HTTP client behind ``POST /assets``) names a URL with the command
(``bus.send(command, callback_url=...)``). The URL travels in the command's envelope, in the
``postroom.callback_url`` header (signed with the rest when signing is on), so it survives restarts
and redeliveries. Once the owner's reply is settled, a ``DeliverWebhook`` command carrying the
reply goes to the ``webhooks`` service, whose pool POSTs it (postroom.webhook_handler)::

    command + callback_url ─> owner ─ reply ─┬─> result backend (polling, bus.reply_for)
                                             └─> outbox ─> ( commands.webhooks ) ─> pool "webhooks"
                                                                    │ POST {"reply": ...}, signed
                                                                    v
                                                                  receiver (2xx: done;
                                                                  else retried, then a dead letter)

A reply that commits (succeeded, rejected) records its ``DeliverWebhook`` in the outbox with the
handler's writes, so a worker killed between commit and dispatch still has it sent by the outbox
sweep; a reply of a command that failed for good is sent with its ``CommandFailed``. Its message
ID derives from the command's, so every repeat of that path is the same message, which the
webhooks pool's inbox runs once: one POST per reply that a receiver answers 2xx. (A webhooks
worker killed between a POST and its commit POSTs again, with the same ``Postroom-Delivery-Id``,
for the receiver to drop.)

Only URLs on ``POSTROOM_CALLBACK_ALLOW`` are accepted, when sent and again before the POST (a
plain Celery client could send ``DeliverWebhook`` itself): no request can make postroom call an
address the deployment did not list.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import posixpath
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from postroom.errors import CallbackRefused
from postroom.headers import PREFIX
from postroom.messages import Command
from postroom.outbox import Entry
from postroom.reliability import derived_id
from postroom.settings import Settings

#: the envelope header carrying the URL a command's reply is POSTed to
CALLBACK_URL = PREFIX + "callback_url"
#: the HTTP request header ``POST /assets`` reads the URL from
REQUEST_HEADER = "Postroom-Callback-Url"
#: the HTTP headers of a callback POST
SIGNATURE_HEADER = "Postroom-Signature"
TIMESTAMP_HEADER = "Postroom-Timestamp"
CORRELATION_HEADER = "Postroom-Correlation-Id"
DELIVERY_HEADER = "Postroom-Delivery-Id"
#: the rank of a reply's DeliverWebhook among the messages its command causes (derived_id):
#: outside the outbox's 1, 2, ... and CommandFailed's 0, the same on every path that sends it
RANK = -1
_SCHEMES = {"http": 80, "https": 443}


class DeliverWebhook(Command, service="webhooks"):
    """POST ``reply`` to ``url``: sent by postroom once a command with a callback URL has its
    reply; its own message ID is the ``Postroom-Delivery-Id`` the receiver dedupes by."""

    url: str
    reply: dict[str, Any]


def allowed(url: str, settings: Settings) -> str:
    """``url`` if callbacks are on and it is on the allow-list; CallbackRefused saying what is.

    A prefix matches by its parts, not as text: the same scheme, host and port, and a path equal
    to the prefix's or below it. So ``https://hooks.example.com/in/`` does not admit
    ``https://hooks.example.com.evil.test/in/`` nor ``https://hooks.example.com/in/../admin``.
    A URL with a user name or password, or of a scheme other than http(s), is never admitted.
    """
    prefixes = allow_list(settings)
    if not prefixes or not settings.callback_secret:
        raise CallbackRefused(
            "callbacks are off in this deployment: set POSTROOM_CALLBACK_ALLOW (URL prefixes a "
            "callback may start with) and POSTROOM_CALLBACK_SECRET (the key replies are signed "
            "with), or send the command without a callback URL"
        )
    target = _parts(url)
    if target is not None and any(_under(target, _parts(p)) for p in prefixes):
        return url
    raise CallbackRefused(
        f"callback URL {url!r} is not allowed: it must be http(s), without a user or password, "
        f"and start with one of {', '.join(prefixes)} (POSTROOM_CALLBACK_ALLOW)"
    )


def allow_list(settings: Settings) -> list[str]:
    return [p.strip() for p in settings.callback_allow.split(",") if p.strip()]


def _parts(url: str) -> tuple[str, str, int, str] | None:
    """Scheme, host, port and normalised path of an http(s) URL; None for any other kind."""
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError:
        return None
    scheme = split.scheme.lower()
    if scheme not in _SCHEMES or not split.hostname or split.username or split.password:
        return None
    path = unquote(split.path) or "/"
    if any(segment in {".", ".."} for segment in path.split("/")):
        return None
    return scheme, split.hostname.lower(), port or _SCHEMES[scheme], posixpath.normpath(path)


def _under(target: tuple[str, str, int, str], prefix: tuple[str, str, int, str] | None) -> bool:
    if prefix is None or target[:3] != prefix[:3]:
        return False
    base = prefix[3].rstrip("/")
    return target[3] == base or target[3].startswith(base + "/")


def body_of(reply: Mapping[str, Any]) -> bytes:
    """The JSON a receiver gets: ``{"reply": ...}``, the bytes the signature covers."""
    return json.dumps({"reply": reply}, sort_keys=True, separators=(",", ":")).encode()


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over ``f"{timestamp}.{body}"`` with the secret, in hex: the timestamp is
    signed, so a receiver that refuses old ones cannot be fed a recorded request again."""
    signed = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def callback_url(headers: Mapping[str, Any]) -> str | None:
    url = headers.get(CALLBACK_URL)
    return url if isinstance(url, str) and url else None


def callback_for(command_id: str, url: str, reply: dict[str, Any]) -> tuple[str, DeliverWebhook]:
    """The message ID and the DeliverWebhook of the reply of the command ``command_id``."""
    return derived_id(command_id, RANK), DeliverWebhook(url=url, reply=reply)


def entry(command_id: str, owner: str, url: str, reply: dict[str, Any]) -> Entry:
    """The reply's DeliverWebhook as an outbox entry, to commit with the command's handling."""
    message_id, message = callback_for(command_id, url, reply)
    return Entry(
        message_id=message_id,
        kind="command",
        message_type=DeliverWebhook.__message_type__,
        payload=message.payload(),
        correlation_id=None,
        causation_id=command_id,
        source=owner,
    )
