"""Lifecycle rules, pure: which operation is refused and why, and when a backup goes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

# The seed: "Our grace period for storing backups after the deletion of service is
# 7 days", and "we will take a backup immediately prior to service deletion and
# retain it, for free, for 7 days after which the backup will be permanently deleted".
GRACE_PERIOD = timedelta(days=7)

ServiceStateName = Literal["active", "deleting", "terminated", "deprovisioned"]
BackupStateName = Literal["available", "retained", "purge_requested", "purged"]


@dataclass(frozen=True)
class Service:
    service_id: str
    name: str
    protected: bool
    state: ServiceStateName


@dataclass(frozen=True)
class Backup:
    backup_id: str
    service_id: str
    purge_at: datetime | None
    state: BackupStateName


def refuse_operation(service: Service | None) -> str | None:
    """Why a destructive operation (the seed's list: change software versions,
    delete, shut down, power off, reset or reboot) is refused, or None."""
    if service is None:
        return "unknown_service"
    if service.state in ("terminated", "deprovisioned"):
        return "service_terminated"
    if service.protected:
        return "termination_protection_enabled"
    if service.state == "deleting":
        return "deletion_in_progress"
    return None


def refuse_delete(service: Service | None, confirm_name: str) -> str | None:
    """Protection is checked before the typed name: a protected service says so
    whatever was typed."""
    reason = refuse_operation(service)
    if reason is not None:
        return reason
    assert service is not None
    if confirm_name != service.name:
        return "confirmation_mismatch"
    return None


def refuse_protection_change(service: Service | None) -> str | None:
    if service is None:
        return "unknown_service"
    if service.state in ("terminated", "deprovisioned"):
        return "service_terminated"
    return None


def purge_at(deleted_at: datetime) -> datetime:
    return deleted_at + GRACE_PERIOD


def refuse_restore(service: Service | None, backup: Backup | None, now: datetime) -> str | None:
    """A retained backup can be restored until its purge time, not at or after it."""
    if service is None:
        return "unknown_service"
    if backup is None or backup.service_id != service.service_id:
        return "unknown_backup"
    if backup.state in ("purge_requested", "purged"):
        return "grace_period_expired"
    if backup.purge_at is not None and now >= backup.purge_at:
        return "grace_period_expired"
    return None
