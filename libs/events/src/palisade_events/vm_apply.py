"""The apply bookkeeping shared by the workers that write a service's desired state to its VM
(firewall, sshkeys, ratelimit): their `services` rows carry the same columns, read here.

A change bumps the row's version and marks an apply due (`apply_state = 'pending'`,
`apply_requested_at`); the apply handler writes the VM, then records the result against
the version it applied, so a change that arrived meanwhile leaves the row pending for the
next apply. An apply whose message went round the whole retry ladder and was parked stays
pending: the reconcile job asks again for it once it is older than `after_seconds`, so a VM
that was unreachable for longer than the ladder still converges.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .db import Connection
from .runtime import Context, Job, WorkerRuntime

RECONCILE_JOB = "reconcile-pending-applies"


@dataclass(frozen=True)
class ApplyState:
    """SQL over a worker's `services` table. `version_column` is the row's desired-state
    version; `applied_version_column`, when the worker keeps one, records which version the
    VM has. Both are constants of the worker, never data."""

    version_column: str
    applied_version_column: str | None = None

    async def mark_applied(self, db: Connection, service_id: str, version: int, checksum: str, now: datetime) -> None:
        """The VM has `version`; the service is 'applied' unless its state moved on meanwhile."""
        applied = f"{self.applied_version_column} = $2, " if self.applied_version_column else ""
        await db.execute(
            f"UPDATE services SET {applied}applied_checksum = $3, applied_at = $4, updated_at = $4,"
            f" last_error = NULL, apply_state = CASE WHEN {self.version_column} = $2 THEN 'applied' ELSE 'pending' END"
            " WHERE service_id = $1",
            service_id,
            version,
            checksum,
            now,
        )

    async def mark_failed(self, db: Connection, service_id: str, version: int, error: str, now: datetime) -> None:
        """The apply of `version` failed for good; 'pending' if a newer version awaits its own."""
        await db.execute(
            "UPDATE services SET last_error = $3, updated_at = $4,"
            f" apply_state = CASE WHEN {self.version_column} = $2 THEN 'failed' ELSE 'pending' END"
            " WHERE service_id = $1",
            service_id,
            version,
            error[:500],
            now,
        )

    @staticmethod
    async def claim_stale_pending(db: Connection, requested_before: datetime, limit: int = 100) -> list[str]:
        """Services whose apply is still due long after it was asked for: claimed for this
        transaction (another replica's reconcile skips them)."""
        rows = await db.fetch(
            "SELECT service_id FROM services WHERE apply_state = 'pending' AND apply_requested_at < $1"
            " ORDER BY apply_requested_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            requested_before,
            limit,
        )
        return [r["service_id"] for r in rows]


def reconcile_job(
    every_seconds: float,
    after_seconds: float,
    ask_again: Callable[[Context[Any], str], Awaitable[None]],
) -> Job:
    """The job that asks again, through `ask_again(ctx, service_id)` (mark it pending now,
    emit the worker's apply request), for every apply still pending after `after_seconds`."""

    async def reconcile(rt: WorkerRuntime[Any]) -> int:
        cutoff = rt.clock.now() - timedelta(seconds=after_seconds)
        async with rt.transaction() as ctx:
            for service_id in await ApplyState.claim_stale_pending(ctx.db, cutoff):
                await ask_again(ctx, service_id)
        return 0

    return Job(RECONCILE_JOB, every_seconds, reconcile)


__all__ = ["RECONCILE_JOB", "ApplyState", "reconcile_job"]
