"""Lifecycle's SQL. Every function takes the handler's connection (its transaction), except the
last writes of a handling, which nothing after them reads: those take the handler's context and
go with its COMMIT (`Context.write_at_commit`), a batch's in one round trip per statement."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from palisade_events import Context
from palisade_events.db import Connection

from .domain import Backup, Service


def _service(row: asyncpg.Record | None) -> Service | None:
    if row is None:
        return None
    return Service(row["service_id"], row["name"], row["protected"], row["state"])


def _backup(row: asyncpg.Record | None) -> Backup | None:
    if row is None:
        return None
    return Backup(row["backup_id"], row["service_id"], row["purge_at"], row["state"])


def upsert_service(ctx: Context[Any], service_id: str, name: str, account_id: str, now: datetime) -> None:
    ctx.write_at_commit(
        "INSERT INTO services (service_id, name, account_id, updated_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (service_id) DO UPDATE SET name = $2, account_id = $3, state = 'active', updated_at = $4",
        service_id,
        name,
        account_id,
        now,
    )


async def lock_service(db: Connection, service_id: str) -> Service | None:
    """The service row, locked for this transaction: one service's changes never interleave."""
    return _service(await db.fetchrow("SELECT * FROM services WHERE service_id = $1 FOR UPDATE", service_id))


def set_protection(ctx: Context[Any], service_id: str, protected: bool, now: datetime) -> None:
    ctx.write_at_commit(
        "UPDATE services SET protected = $2, updated_at = $3 WHERE service_id = $1", service_id, protected, now
    )


def set_state(ctx: Context[Any], service_id: str, state: str, now: datetime) -> None:
    ctx.write_at_commit("UPDATE services SET state = $2, updated_at = $3 WHERE service_id = $1", service_id, state, now)


async def start_deletion(
    db: Connection, deletion_id: uuid.UUID, service_id: str, keep_backup: bool, now: datetime, state: str
) -> None:
    await db.execute(
        "INSERT INTO deletions (deletion_id, service_id, requested_at, keep_backup, state, approved_at)"
        " VALUES ($1, $2, $3, $4, $5, CASE WHEN $5::text = 'approved' THEN $3::timestamptz END)",
        deletion_id,
        service_id,
        now,
        keep_backup,
        state,
    )


async def deletion_awaiting(db: Connection, deletion_id: uuid.UUID) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM deletions WHERE deletion_id = $1 AND state = 'awaiting_backup' FOR UPDATE", deletion_id
    )


async def approve_deletion(db: Connection, deletion_id: uuid.UUID, backup_id: str | None, now: datetime) -> None:
    await db.execute(
        "UPDATE deletions SET state = 'approved', backup_id = $2, approved_at = $3 WHERE deletion_id = $1",
        deletion_id,
        backup_id,
        now,
    )


async def halt_deletion(db: Connection, deletion_id: uuid.UUID, reason: str) -> None:
    await db.execute(
        "UPDATE deletions SET state = 'halted', halted_reason = $2 WHERE deletion_id = $1", deletion_id, reason
    )


async def latest_deletion_state(db: Connection, service_id: str) -> str:
    state = await db.fetchval(
        "SELECT state FROM deletions WHERE service_id = $1 ORDER BY requested_at DESC LIMIT 1", service_id
    )
    return str(state) if state else "none"


async def record_backup(db: Connection, backup_id: str, service_id: str, purpose: str, completed_at: datetime) -> None:
    await db.execute(
        "INSERT INTO backups (backup_id, service_id, purpose, completed_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (backup_id) DO NOTHING",
        backup_id,
        service_id,
        purpose,
        completed_at,
    )


async def get_backup(db: Connection, backup_id: str) -> Backup | None:
    return _backup(await db.fetchrow("SELECT * FROM backups WHERE backup_id = $1", backup_id))


async def live_backups(db: Connection, service_id: str, *, except_id: str | None = None) -> list[str]:
    """Backups not yet purged or asked to be."""
    rows = await db.fetch(
        "SELECT backup_id FROM backups WHERE service_id = $1 AND state IN ('available', 'retained')"
        " AND backup_id IS DISTINCT FROM $2 ORDER BY completed_at",
        service_id,
        except_id,
    )
    return [r["backup_id"] for r in rows]


async def retain_backup(db: Connection, backup_id: str, service_id: str, purge_at: datetime) -> None:
    await db.execute("UPDATE backups SET state = 'retained', purge_at = $2 WHERE backup_id = $1", backup_id, purge_at)
    await db.execute(
        "INSERT INTO scheduled_actions (action, service_id, backup_id, due_at) VALUES ('purge_backup', $1, $2, $3)"
        " ON CONFLICT (action, backup_id) DO NOTHING",
        service_id,
        backup_id,
        purge_at,
    )


async def mark_backup(db: Connection, backup_id: str, state: str) -> None:
    await db.execute("UPDATE backups SET state = $2 WHERE backup_id = $1", backup_id, state)


async def claim_due_purges(db: Connection, now: datetime, limit: int = 100) -> list[asyncpg.Record]:
    """Due actions nobody else holds; the claim lasts as long as the transaction."""
    return await db.fetch(
        "SELECT id, service_id, backup_id FROM scheduled_actions"
        " WHERE action = 'purge_backup' AND done_at IS NULL AND due_at <= $1"
        " ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        now,
        limit,
    )


async def mark_action_done(db: Connection, action_id: int, now: datetime) -> None:
    await db.execute("UPDATE scheduled_actions SET done_at = $2 WHERE id = $1", action_id, now)


async def service_backups(db: Connection, service_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT backup_id, purge_at, state FROM backups WHERE service_id = $1 ORDER BY completed_at", service_id
    )


async def gauges(db: Connection) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM services WHERE protected AND state IN ('active', 'deleting')) AS protected,"
        " (SELECT count(*) FROM backups WHERE state = 'retained') AS retained"
    )
    assert row is not None
    return int(row["protected"]), int(row["retained"])
