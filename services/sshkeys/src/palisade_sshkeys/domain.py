"""The SSH key rules, pure: judge a public key and its title, render authorized_keys.

Keys are parsed with asyncssh (no I/O). Accepted: ssh-ed25519,
ecdsa-sha2-nistp256/384/521 and ssh-rsa of at least 2048 bits. Everything else
is refused with its own reason, so the dashboard can say exactly what is wrong.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncssh
from cryptography.hazmat.primitives.asymmetric import rsa

ACCEPTED_ALGORITHMS = frozenset(
    {"ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa"}
)
MIN_RSA_BITS = 2048
MAX_TITLE_LENGTH = 100
AUTOMATION_COMMENT = "palisade-automation"
HEADER = "# Managed by Palisade (sshkeys): the automation key, then the keys added in the dashboard.\n"

_ECDSA_BITS = {"ecdsa-sha2-nistp256": 256, "ecdsa-sha2-nistp384": 384, "ecdsa-sha2-nistp521": 521}
# What a key type looks like (ssh-*, ecdsa-*, sk-*@openssh.com, *-cert-v01@openssh.com),
# to tell an options prefix or an unsupported type from plain garbage.
_KEY_TYPE = re.compile(r"^(ssh|ecdsa|sk|rsa|x509v3)-[A-Za-z0-9@.+-]+$")
_BLOB = re.compile(r"^AAAA[A-Za-z0-9+/]+={0,3}$")
# A key's fingerprint as `ssh-keygen -l` prints it: every stored key's has this form.
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


class KeyRefused(Exception):  # noqa: N818 - a decision, not an error
    """A key (or its title) the service cannot have; `reason` is machine-readable."""

    def __init__(self, reason: str, fingerprint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fingerprint = fingerprint


@dataclass(frozen=True)
class PublicKey:
    algorithm: str
    bits: int
    fingerprint: str  # SHA256:..., as `ssh-keygen -l` prints it
    line: str  # "TYPE BASE64", the user's comment dropped (the title replaces it)


@dataclass(frozen=True)
class StoredKey:
    fingerprint: str
    title: str
    algorithm: str
    bits: int
    line: str
    added_at: datetime


def parse_public_key(text: str) -> PublicKey:
    """One OpenSSH public key line (`TYPE BASE64 [COMMENT]`), judged."""
    if "\x00" in text:
        raise KeyRefused("key_contains_nul")
    stripped = text.strip()  # a trailing newline from `cat key.pub` is fine
    if not stripped:
        raise KeyRefused("key_empty")
    if "\n" in stripped or "\r" in stripped:
        raise KeyRefused("key_contains_newline")
    fields = stripped.split()
    kind = fields[0]
    if not _KEY_TYPE.match(kind):
        if _has_key_after_prefix(fields) or "=" in kind or '"' in kind:
            raise KeyRefused("key_options_not_allowed")
        raise KeyRefused("key_invalid")
    if len(fields) < 2 or not _BLOB.match(fields[1]):
        raise KeyRefused("key_invalid")
    if kind.endswith("-cert-v01@openssh.com") or kind.endswith("-cert-v00@openssh.com"):
        raise KeyRefused("key_certificate_not_supported")
    if kind == "ssh-dss":
        raise KeyRefused("dsa_key_refused")
    if kind not in ACCEPTED_ALGORITHMS:
        raise KeyRefused("key_type_unsupported")
    try:
        key = asyncssh.import_public_key(f"{kind} {fields[1]}")
    except (asyncssh.KeyImportError, ValueError):
        raise KeyRefused("key_invalid") from None
    if key.get_algorithm() != kind:  # the blob says another type than the line
        raise KeyRefused("key_invalid")
    fingerprint = key.get_fingerprint("sha256")
    bits = _bits(kind, key)
    if kind == "ssh-rsa" and bits < MIN_RSA_BITS:
        raise KeyRefused("rsa_key_too_short", fingerprint)
    line = key.export_public_key("openssh").decode().strip()
    return PublicKey(algorithm=kind, bits=bits, fingerprint=fingerprint, line=line)


def _has_key_after_prefix(fields: Sequence[str]) -> bool:
    return any(_KEY_TYPE.match(a) and _BLOB.match(b) for a, b in itertools.pairwise(fields[1:]))


def _bits(kind: str, key: asyncssh.SSHKey) -> int:
    if kind == "ssh-ed25519":
        return 256
    if kind in _ECDSA_BITS:
        return _ECDSA_BITS[kind]
    pyca = key.pyca_key
    if not isinstance(pyca, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        raise KeyRefused("key_invalid")
    return int(pyca.key_size)


def is_fingerprint(text: str) -> bool:
    """Whether `text` has the form of a key's fingerprint. Anything else names no stored key,
    and need not be looked up; some could not be (PostgreSQL's text cannot hold a NUL)."""
    return _FINGERPRINT.fullmatch(text) is not None


def clean_title(title: str) -> str:
    """The title as it will appear (trimmed, inner whitespace runs collapsed)."""
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and c not in " \t" for c in title):
        raise KeyRefused("title_invalid_characters")
    cleaned = " ".join(title.split())
    if not cleaned:
        raise KeyRefused("title_empty")
    if len(cleaned) > MAX_TITLE_LENGTH:
        raise KeyRefused("title_too_long")
    return cleaned


def accept_key(
    title: str,
    public_key: str,
    *,
    existing: Collection[str],
    automation_fingerprint: str,
    max_keys: int,
) -> tuple[PublicKey, str]:
    """The key and cleaned title a service may add, given the fingerprints it has."""
    key = parse_public_key(public_key)
    cleaned = clean_title(title)
    if key.fingerprint == automation_fingerprint:
        raise KeyRefused("automation_key_reserved", key.fingerprint)
    if key.fingerprint in existing:
        raise KeyRefused("duplicate_fingerprint", key.fingerprint)
    if len(existing) >= max_keys:
        raise KeyRefused("too_many_keys", key.fingerprint)
    return key, cleaned


def render_authorized_keys(automation_line: str, keys: Sequence[StoredKey]) -> bytes:
    """root's authorized_keys: the automation key first, then the user's keys in the
    order given (the order they were added), each with its title as the comment."""
    kind, blob = automation_line.split()[:2]
    lines = [HEADER.rstrip("\n"), f"{kind} {blob} {AUTOMATION_COMMENT}"]
    for key in keys:
        lines.append(f"{key.line} {' '.join(key.title.split())}")
    return ("\n".join(lines) + "\n").encode()


def checksum(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
