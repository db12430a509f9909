"""SSH keys allowed on a service's VM (worker `sshkeys`).

The seed: "From here, you can add or remove SSH keys allowed on the server ...
Simply give your key a title and save!" The worker keeps each service's keys and
writes them to root's `authorized_keys` on the VM, after Palisade's own
automation key, which is always kept.

Commands carry the service in the envelope (`service_id`). An accepted change is
followed by `SshKeysApplyRequested` (the worker asks itself, so the key is recorded
even while the VM is unreachable) and then by `SshKeysApplied` or
`SshKeysApplyFailed`, all with the command's correlation id.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from ..messages import Command, Event, Payload, Query, Reply, StrictModel
from ..types import Reason, ServiceId

OWNER = "sshkeys"

Fingerprint = Annotated[
    str,
    StringConstraints(pattern=r"^SHA256:[A-Za-z0-9+/]{43}$"),
    Field(
        description="SHA256 fingerprint as OpenSSH prints it",
        examples=["SHA256:G/MlltlV9hAbErlPGE9ArU1qd6JLBa9Bmpaerz5Ixcs"],
    ),
]
Checksum = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{64}$"),
    Field(description="SHA-256 (hex) of the authorized_keys file as written"),
]
_KEY_REASONS = (
    "key_empty, key_contains_newline, key_contains_nul, key_options_not_allowed, dsa_key_refused,"
    " rsa_key_too_short, key_certificate_not_supported, key_type_unsupported, key_invalid, title_empty,"
    " title_too_long, title_invalid_characters, duplicate_fingerprint, automation_key_reserved, too_many_keys,"
    " unknown_service"
)


class _SshKeys:
    owner: ClassVar[str] = OWNER


# ------------------------------------------------------------------ commands


class SshKeyAdded(_SshKeys, Command):
    """The user added a public key (dashboard: Security > Manage SSH Keys > Add key)."""

    # Bounds are generous on purpose: a too-long title or a malformed key is refused
    # by the worker with its own reason (SshKeyRejected), not parked as invalid.
    title: str = Field(max_length=1000, description="The key's name (at most 100 characters)", examples=["laptop"])
    public_key: str = Field(
        max_length=16_384,
        description="One OpenSSH public key line: TYPE BASE64 [COMMENT], no options",
        examples=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHg0NkLyr3pn1n5UDNTlLBYAB1YQ6zG2VhfZ7Hwnxze7 me@laptop"],
    )


class SshKeyRemoved(_SshKeys, Command):
    """The user deleted a key (the trash icon), by fingerprint."""

    fingerprint: str = Field(max_length=200, description="SHA256 fingerprint of the key", examples=["SHA256:..."])


class SshKeysApplyRequested(_SshKeys, Command):
    """Write the service's current keys to its VM. The worker sends this to itself
    after every accepted change; an operator may send it to re-push."""

    reason: Literal["keys_changed", "reprovisioned", "reconcile", "operator"] = "operator"


class SshKeyInfo(StrictModel):
    fingerprint: Fingerprint
    title: str = Field(max_length=100)
    algorithm: str = Field(max_length=64, examples=["ssh-ed25519"])
    bits: int = Field(ge=0, le=65_536)
    added_at: AwareDatetime


class SshKeyList(Reply):
    """A service's keys and whether the VM has them."""

    service_id: ServiceId
    keys: list[SshKeyInfo] = Field(max_length=1000)
    automation_fingerprint: Fingerprint
    state: Literal["applied", "pending", "failed"] = Field(
        description="applied: the VM has exactly these keys; pending: a write is due; failed: the last write failed"
    )
    applied_checksum: Checksum | None = None
    last_error: str | None = Field(None, max_length=500)


class ListSshKeys(_SshKeys, Query):
    """Ask for a service's keys."""

    reply: ClassVar[type[Reply]] = SshKeyList
    service_id: ServiceId


# ------------------------------------------------------------------ events


class SshKeyAccepted(_SshKeys, Event):
    """A key was added to the service's list; `SshKeysApplied` follows once the VM has it."""

    fingerprint: Fingerprint
    title: str = Field(max_length=100)
    algorithm: str = Field(max_length=64)
    bits: int = Field(ge=0, le=65_536)


class SshKeyRejected(_SshKeys, Event):
    """A key was refused; nothing changed and nothing was pushed."""

    reason: Reason = Field(description=_KEY_REASONS)
    fingerprint: Fingerprint | None = Field(None, description="When the key could be parsed")


class SshKeyRemovalAccepted(_SshKeys, Event):
    """A key was removed from the service's list; `SshKeysApplied` follows once the VM lost it."""

    fingerprint: Fingerprint


class SshKeyRemovalRejected(_SshKeys, Event):
    """A removal was refused (unknown_service, unknown_fingerprint)."""

    reason: Reason
    fingerprint: str = Field(max_length=200)


class SshKeysApplied(_SshKeys, Event):
    """The VM's authorized_keys now holds the automation key and `count` user keys
    (written atomically with mode 0600, read back and compared)."""

    count: int = Field(ge=0, le=1000, description="User keys in the file (the automation key not counted)")
    checksum: Checksum
    changed: bool = Field(description="False when the file already had this content")


class SshKeysApplyFailed(_SshKeys, Event):
    """The keys could not be written; the VM keeps its previous file. Transient failures
    (VM unreachable) are retried first and do not produce this event."""

    reason: Reason = Field(
        description="host_key_mismatch, authentication_failed, negotiation_failed, command_failed,"
        " readback_mismatch, invalid_host_key, unknown_service"
    )
    detail: str | None = Field(None, max_length=500)


TYPES: tuple[type[Payload], ...] = (
    SshKeyAdded,
    SshKeyRemoved,
    SshKeysApplyRequested,
    ListSshKeys,
    SshKeyAccepted,
    SshKeyRejected,
    SshKeyRemovalAccepted,
    SshKeyRemovalRejected,
    SshKeysApplied,
    SshKeysApplyFailed,
)
