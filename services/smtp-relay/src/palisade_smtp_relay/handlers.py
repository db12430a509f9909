"""What the relay does with bus messages: the service projection, lifting a
suspension, the status query. (Its SMTP decisions are in `relay`.)"""

from __future__ import annotations

from typing import Any

from palisade_events import Context, Job, Rejected, Reply, WorkerRuntime
from palisade_events.contract import platform
from palisade_events.contract import smtp as contract

from . import domain, store
from .metrics import QUOTA_USED
from .relay import Relay

Ctx = Context[Relay]


async def service_provisioned(evt: platform.ServiceProvisioned, ctx: Ctx) -> None:
    await store.upsert_service(
        ctx.db, evt.service_id, domain.slug_of(evt.hostname), domain.normalize_ip(evt.private_ip), ctx.now()
    )


async def service_deprovisioned(evt: platform.ServiceDeprovisioned, ctx: Ctx) -> None:
    await store.delete_service(ctx.db, evt.service_id)


async def suspension_lifted(cmd: contract.RelaySuspensionLifted, ctx: Ctx) -> None:
    lifted = await store.lift_suspension(ctx.db, ctx.service_id or "")
    if lifted is None:
        raise Rejected("unknown_service", contract.RelaySuspensionLiftRejected(reason="unknown_service"))
    if not lifted:
        raise Rejected("not_suspended", contract.RelaySuspensionLiftRejected(reason="not_suspended"))
    if cmd.note:
        ctx.audit_detail["note"] = cmd.note
    await ctx.emit(contract.RelayAccessRestored())


async def relay_status(query: contract.RelayStatus, ctx: Ctx) -> Reply:
    found = await store.status(ctx.db, query.service_id)
    if found is None:
        raise Rejected("unknown_service")
    now = ctx.now()
    return contract.RelayStatusReply(
        service_id=found.service.service_id,
        sender=domain.sender_address(found.service.slug, ctx.deps.settings.sender_domain),
        private_ip=found.service.private_ip,
        suspended=found.service.suspended,
        violations_24h=domain.violations_in_window(found.violations, now),
        quota_used=domain.quota_used(found.sends, now),
        quota_limit=domain.QUOTA_LIMIT,
        window_seconds=int(domain.QUOTA_WINDOW.total_seconds()),
        next_slot_seconds=domain.next_slot_seconds(found.sends, now),
    )


HANDLERS: dict[type[Any], Any] = {
    platform.ServiceProvisioned: service_provisioned,
    platform.ServiceDeprovisioned: service_deprovisioned,
    contract.RelaySuspensionLifted: suspension_lifted,
    contract.RelayStatus: relay_status,
}


async def refresh_quota_gauge(rt: WorkerRuntime[Relay]) -> int:
    """Replace the gauge's series with the current top services (see `metrics`)."""
    async with rt.pool.acquire() as conn:
        top = await store.top_quota_users(conn, rt.clock.now(), rt.deps.settings.quota_gauge_top)
    QUOTA_USED.clear()
    for service_id, used in top:
        QUOTA_USED.labels(service_id).set(used)
    return 0


def jobs(every_seconds: float) -> tuple[Job, ...]:
    return (Job("quota-gauge", every_seconds, refresh_quota_gauge),)
