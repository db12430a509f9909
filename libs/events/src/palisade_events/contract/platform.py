"""Integration events published by the rest of the platform (orchestrator, backup system)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints, field_validator

from ..messages import Event, Payload, StrictModel
from ..types import AccountId, Hostname, ServiceId, ShortText

SshHostKey = Annotated[
    str,
    StringConstraints(min_length=16, max_length=16_384, pattern=r"^(ssh|ecdsa)-[A-Za-z0-9-]+ [A-Za-z0-9+/=]+$"),
    Field(
        description="The VM's SSH host public key in OpenSSH form (type and base64, no comment)",
        examples=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3W3XqvGSHjZOLA1c5m6pY9bW2sF0H7n1d8oZk5y1Q"],
    ),
]


class SshEndpoint(StrictModel):
    host: str = Field(max_length=64, description="Address sshd listens on", examples=["10.0.0.5"])
    port: int = Field(22, ge=1, le=65535)
    host_key: SshHostKey

    @field_validator("host")
    @classmethod
    def _ip(cls, v: str) -> str:
        return str(ipaddress.ip_address(v))


class ServiceProvisioned(Event):
    """A service's VM exists and runs its software; every worker projects it."""

    owner: ClassVar[str] = "platform"

    service_id: ServiceId
    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="The service's name, typed by the user to confirm deletion",
        examples=["redis-bgrkj"],
    )
    software: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$", examples=["redis"])
    account_id: AccountId
    hostname: Hostname
    ipv4: str | None = Field(None, max_length=15, examples=["23.88.47.208"])
    ipv6: str | None = Field(None, max_length=45, examples=["2a01:4f8:c012:1234::1"])
    private_ip: str = Field(
        max_length=45, description="Address on the platform's private network", examples=["10.0.0.5"]
    )
    ssh: SshEndpoint

    @field_validator("ipv4")
    @classmethod
    def _v4(cls, v: str | None) -> str | None:
        return None if v is None else str(ipaddress.IPv4Address(v))

    @field_validator("ipv6")
    @classmethod
    def _v6(cls, v: str | None) -> str | None:
        return None if v is None else str(ipaddress.IPv6Address(v))

    @field_validator("private_ip")
    @classmethod
    def _private(cls, v: str) -> str:
        return str(ipaddress.ip_address(v))


class ServiceDeprovisioned(Event):
    """The service's VM is gone; workers forget the service."""

    owner: ClassVar[str] = "platform"

    service_id: ServiceId


class ServiceTerminated(Event):
    """The orchestrator terminated the VM after `ServiceTerminationApproved`."""

    owner: ClassVar[str] = "platform"

    service_id: ServiceId
    note: ShortText | None = None


TYPES: tuple[type[Payload], ...] = (ServiceProvisioned, ServiceDeprovisioned, ServiceTerminated)
