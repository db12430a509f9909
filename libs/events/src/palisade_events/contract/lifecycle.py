"""Termination protection and the backup grace period (worker `lifecycle`).

The seed: "It's not possible to change software versions, delete, shut down,
power off, reset or reboot your service when Termination protection is
enabled", and "Our grace period for storing backups after the deletion of
service is 7 days".
"""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

from pydantic import AwareDatetime, Field

from ..messages import Command, Event, Payload, Query, Reply, StrictModel
from ..types import Reason, ServiceId
from .backup import BackupId

OWNER = "lifecycle"


class _Lifecycle:
    owner: ClassVar[str] = OWNER


# ------------------------------------------------------------------ commands


class TerminationProtectionEnableRequested(_Lifecycle, Command):
    """Turn termination protection on: destructive operations are then refused."""


class TerminationProtectionDisableRequested(_Lifecycle, Command):
    """Turn termination protection off (the default)."""


class ServiceDeleteRequested(_Lifecycle, Command):
    """Delete the service. By default a backup is taken first and kept 7 days."""

    confirm_name: str = Field(
        min_length=1, max_length=63, description="The service name, typed by the user", examples=["redis-bgrkj"]
    )
    keep_backup: bool = Field(
        True, description="Take a pre-deletion backup and retain it 7 days; false purges all backups now"
    )


class ServiceShutdownRequested(_Lifecycle, Command):
    """Shut the service's VM down."""


class ServicePowerOffRequested(_Lifecycle, Command):
    """Power the service's VM off."""


class ServiceResetRequested(_Lifecycle, Command):
    """Reset the service's VM."""


class ServiceRebootRequested(_Lifecycle, Command):
    """Reboot the service's VM."""


class SoftwareVersionChangeRequested(_Lifecycle, Command):
    """Change the version of the service's software."""

    target_version: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", examples=["7.2.4"]
    )


class BackupRestoreRequested(_Lifecycle, Command):
    """Restore a backup; a retained backup only until the end of its grace period."""

    backup_id: BackupId


class LifecycleStatusReply(Reply):
    """Protection, deletion state and retained backups of one service."""

    class RetainedBackup(StrictModel):
        backup_id: str
        purge_at: AwareDatetime | None
        state: Literal["available", "retained", "purge_requested", "purged"]

    service_id: ServiceId
    name: str
    protection: bool
    state: Literal["active", "deleting", "terminated", "deprovisioned"]
    deletion: Literal["none", "awaiting_backup", "approved", "halted"]
    backups: list[RetainedBackup] = Field(max_length=1000)


class LifecycleStatus(_Lifecycle, Query):
    """Ask for a service's protection, deletion state and retained backups."""

    reply: ClassVar[type[Reply]] = LifecycleStatusReply
    service_id: ServiceId


# ------------------------------------------------------------------ events


class TerminationProtectionEnabled(_Lifecycle, Event):
    """Termination protection is on."""


class TerminationProtectionDisabled(_Lifecycle, Event):
    """Termination protection is off."""


class TerminationProtectionChangeRejected(_Lifecycle, Event):
    """A protection toggle was refused (unknown or terminated service)."""

    reason: Reason


class _Rejection(_Lifecycle, Event):
    reason: Reason = Field(
        description="termination_protection_enabled, unknown_service, service_terminated, "
        "deletion_in_progress, confirmation_mismatch, grace_period_expired, unknown_backup",
    )


class ServiceDeleteRejected(_Rejection):
    """The delete was refused; nothing happened."""


class ServiceShutdownRejected(_Rejection):
    """The shutdown was refused; nothing happened."""


class ServicePowerOffRejected(_Rejection):
    """The power-off was refused; nothing happened."""


class ServiceResetRejected(_Rejection):
    """The reset was refused; nothing happened."""


class ServiceRebootRejected(_Rejection):
    """The reboot was refused; nothing happened."""


class SoftwareVersionChangeRejected(_Rejection):
    """The version change was refused; nothing happened."""


class BackupRestoreRejected(_Rejection):
    """The restore was refused; nothing happened."""


class ServiceShutdownApproved(_Lifecycle, Event):
    """The orchestrator may shut the VM down."""


class ServicePowerOffApproved(_Lifecycle, Event):
    """The orchestrator may power the VM off."""


class ServiceResetApproved(_Lifecycle, Event):
    """The orchestrator may reset the VM."""


class ServiceRebootApproved(_Lifecycle, Event):
    """The orchestrator may reboot the VM."""


class SoftwareVersionChangeApproved(_Lifecycle, Event):
    """The orchestrator may change the software version."""

    target_version: str = Field(max_length=64)


class BackupRequested(_Lifecycle, Event):
    """Asks the backup system for a backup; it answers `backup.BackupCompleted` or
    `backup.BackupFailed` with the same `request_id`."""

    request_id: uuid.UUID = Field(description="Echoed in the backup system's answer")
    purpose: Literal["pre_deletion"] = "pre_deletion"


class ServiceTerminationApproved(_Lifecycle, Event):
    """The orchestrator may terminate the VM: the pre-deletion backup exists, or
    the user opted out of it."""

    deletion_id: uuid.UUID
    backup_id: str | None = Field(None, max_length=100, description="The retained pre-deletion backup, if any")


class BackupRetained(_Lifecycle, Event):
    """The pre-deletion backup is kept, free, until `purge_at` (deletion + 7 days)."""

    backup_id: BackupId
    purge_at: AwareDatetime


class ServiceDeletionHalted(_Lifecycle, Event):
    """The deletion stopped: the service is not terminated without its backup."""

    deletion_id: uuid.UUID
    reason: Reason
    detail: str | None = Field(None, max_length=500, description="The backup system's words")


class BackupPurgeRequested(_Lifecycle, Event):
    """Asks the backup system to delete a backup permanently; it answers `backup.BackupPurged`."""

    backup_id: BackupId
    reason: Literal["grace_period_ended", "deleted_without_backup", "deleted_with_service"]


class BackupRestoreApproved(_Lifecycle, Event):
    """The backup system may restore the backup."""

    backup_id: BackupId


TYPES: tuple[type[Payload], ...] = (
    TerminationProtectionEnableRequested,
    TerminationProtectionDisableRequested,
    ServiceDeleteRequested,
    ServiceShutdownRequested,
    ServicePowerOffRequested,
    ServiceResetRequested,
    ServiceRebootRequested,
    SoftwareVersionChangeRequested,
    BackupRestoreRequested,
    LifecycleStatus,
    TerminationProtectionEnabled,
    TerminationProtectionDisabled,
    TerminationProtectionChangeRejected,
    ServiceDeleteRejected,
    ServiceShutdownRejected,
    ServicePowerOffRejected,
    ServiceResetRejected,
    ServiceRebootRejected,
    SoftwareVersionChangeRejected,
    BackupRestoreRejected,
    ServiceShutdownApproved,
    ServicePowerOffApproved,
    ServiceResetApproved,
    ServiceRebootApproved,
    SoftwareVersionChangeApproved,
    BackupRequested,
    ServiceTerminationApproved,
    BackupRetained,
    ServiceDeletionHalted,
    BackupPurgeRequested,
    BackupRestoreApproved,
)
