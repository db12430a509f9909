"""The lifecycle worker on the real broker and database, its clock moved by hand."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from palisade_events import ManualClock, Payload
from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import backup, platform
from palisade_events.contract import lifecycle as lc
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from palisade_lifecycle.worker import spec
from tests.fixtures import Collector, unique, wait_until
from tests.provisioning import service_provisioned

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)

DESTRUCTIVE: list[tuple[Payload, str]] = [
    (lc.ServiceDeleteRequested(confirm_name="NAME"), "ServiceDeleteRejected"),
    (lc.ServiceShutdownRequested(), "ServiceShutdownRejected"),
    (lc.ServicePowerOffRequested(), "ServicePowerOffRejected"),
    (lc.ServiceResetRequested(), "ServiceResetRejected"),
    (lc.ServiceRebootRequested(), "ServiceRebootRejected"),
    (lc.SoftwareVersionChangeRequested(target_version="7.2.4"), "SoftwareVersionChangeRejected"),
]


class Harness:
    """Talks to the worker as the dashboard, orchestrator and backup system would."""

    def __init__(self, client: PalisadeClient, events: Collector, audit: Collector, clock: ManualClock) -> None:
        self.client, self.events, self.audit, self.clock = client, events, audit, clock

    async def provision(self, name: str | None = None) -> tuple[str, str]:
        service_id = unique("svc")
        name = name or unique("redis").lower()[:30]
        await self.client.publish(
            service_provisioned(
                service_id, name, hostname=f"{name}-u76.vm.example.net", ipv4="203.0.113.10", private_ip="10.0.0.5"
            ),
            service_id=service_id,
        )
        await wait_until(lambda: self._known(service_id), what=f"{service_id} projected")
        return service_id, name

    async def _known(self, service_id: str) -> bool:
        try:
            await self.client.request(lc.LifecycleStatus(service_id=service_id), timeout=5)
        except QueryRejectedError:
            return False
        return True

    async def send(self, payload: Payload, service_id: str) -> Any:
        return await self.client.publish(payload, service_id=service_id)

    def caused_by(self, env: Any) -> list[dict[str, Any]]:
        return [m.json() for m in self.events.messages if m.json()["causation_id"] == str(env.message_id)]

    async def outcome(self, env: Any, count: int = 1) -> list[dict[str, Any]]:
        await wait_until(lambda: len(self.caused_by(env)) >= count, what=f"outcome of {env.type}")
        return self.caused_by(env)

    def audits_of(self, env: Any) -> list[dict[str, Any]]:
        return [m.json() for m in self.audit.messages if m.json()["message_id"] == str(env.message_id)]

    def of_type(self, type_name: str, service_id: str) -> list[dict[str, Any]]:
        return [
            m.json()
            for m in self.events.messages
            if m.json()["type"] == type_name and m.json()["service_id"] == service_id
        ]

    async def status(self, service_id: str) -> lc.LifecycleStatusReply:
        reply: lc.LifecycleStatusReply = await self.client.request(lc.LifecycleStatus(service_id=service_id))
        return reply


@pytest.fixture
async def h(run_worker, client, collect) -> Harness:
    clock = ManualClock(START)
    events = await collect(EVENTS_EXCHANGE, "lifecycle.#")
    audit = await collect(AUDIT_EXCHANGE, "lifecycle.#")
    harness = Harness(client, events, audit, clock)
    harness.rt = await run_worker(spec(), clock=clock)  # type: ignore[attr-defined]
    return harness


async def test_commands_for_an_unknown_service_are_rejected(h: Harness) -> None:
    for payload, rejected in [
        *DESTRUCTIVE,
        (lc.TerminationProtectionEnableRequested(), "TerminationProtectionChangeRejected"),
    ]:
        env = await h.send(payload, "svc-nobody")
        [event] = await h.outcome(env)
        assert (event["type"], event["payload"]["reason"]) == (rejected, "unknown_service")


async def test_protection_on_refuses_every_destructive_operation_and_does_nothing_else(h: Harness) -> None:
    service_id, name = await h.provision()
    on = await h.send(lc.TerminationProtectionEnableRequested(), service_id)
    assert [e["type"] for e in await h.outcome(on)] == ["TerminationProtectionEnabled"]

    sent = []
    for payload, rejected in DESTRUCTIVE:
        if isinstance(payload, lc.ServiceDeleteRequested):
            payload = lc.ServiceDeleteRequested(confirm_name=name)
        sent.append((await h.send(payload, service_id), rejected))
    for env, rejected in sent:
        events = await h.outcome(env)
        assert [(e["type"], e["payload"]) for e in events] == [(rejected, {"reason": "termination_protection_enabled"})]
        await wait_until(lambda env=env: len(h.audits_of(env)) == 1, what="one audit record")
        [record] = h.audits_of(env)
        assert (record["outcome"], record["reason"]) == ("rejected", "termination_protection_enabled")
    # Nothing else happened: no approval, no backup request, state unchanged.
    assert not h.of_type("BackupRequested", service_id)
    assert not [e for e in h.events.messages if e.json()["type"].endswith("Approved")]
    status = await h.status(service_id)
    assert (status.protection, status.state, status.deletion) == (True, "active", "none")


async def test_protection_off_approves_the_other_operations(h: Harness) -> None:
    service_id, _ = await h.provision()
    on = await h.send(lc.TerminationProtectionEnableRequested(), service_id)
    await h.outcome(on)
    off = await h.send(lc.TerminationProtectionDisableRequested(), service_id)
    assert [e["type"] for e in await h.outcome(off)] == ["TerminationProtectionDisabled"]
    for payload, rejected in DESTRUCTIVE[1:]:
        env = await h.send(payload, service_id)
        [event] = await h.outcome(env)
        assert event["type"] == rejected.replace("Rejected", "Approved")
    version = [e for e in h.events.messages if e.json()["type"] == "SoftwareVersionChangeApproved"]
    assert version[0].json()["payload"] == {"target_version": "7.2.4"}


async def test_delete_needs_the_exact_name(h: Harness) -> None:
    service_id, name = await h.provision()
    env = await h.send(lc.ServiceDeleteRequested(confirm_name=name.upper()), service_id)
    [event] = await h.outcome(env)
    assert (event["type"], event["payload"]["reason"]) == ("ServiceDeleteRejected", "confirmation_mismatch")
    assert (await h.status(service_id)).state == "active"


async def test_delete_with_backup_waits_for_it_then_retains_it_seven_days(h: Harness) -> None:
    service_id, name = await h.provision()
    old = await h.send(
        backup.BackupCompleted(service_id=service_id, backup_id="bk-old", purpose="scheduled"), service_id
    )
    await wait_until(lambda: _processed(h, old), what="older backup recorded")

    delete = await h.send(lc.ServiceDeleteRequested(confirm_name=name), service_id)
    [asked] = await h.outcome(delete)
    assert asked["type"] == "BackupRequested"
    assert asked["payload"]["purpose"] == "pre_deletion"

    again = await h.send(lc.ServiceDeleteRequested(confirm_name=name), service_id)
    [second] = await h.outcome(again)
    assert (second["type"], second["payload"]["reason"]) == ("ServiceDeleteRejected", "deletion_in_progress")
    assert not h.of_type("ServiceTerminationApproved", service_id), "terminated before its backup existed"

    h.clock.advance(timedelta(minutes=3))
    done = await h.send(
        backup.BackupCompleted(
            service_id=service_id,
            backup_id="bk-final",
            purpose="pre_deletion",
            request_id=uuid.UUID(asked["payload"]["request_id"]),
        ),
        service_id,
    )
    events = {e["type"]: e["payload"] for e in await h.outcome(done, 3)}
    deleted_at = START + timedelta(minutes=3)
    assert events["ServiceTerminationApproved"]["backup_id"] == "bk-final"
    assert events["BackupRetained"] == {
        "backup_id": "bk-final",
        "purge_at": (deleted_at + timedelta(days=7)).isoformat().replace("+00:00", "Z"),
    }
    assert events["BackupPurgeRequested"] == {"backup_id": "bk-old", "reason": "deleted_with_service"}
    status = await h.status(service_id)
    assert (status.state, status.deletion) == ("terminated", "approved")
    [retained] = [b for b in status.backups if b.backup_id == "bk-final"]
    assert (retained.state, retained.purge_at) == ("retained", deleted_at + timedelta(days=7))


async def _processed(h: Harness, env: Any) -> bool:
    async with h.rt.pool.acquire() as conn:  # type: ignore[attr-defined]
        return bool(await conn.fetchval("SELECT count(*) FROM inbox WHERE message_id = $1", env.message_id))


async def test_backup_failure_halts_the_deletion(h: Harness) -> None:
    service_id, name = await h.provision()
    delete = await h.send(lc.ServiceDeleteRequested(confirm_name=name), service_id)
    [asked] = await h.outcome(delete)
    failed = await h.send(
        backup.BackupFailed(
            service_id=service_id, request_id=uuid.UUID(asked["payload"]["request_id"]), reason="snapshot timed out"
        ),
        service_id,
    )
    [halted] = await h.outcome(failed)
    assert halted["type"] == "ServiceDeletionHalted"
    assert halted["payload"]["reason"] == "pre_deletion_backup_failed"
    assert halted["payload"]["detail"] == "snapshot timed out"
    assert not h.of_type("ServiceTerminationApproved", service_id)
    status = await h.status(service_id)
    assert (status.state, status.deletion) == ("active", "halted")
    await wait_until(lambda: any(a.json()["action"] == "ServiceDeletionHalted" for a in h.audit.messages))


async def test_delete_without_backup_purges_every_backup_then_approves(h: Harness) -> None:
    service_id, name = await h.provision()
    for bid in ("bk-1", "bk-2"):
        env = await h.send(
            backup.BackupCompleted(service_id=service_id, backup_id=bid, purpose="scheduled"), service_id
        )
        await wait_until(lambda env=env: _processed(h, env))
    delete = await h.send(lc.ServiceDeleteRequested(confirm_name=name, keep_backup=False), service_id)
    events = await h.outcome(delete, 3)
    assert [(e["type"], e["payload"].get("backup_id")) for e in events] == [
        ("BackupPurgeRequested", "bk-1"),
        ("BackupPurgeRequested", "bk-2"),
        ("ServiceTerminationApproved", None),
    ]
    assert {e["payload"].get("reason") for e in events[:2]} == {"deleted_without_backup"}


async def _retained_backup(h: Harness) -> tuple[str, str]:
    service_id, name = await h.provision()
    delete = await h.send(lc.ServiceDeleteRequested(confirm_name=name), service_id)
    [asked] = await h.outcome(delete)
    backup_id = unique("bk")
    done = await h.send(
        backup.BackupCompleted(
            service_id=service_id,
            backup_id=backup_id,
            purpose="pre_deletion",
            request_id=uuid.UUID(asked["payload"]["request_id"]),
        ),
        service_id,
    )
    await h.outcome(done, 2)
    await h.send(platform.ServiceDeprovisioned(service_id=service_id), service_id)
    return service_id, backup_id


async def test_restore_inside_the_grace_period_and_not_after(h: Harness) -> None:
    service_id, backup_id = await _retained_backup(h)
    h.clock.advance(timedelta(days=6, hours=23))
    inside = await h.send(lc.BackupRestoreRequested(backup_id=backup_id), service_id)
    [ok] = await h.outcome(inside)
    assert (ok["type"], ok["payload"]) == ("BackupRestoreApproved", {"backup_id": backup_id})

    h.clock.advance(timedelta(hours=1))
    after = await h.send(lc.BackupRestoreRequested(backup_id=backup_id), service_id)
    [refused] = await h.outcome(after)
    assert (refused["type"], refused["payload"]["reason"]) == ("BackupRestoreRejected", "grace_period_expired")


async def test_purge_exactly_once_with_two_replicas(h: Harness, run_worker) -> None:
    second = await run_worker(spec(), clock=h.clock)
    service_id, backup_id = await _retained_backup(h)

    assert await h.rt.run_job("purge-due-backups") == 0  # type: ignore[attr-defined]
    h.clock.advance(timedelta(days=7, seconds=1))
    # Both replicas race for the due action, several times over (their own job loops too).
    await asyncio.gather(
        *(rt.run_job("purge-due-backups") for _ in range(5) for rt in (h.rt, second))  # type: ignore[attr-defined]
    )
    assert await _purges_in_outbox(h, backup_id) == 1
    await wait_until(lambda: len(h.of_type("BackupPurgeRequested", service_id)) >= 1)
    purge = await h.send(backup.BackupPurged(service_id=service_id, backup_id=backup_id), service_id)
    await wait_until(lambda: _processed(h, purge))
    [request] = h.of_type("BackupPurgeRequested", service_id)
    assert request["payload"] == {"backup_id": backup_id, "reason": "grace_period_ended"}
    status = await h.status(service_id)
    assert [(b.backup_id, b.state) for b in status.backups] == [(backup_id, "purged")]
    restore = await h.send(lc.BackupRestoreRequested(backup_id=backup_id), service_id)
    [refused] = await h.outcome(restore)
    assert refused["payload"]["reason"] == "grace_period_expired"


async def test_purge_survives_a_restart_between_scheduling_and_due_time(h: Harness, run_worker) -> None:
    service_id, backup_id = await _retained_backup(h)
    await h.rt.stop()  # type: ignore[attr-defined]
    h.clock.advance(timedelta(days=8))
    restarted = await run_worker(spec(), clock=h.clock)
    h.rt = restarted  # type: ignore[attr-defined]
    # The restarted worker's scheduler finds the due action by itself.
    await wait_until(lambda: len(h.of_type("BackupPurgeRequested", service_id)) == 1, what="purge after restart")
    assert await restarted.run_job("purge-due-backups") == 0
    assert await _purges_in_outbox(h, backup_id) == 1
    await wait_until(lambda: any(a.json()["action"] == "GracePeriodEnded" for a in h.audit.messages))


async def _purges_in_outbox(h: Harness, backup_id: str) -> int:
    async with h.rt.pool.acquire() as conn:  # type: ignore[attr-defined]
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE message_type = 'BackupPurgeRequested'"
                " AND convert_from(body, 'UTF8')::jsonb -> 'payload' ->> 'backup_id' = $1",
                backup_id,
            )
        )


async def test_status_of_an_unknown_service_is_refused(h: Harness) -> None:
    with pytest.raises(QueryRejectedError, match="unknown_service"):
        await h.client.request(lc.LifecycleStatus(service_id="svc-nobody"))
