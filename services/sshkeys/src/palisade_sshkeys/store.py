"""The sshkeys worker's SQL. Every function takes the handler's connection (its transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from palisade_events.db import Connection
from palisade_events.vm_apply import ApplyState

from .domain import PublicKey, StoredKey

# Apply state: pending / applied / failed against the row's keys_version (palisade_events.vm_apply).
APPLY = ApplyState("keys_version")


@dataclass(frozen=True)
class Service:
    service_id: str
    ssh_host: str
    ssh_port: int
    host_key: str
    keys_version: int
    apply_state: str
    applied_checksum: str | None
    last_error: str | None


def _service(row: asyncpg.Record | None) -> Service | None:
    if row is None:
        return None
    return Service(
        row["service_id"],
        row["ssh_host"],
        row["ssh_port"],
        row["host_key"],
        row["keys_version"],
        row["apply_state"],
        row["applied_checksum"],
        row["last_error"],
    )


async def upsert_service(
    db: Connection, service_id: str, host: str, port: int, host_key: str, now: datetime
) -> Service | None:
    """Record a service's SSH identity; returns what was known before."""
    before = await lock_service(db, service_id)
    await db.execute(
        "INSERT INTO services (service_id, ssh_host, ssh_port, host_key, updated_at) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (service_id) DO UPDATE SET ssh_host = $2, ssh_port = $3, host_key = $4, updated_at = $5",
        service_id,
        host,
        port,
        host_key,
        now,
    )
    return before


async def delete_service(db: Connection, service_id: str) -> None:
    await db.execute("DELETE FROM services WHERE service_id = $1", service_id)


async def lock_service(db: Connection, service_id: str) -> Service | None:
    """The service row, locked for this transaction: one service's key changes never interleave."""
    return _service(await db.fetchrow("SELECT * FROM services WHERE service_id = $1 FOR UPDATE", service_id))


async def get_service(db: Connection, service_id: str) -> Service | None:
    return _service(await db.fetchrow("SELECT * FROM services WHERE service_id = $1", service_id))


async def lock_apply(db: Connection, service_id: str) -> None:
    """Writes to one VM happen one at a time across replicas (a transaction-scoped
    advisory lock, so key changes, which lock the row, never wait for SSH)."""
    await db.execute("SELECT pg_advisory_xact_lock(hashtextextended('sshkeys.apply:' || $1, 0))", service_id)


async def keys(db: Connection, service_id: str) -> list[StoredKey]:
    rows = await db.fetch(
        "SELECT * FROM keys WHERE service_id = $1 ORDER BY seq",
        service_id,
    )
    return [StoredKey(r["fingerprint"], r["title"], r["algorithm"], r["bits"], r["line"], r["added_at"]) for r in rows]


async def add_key(db: Connection, service_id: str, key: PublicKey, title: str, now: datetime) -> None:
    await db.execute(
        "INSERT INTO keys (service_id, fingerprint, title, algorithm, bits, line, added_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        service_id,
        key.fingerprint,
        title,
        key.algorithm,
        key.bits,
        key.line,
        now,
    )


async def remove_key(db: Connection, service_id: str, fingerprint: str) -> bool:
    status = await db.execute("DELETE FROM keys WHERE service_id = $1 AND fingerprint = $2", service_id, fingerprint)
    return status == "DELETE 1"


async def mark_pending(db: Connection, service_id: str, now: datetime, *, changed: bool) -> None:
    """A write to the VM is due (and, when `changed`, the key list moved on)."""
    await db.execute(
        "UPDATE services SET apply_state = 'pending', apply_requested_at = $2, updated_at = $2,"
        " keys_version = keys_version + CASE WHEN $3 THEN 1 ELSE 0 END WHERE service_id = $1",
        service_id,
        now,
        changed,
    )
