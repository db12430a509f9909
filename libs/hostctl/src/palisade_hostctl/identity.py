"""Who a host is: the address and port of its sshd and the host key it must prove."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

import asyncssh


class SshEndpointLike(Protocol):
    """Anything shaped like `platform.ServiceProvisioned.ssh` (host, port, host_key)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def host_key(self) -> str: ...


@dataclass(frozen=True)
class HostIdentity:
    """A VM's SSH identity, as projected from `platform.ServiceProvisioned`.

    `host_key` is the OpenSSH public key line (`ssh-ed25519 AAAA...`; a trailing
    comment is dropped). Two identities are equal only when the key is the same,
    so a pooled connection is never reused for a host whose key changed.
    """

    host: str
    port: int
    host_key: str
    _key: asyncssh.SSHKey = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", str(ipaddress.ip_address(self.host)))
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        parts = self.host_key.split()
        if len(parts) < 2:
            raise ValueError("host_key must be an OpenSSH public key line: 'TYPE BASE64'")
        try:
            key = asyncssh.import_public_key(f"{parts[0]} {parts[1]}")
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ValueError(f"host_key is not a valid SSH public key: {exc}") from None
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "host_key", f"{parts[0]} {parts[1]}")

    @classmethod
    def from_endpoint(cls, endpoint: SshEndpointLike) -> HostIdentity:
        return cls(endpoint.host, endpoint.port, endpoint.host_key)

    @property
    def key(self) -> asyncssh.SSHKey:
        return self._key

    @property
    def algorithm(self) -> str:
        return self._key.get_algorithm()

    @property
    def fingerprint(self) -> str:
        """`SHA256:...`, as `ssh-keygen -l` prints it."""
        return self._key.get_fingerprint("sha256")

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"
