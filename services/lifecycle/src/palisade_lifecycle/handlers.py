"""What lifecycle does with each message. The rules are in `domain`, the SQL in `store`."""

from __future__ import annotations

import uuid
from typing import Any

from palisade_events import Context, Event, Job, Rejected, Reply, WorkerRuntime
from palisade_events.contract import backup, platform
from palisade_events.contract import lifecycle as lc

from . import domain, store
from .metrics import BACKUPS_RETAINED, PROTECTED_SERVICES, PURGES, REJECTIONS

Ctx = Context[None]


def _reject(ctx: Ctx, reason: str, event: Event | None) -> Rejected:
    ctx.after_commit(lambda: REJECTIONS.labels(reason).inc())
    return Rejected(reason, event)


def _service_id(ctx: Ctx) -> str:
    return ctx.service_id or ""


# ------------------------------------------------------------ projections


async def service_provisioned(evt: platform.ServiceProvisioned, ctx: Ctx) -> None:
    store.upsert_service(ctx, evt.service_id, evt.name, evt.account_id, ctx.now())


async def service_deprovisioned(evt: platform.ServiceDeprovisioned, ctx: Ctx) -> None:
    # The row stays: restores of retained backups remain possible during the grace period.
    if await store.lock_service(ctx.db, evt.service_id) is not None:
        store.set_state(ctx, evt.service_id, "deprovisioned", ctx.now())


# ------------------------------------------------------------ protection


async def protection_enable(_: lc.TerminationProtectionEnableRequested, ctx: Ctx) -> None:
    await _set_protection(ctx, True)


async def protection_disable(_: lc.TerminationProtectionDisableRequested, ctx: Ctx) -> None:
    await _set_protection(ctx, False)


async def _set_protection(ctx: Ctx, on: bool) -> None:
    service = await store.lock_service(ctx.db, _service_id(ctx))
    reason = domain.refuse_protection_change(service)
    if reason is not None:
        raise _reject(ctx, reason, lc.TerminationProtectionChangeRejected(reason=reason))
    store.set_protection(ctx, _service_id(ctx), on, ctx.now())
    await ctx.emit(lc.TerminationProtectionEnabled() if on else lc.TerminationProtectionDisabled())
    ctx.after_commit(lambda: PROTECTED_SERVICES.inc(1 if on else -1))


# ------------------------------------------------------------ operations other than delete

# request type -> (approval factory, rejection event type)
_OPERATIONS: dict[type[Any], tuple[Any, Any]] = {
    lc.ServiceShutdownRequested: (lambda _: lc.ServiceShutdownApproved(), lc.ServiceShutdownRejected),
    lc.ServicePowerOffRequested: (lambda _: lc.ServicePowerOffApproved(), lc.ServicePowerOffRejected),
    lc.ServiceResetRequested: (lambda _: lc.ServiceResetApproved(), lc.ServiceResetRejected),
    lc.ServiceRebootRequested: (lambda _: lc.ServiceRebootApproved(), lc.ServiceRebootRejected),
    lc.SoftwareVersionChangeRequested: (
        lambda cmd: lc.SoftwareVersionChangeApproved(target_version=cmd.target_version),
        lc.SoftwareVersionChangeRejected,
    ),
}


async def operation_requested(cmd: Any, ctx: Ctx) -> None:
    approve, rejection = _OPERATIONS[type(cmd)]
    service = await store.lock_service(ctx.db, _service_id(ctx))
    reason = domain.refuse_operation(service)
    if reason is not None:
        raise _reject(ctx, reason, rejection(reason=reason))
    await ctx.emit(approve(cmd))


# ------------------------------------------------------------ delete


