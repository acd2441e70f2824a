"""HTTP callbacks: which URLs the allow-list admits, and the signature a receiver checks."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from pathlib import Path
from typing import Any

import pytest

from postroom import CallbackRefused, Settings, webhooks

README = Path(__file__).resolve().parents[2] / "README.md"
ALLOW = "https://hooks.example.com/in/, http://127.0.0.1:9000/"


def settings(allow: str = ALLOW, secret: str = "s3cret") -> Settings:
    return Settings(callback_allow=allow, callback_secret=secret)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/in/",
        "https://hooks.example.com/in/orders/17?x=1",
        "https://HOOKS.example.com:443/in/a",
        "http://127.0.0.1:9000/anything",
    ],
)
def test_a_url_under_an_allowed_prefix_is_accepted(url: str) -> None:
    assert webhooks.allowed(url, settings()) == url


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com.evil.test/in/",  # another host that starts the same
        "https://hooks.example.com/inx",  # a sibling path, not below the prefix
        "https://hooks.example.com/in/../admin",  # climbs out of it
        "https://hooks.example.com/in/%2e%2e/admin",
        "http://hooks.example.com/in/",  # another scheme
        "https://hooks.example.com:8443/in/",  # another port
        "https://user:pw@hooks.example.com/in/",  # credentials
        "http://127.0.0.1:9001/",
        "ftp://127.0.0.1:9000/",
        "file:///etc/passwd",
        "not a url",
        "http://127.0.0.1:99999/",
    ],
)
def test_a_url_off_the_allow_list_is_refused_saying_what_is_allowed(url: str) -> None:
    with pytest.raises(CallbackRefused, match=r"must be http\(s\).*hooks\.example\.com/in/"):
        webhooks.allowed(url, settings())


@pytest.mark.parametrize(("allow", "secret"), [("", "s3cret"), (ALLOW, "")])
def test_without_an_allow_list_or_a_secret_callbacks_are_off(allow: str, secret: str) -> None:
    with pytest.raises(CallbackRefused, match=r"POSTROOM_CALLBACK_ALLOW.*POSTROOM_CALLBACK_SECRET"):
        webhooks.allowed("http://127.0.0.1:9000/", settings(allow, secret))


def test_the_signature_is_an_hmac_sha256_of_timestamp_dot_body_in_hex() -> None:
    body = webhooks.body_of({"status": "succeeded", "value": {"n": 1}})
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert webhooks.signature("s3cret", "1700000000", body) == expected
    assert webhooks.signature("s3cret", "1700000001", body) != expected
    assert webhooks.signature("other", "1700000000", body) != expected


def test_the_body_is_the_reply_under_reply() -> None:
    assert webhooks.body_of({"status": "ok"}) == b'{"reply":{"status":"ok"}}'


def test_the_secret_is_not_in_the_settings_repr() -> None:
    assert "s3cret" not in repr(settings())


def _readme_receiver() -> Any:
    """The README's receiver-side check, as written there."""
    after = README.read_text().split("### HTTP callbacks", 1)[1]
    block = re.search(r"```python\n(.*?)```", after, re.S)
    assert block is not None
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)  # the README's own example
    return namespace["verified_reply"]


def test_the_readme_receiver_accepts_a_signed_callback_and_refuses_a_changed_or_old_one() -> None:
    verified_reply = _readme_receiver()
    body = webhooks.body_of({"status": "succeeded", "value": {"asset_id": "a1"}})
    now = str(int(time.time()))
    headers = {
        "Postroom-Timestamp": now,
        "Postroom-Signature": webhooks.signature("s3cret", now, body),
    }
    assert verified_reply(b"s3cret", headers, body)["value"] == {"asset_id": "a1"}
    with pytest.raises(ValueError, match="bad signature"):
        verified_reply(b"s3cret", headers, body.replace(b"a1", b"a2"))
    with pytest.raises(ValueError, match="bad signature"):
        verified_reply(b"other", headers, body)
    old = str(int(time.time()) - 3600)
    stale = {
        "Postroom-Timestamp": old,
        "Postroom-Signature": webhooks.signature("s3cret", old, body),
    }
    with pytest.raises(ValueError, match="stale"):
        verified_reply(b"s3cret", stale, body)
