"""Integration events of the platform's backup system, which lifecycle projects."""

from __future__ import annotations

import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints

from ..messages import Event, Payload
from ..types import ServiceId

BackupId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"),
    Field(description="The backup system's id of a backup", examples=["bk-2026-11-25-0001"]),
]


class BackupCompleted(Event):
    """A backup of a service exists (scheduled, manual, or the one lifecycle asked for)."""

    owner: ClassVar[str] = "backup"

    service_id: ServiceId
    backup_id: BackupId
    purpose: Literal["scheduled", "manual", "pre_deletion"] = Field(description="Why it was taken")
    request_id: uuid.UUID | None = Field(
        None, description="The `request_id` of the `BackupRequested` this answers, if any"
    )


class BackupFailed(Event):
    """A requested backup could not be taken."""

    owner: ClassVar[str] = "backup"

    service_id: ServiceId
    request_id: uuid.UUID = Field(description="The `request_id` of the `BackupRequested` that failed")
    reason: str = Field(min_length=1, max_length=500, examples=["snapshot timed out"])


class BackupPurged(Event):
    """A backup was permanently deleted, as asked by `BackupPurgeRequested`."""

    owner: ClassVar[str] = "backup"

    service_id: ServiceId
    backup_id: BackupId


TYPES: tuple[type[Payload], ...] = (BackupCompleted, BackupFailed, BackupPurged)