async def delete_requested(cmd: lc.ServiceDeleteRequested, ctx: Ctx) -> None:
    service_id = _service_id(ctx)
    service = await store.lock_service(ctx.db, service_id)
    reason = domain.refuse_delete(service, cmd.confirm_name)
    if reason is not None:
        raise _reject(ctx, reason, lc.ServiceDeleteRejected(reason=reason))
    deletion_id = uuid.uuid4()
    now = ctx.now()
    ctx.audit_detail.update(keep_backup=cmd.keep_backup, deletion_id=str(deletion_id))
    if cmd.keep_backup:
        await store.start_deletion(ctx.db, deletion_id, service_id, True, now, "awaiting_backup")
        store.set_state(ctx, service_id, "deleting", now)
        await ctx.emit(lc.BackupRequested(request_id=deletion_id))
        return
    # Opted out: "both the service and all backups will be permanently deleted with immediate effect".
    await store.start_deletion(ctx.db, deletion_id, service_id, False, now, "approved")
    await _purge_all(ctx, service_id, "deleted_without_backup")
    store.set_state(ctx, service_id, "terminated", now)
    await ctx.emit(lc.ServiceTerminationApproved(deletion_id=deletion_id))


async def _purge_all(ctx: Ctx, service_id: str, reason: Any, *, keep: str | None = None) -> None:
    for backup_id in await store.live_backups(ctx.db, service_id, except_id=keep):
        await store.mark_backup(ctx.db, backup_id, "purge_requested")
        await ctx.emit(lc.BackupPurgeRequested(backup_id=backup_id, reason=reason), service_id=service_id)
        ctx.after_commit(lambda: PURGES.labels(reason).inc())


async def backup_completed(evt: backup.BackupCompleted, ctx: Ctx) -> None:
    service = await store.lock_service(ctx.db, evt.service_id)
    await store.record_backup(ctx.db, evt.backup_id, evt.service_id, evt.purpose, ctx.now())
    if evt.request_id is None or service is None:
        return
    deletion = await store.deletion_awaiting(ctx.db, evt.request_id)
    if deletion is None:
        return
    now = ctx.now()
    if service.protected:
        # Protection was switched on while the backup ran: the user changed their mind.
        await _halt(ctx, evt.request_id, evt.service_id, "termination_protection_enabled", None)
        return
    purge_at = domain.purge_at(now)
    await store.retain_backup(ctx.db, evt.backup_id, evt.service_id, purge_at)
    await store.approve_deletion(ctx.db, evt.request_id, evt.backup_id, now)
    await _purge_all(ctx, evt.service_id, "deleted_with_service", keep=evt.backup_id)
    store.set_state(ctx, evt.service_id, "terminated", now)
    await ctx.emit(
        lc.ServiceTerminationApproved(deletion_id=evt.request_id, backup_id=evt.backup_id), service_id=evt.service_id
    )
    await ctx.emit(lc.BackupRetained(backup_id=evt.backup_id, purge_at=purge_at), service_id=evt.service_id)
    await ctx.audit(
        "ServiceTerminationApproved",
        "accepted",
        service_id=evt.service_id,
        detail={"backup_id": evt.backup_id, "purge_at": purge_at.isoformat()},
    )
    ctx.after_commit(lambda: BACKUPS_RETAINED.inc())


async def backup_failed(evt: backup.BackupFailed, ctx: Ctx) -> None:
    await store.lock_service(ctx.db, evt.service_id)
    if await store.deletion_awaiting(ctx.db, evt.request_id) is not None:
        await _halt(ctx, evt.request_id, evt.service_id, "pre_deletion_backup_failed", evt.reason)


async def _halt(ctx: Ctx, deletion_id: uuid.UUID, service_id: str, reason: str, detail: str | None) -> None:
    """The service is never terminated without its backup: stop and say so."""
    await store.halt_deletion(ctx.db, deletion_id, reason)
    store.set_state(ctx, service_id, "active", ctx.now())
    await ctx.emit(
        lc.ServiceDeletionHalted(deletion_id=deletion_id, reason=reason, detail=detail), service_id=service_id
    )
    await ctx.audit("ServiceDeletionHalted", "failed", reason, service_id=service_id, detail={"backend": detail})


