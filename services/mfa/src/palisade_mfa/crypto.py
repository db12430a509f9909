"""Secrets at rest: AES-256-GCM for what must be read back (TOTP secrets), a keyed hash
(HMAC-SHA256) for what only needs checking (email and recovery codes).

Keys come from configuration as `KEY_ID:BASE64URL(32 bytes)`. The current key encrypts
and hashes; older keys only decrypt and check, so keys can rotate. Every ciphertext and
every hash is stored with the id of the key that made it. From each configured key two
independent keys are derived (HKDF), one for AES-GCM and one for HMAC, so the same
bytes are never used for two purposes.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
KEY_BYTES = 32
NONCE_BYTES = 12


class KeyConfigError(ValueError):
    """The configured keys cannot be used (the message never contains key material)."""


class UnknownKeyError(LookupError):
    """Stored data names a key id that is not configured (add it to PALISADE_MFA_OLD_KEYS)."""


class DecryptionError(ValueError):
    """A ciphertext failed authentication (tampered, or bound to another account)."""


def parse_key(spec: str) -> tuple[str, bytes]:
    """`KEY_ID:BASE64URL` -> (key id, 32 key bytes)."""
    key_id, sep, encoded = spec.strip().partition(":")
    if not sep or not KEY_ID.match(key_id):
        raise KeyConfigError("a key is written KEY_ID:BASE64 (key id: letters, digits, _ or -, at most 32)")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except ValueError:
        raise KeyConfigError(f"key {key_id}: not base64") from None
    if len(raw) != KEY_BYTES:
        raise KeyConfigError(f"key {key_id}: must be {KEY_BYTES} bytes, got {len(raw)}")
    return key_id, raw


def parse_keys(specs: str) -> list[tuple[str, bytes]]:
    """A comma-separated list of keys (the old keys)."""
    return [parse_key(part) for part in specs.split(",") if part.strip()]


def generate_key(key_id: str) -> str:
    """A fresh key in configuration form."""
    if not KEY_ID.match(key_id):
        raise KeyConfigError("key id: letters, digits, _ or -, at most 32")
    return f"{key_id}:{base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip('=')}"


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"palisade-mfa/" + purpose).derive(master)


@dataclass(frozen=True, repr=False)
class _Key:
    key_id: str
    aead: AESGCM
    mac_key: bytes

    def __repr__(self) -> str:  # never show key material
        return f"_Key({self.key_id!r})"


class Keyring:
    def __init__(self, current: tuple[str, bytes], old: Iterable[tuple[str, bytes]] = ()) -> None:
        self._keys: dict[str, _Key] = {}
        for key_id, master in (current, *old):
            if key_id in self._keys:
                raise KeyConfigError(f"key id {key_id} configured twice")
            self._keys[key_id] = _Key(key_id, AESGCM(_derive(master, b"aes-gcm")), _derive(master, b"hmac"))
        self.current_id = current[0]

    def __repr__(self) -> str:
        return f"Keyring(current={self.current_id!r}, keys={sorted(self._keys)!r})"

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def _key(self, key_id: str) -> _Key:
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError(f"key id {key_id!r} is not configured") from None

    def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        """(key id, nonce || ciphertext+tag) under the current key; `aad` binds it to its owner."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return self.current_id, nonce + self._key(self.current_id).aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, key_id: str, blob: bytes, aad: bytes) -> bytes:
        key = self._key(key_id)
        try:
            return key.aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptionError(f"ciphertext under key {key_id} failed authentication") from None

    def keyed_hash(self, message: bytes) -> tuple[str, bytes]:
        """(key id, HMAC-SHA256) under the current key."""
        return self.current_id, hmac.digest(self._key(self.current_id).mac_key, message, "sha256")

    def matches(self, key_id: str, digest: bytes, message: bytes) -> bool:
        """Timing-safe check of a stored keyed hash."""
        expected = hmac.digest(self._key(key_id).mac_key, message, "sha256")
        return hmac.compare_digest(expected, digest)
