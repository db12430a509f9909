"""Secrets at rest for any worker: AES-256-GCM for what must be read back (TLS private
keys, TOTP secrets), a keyed hash (HMAC-SHA256) for what only needs checking (email and
recovery codes), under keys from configuration.

Keys are written `KEY_ID:BASE64URL(32 bytes)`. The current key encrypts and hashes; older
keys only decrypt and check, so keys can rotate. Every ciphertext and every hash is stored
with the id of the key that made it; a ciphertext is bound to its owner by associated data
(e.g. the service and serial of a certificate key), so one copied to another row does not
decrypt. From each configured key, HKDF under a per-worker label derives one key for AES-GCM
and one for HMAC (`<label>/aes-gcm`, `<label>/hmac`), so the same bytes never serve two
purposes or two workers.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger("palisade.secrets")

KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
KEY_BYTES = 32
NONCE_BYTES = 12


class KeyConfigError(ValueError):
    """The configured keys cannot be used (the message never contains key material)."""


class UnknownKeyError(LookupError):
    """Stored data names a key id that is not configured."""


class DecryptionError(ValueError):
    """A ciphertext failed authentication (tampered, or bound to another owner)."""


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


def development_key(path: Path, key_id: str = "dev") -> str:
    """Read a development key from `path`, creating it (mode 0600) on first use. Only for
    workers whose settings explicitly allow a development key."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another replica created it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(generate_key(key_id) + "\n")
    log.warning("created development key %s; never use it in production", path)
    return path.read_text().strip()


def _derive(master: bytes, label: bytes, purpose: bytes) -> bytes:
    """The 32-byte key for `purpose` (b"aes-gcm", b"hmac") of a worker's `label`."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label + b"/" + purpose).derive(master)


@dataclass(frozen=True, repr=False)
class _Key:
    key_id: str
    aead: AESGCM
    mac_key: bytes

    def __repr__(self) -> str:  # never show key material
        return f"_Key({self.key_id!r})"


class Keyring:
    """AES-GCM and HMAC under the current key; older keys decrypt and check only. `label`
    separates workers (it goes into the HKDF info), e.g. `b"palisade-tls"`."""

    def __init__(self, current: tuple[str, bytes], old: Iterable[tuple[str, bytes]] = (), *, label: bytes) -> None:
        self._keys: dict[str, _Key] = {}
        for key_id, master in (current, *old):
            if key_id in self._keys:
                raise KeyConfigError(f"key id {key_id} configured twice")
            self._keys[key_id] = _Key(
                key_id, AESGCM(_derive(master, label, b"aes-gcm")), _derive(master, label, b"hmac")
            )
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


__all__ = [
    "DecryptionError",
    "KeyConfigError",
    "Keyring",
    "UnknownKeyError",
    "development_key",
    "generate_key",
    "parse_key",
    "parse_keys",
]