async def backup_purged(evt: backup.BackupPurged, ctx: Ctx) -> None:
    found = await store.get_backup(ctx.db, evt.backup_id)
    if found is None:
        return
    if found.state == "retained":
        ctx.after_commit(lambda: BACKUPS_RETAINED.dec())
    await store.mark_backup(ctx.db, evt.backup_id, "purged")
    await ctx.audit("BackupPurged", "accepted", service_id=evt.service_id, detail={"backup_id": evt.backup_id})


# ------------------------------------------------------------ restore and status


async def restore_requested(cmd: lc.BackupRestoreRequested, ctx: Ctx) -> None:
    service = await store.lock_service(ctx.db, _service_id(ctx))
    found = await store.get_backup(ctx.db, cmd.backup_id)
    reason = domain.refuse_restore(service, found, ctx.now())
    if reason is not None:
        raise _reject(ctx, reason, lc.BackupRestoreRejected(reason=reason))
    await ctx.emit(lc.BackupRestoreApproved(backup_id=cmd.backup_id))


async def status(query: lc.LifecycleStatus, ctx: Ctx) -> Reply:
    row = await ctx.db.fetchrow("SELECT * FROM services WHERE service_id = $1", query.service_id)
    if row is None:
        raise Rejected("unknown_service")
    backups = await store.service_backups(ctx.db, query.service_id)
    return lc.LifecycleStatusReply(
        service_id=row["service_id"],
        name=row["name"],
        protection=row["protected"],
        state=row["state"],
        deletion=await store.latest_deletion_state(ctx.db, query.service_id),  # type: ignore[arg-type]
        backups=[
            lc.LifecycleStatusReply.RetainedBackup(backup_id=b["backup_id"], purge_at=b["purge_at"], state=b["state"])
            for b in backups
        ],
    )


HANDLERS: dict[type[Any], Any] = {
    platform.ServiceProvisioned: service_provisioned,
    platform.ServiceDeprovisioned: service_deprovisioned,
    lc.TerminationProtectionEnableRequested: protection_enable,
    lc.TerminationProtectionDisableRequested: protection_disable,
    lc.ServiceShutdownRequested: operation_requested,
    lc.ServicePowerOffRequested: operation_requested,
    lc.ServiceResetRequested: operation_requested,
    lc.ServiceRebootRequested: operation_requested,
    lc.SoftwareVersionChangeRequested: operation_requested,
    lc.ServiceDeleteRequested: delete_requested,
    backup.BackupCompleted: backup_completed,
    backup.BackupFailed: backup_failed,
    backup.BackupPurged: backup_purged,
    lc.BackupRestoreRequested: restore_requested,
    lc.LifecycleStatus: status,
}


# ------------------------------------------------------------ scheduled work


async def purge_due_backups(rt: WorkerRuntime[None]) -> int:
    """The end of a grace period: `BackupPurgeRequested` exactly once per retained backup.

    The claim (FOR UPDATE SKIP LOCKED), the event (outbox) and the done mark share
    one transaction, so replicas never both purge and a crash purges on restart."""
    async with rt.transaction() as ctx:
        due = await store.claim_due_purges(ctx.db, ctx.now())
        for action in due:
            await store.mark_backup(ctx.db, action["backup_id"], "purge_requested")
            await ctx.emit(
                lc.BackupPurgeRequested(backup_id=action["backup_id"], reason="grace_period_ended"),
                service_id=action["service_id"],
            )
            await ctx.audit(
                "GracePeriodEnded",
                "accepted",
                service_id=action["service_id"],
                detail={"backup_id": action["backup_id"]},
            )
            await store.mark_action_done(ctx.db, action["id"], ctx.now())
            ctx.after_commit(lambda: PURGES.labels("grace_period_ended").inc())
    return len(due)


async def refresh_gauges(rt: WorkerRuntime[None]) -> int:
    async with rt.pool.acquire() as conn:
        protected, retained = await store.gauges(conn)
    PROTECTED_SERVICES.set(protected)
    BACKUPS_RETAINED.set(retained)
    return 0


JOBS = (
    Job("purge-due-backups", 5.0, purge_due_backups),
    Job("refresh-gauges", 30.0, refresh_gauges),
)
