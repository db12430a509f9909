"""Secrets at rest for MFA: TOTP secrets encrypted (AES-256-GCM), email and recovery codes
as keyed hashes (HMAC-SHA256), with the platform's shared keyring (palisade_events.secrets)
under MFA's own label. The keys it derives are the ones this module always derived
(HKDF info `palisade-mfa/aes-gcm` and `palisade-mfa/hmac`), so stored data stays readable.
"""

from __future__ import annotations

from collections.abc import Iterable

from palisade_events import secrets
from palisade_events.secrets import (
    DecryptionError,
    KeyConfigError,
    UnknownKeyError,
    generate_key,
    parse_key,
    parse_keys,
)

LABEL = b"palisade-mfa"


class Keyring(secrets.Keyring):
    """The shared keyring under MFA's label (old keys: PALISADE_MFA_OLD_KEYS)."""

    def __init__(self, current: tuple[str, bytes], old: Iterable[tuple[str, bytes]] = ()) -> None:
        super().__init__(current, old, label=LABEL)


__all__ = [
    "LABEL",
    "DecryptionError",
    "KeyConfigError",
    "Keyring",
    "UnknownKeyError",
    "generate_key",
    "parse_key",
    "parse_keys",
]
