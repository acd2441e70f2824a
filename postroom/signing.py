"""Optional message signing: an HMAC over a message's type, payload and envelope, with key rotation.

With signing keys configured, every message postroom sends carries ``postroom.signature`` and every
message it receives must carry a valid one, or it is dead-lettered as unsigned or tampered. The
first key signs; every key verifies, so a new key can be rolled out before the old one is retired.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from postroom.errors import InvalidMessage
from postroom.headers import PREFIX

SIGNATURE = PREFIX + "signature"


class Signer:
    def __init__(self, keys: list[str]) -> None:
        if not keys or not all(keys):
            raise ValueError("a Signer needs at least one non-empty key")
        self._keys = [(self.key_id(k), k.encode()) for k in keys]

    @staticmethod
    def key_id(key: str) -> str:
        """Names a key without revealing it, so a signature says which key made it."""
        return hashlib.sha256(key.encode()).hexdigest()[:8]

    @staticmethod
    def _canonical(message_type: str, payload: dict[str, Any], headers: dict[str, Any]) -> bytes:
        envelope = {k: v for k, v in headers.items() if k.startswith(PREFIX) and k != SIGNATURE}
        document = {"type": message_type, "payload": payload, "headers": envelope}
        return json.dumps(document, sort_keys=True, separators=(",", ":"), default=str).encode()

    def sign(self, message_type: str, payload: dict[str, Any], headers: dict[str, Any]) -> str:
        key_id, key = self._keys[0]
        digest = hmac.new(key, self._canonical(message_type, payload, headers), hashlib.sha256)
        return f"{key_id}:{digest.hexdigest()}"

    def verify(self, message_type: str, payload: dict[str, Any], headers: dict[str, Any]) -> None:
        """InvalidMessage unless the message is signed by one of the keys and unchanged since."""
        signature = headers.get(SIGNATURE)
        if not isinstance(signature, str) or ":" not in signature:
            raise InvalidMessage(f"unsigned message: signing is on and {SIGNATURE} is missing")
        key_id, _, digest = signature.partition(":")
        for known_id, key in self._keys:
            if hmac.compare_digest(known_id, key_id):
                expected = hmac.new(
                    key, self._canonical(message_type, payload, headers), hashlib.sha256
                ).hexdigest()
                if hmac.compare_digest(expected, digest):
                    return
                raise InvalidMessage("tampered message: its signature does not match its content")
        raise InvalidMessage(
            f"message signed with an unknown key ({key_id}): "
            "add that key to the verifying keys, or re-send the message"
        )

    def __repr__(self) -> str:
        return f"Signer(keys={[key_id for key_id, _ in self._keys]})"


def signer(app: Any) -> Signer | None:
    from postroom.install import installation  # noqa: PLC0415 - install imports this module

    return installation(app).signer
