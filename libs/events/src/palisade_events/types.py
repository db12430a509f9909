"""Bounded field types shared by the contract."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

ServiceId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
    Field(description="Platform service id", examples=["svc-redis-bgrkj"]),
]
AccountId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$"),
    Field(description="Platform account id", examples=["acc-1042"]),
]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Reason = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^[a-z0-9_]+$"),
    Field(description="Machine-readable reason", examples=["termination_protection_enabled"]),
]
Hostname = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=253,
        pattern=r"^([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$",
    ),
    Field(description="DNS hostname (A-label form)", examples=["redis-bgrkj-u76.vm.example.net"]),
]
