"""The firewall worker's SQL. Every function takes the handler's connection (its transaction)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from palisade_events.db import Connection
from palisade_events.vm_apply import ApplyState

from .domain import Rule

# Apply state: pending / applied / failed against the row's version (palisade_events.vm_apply).
APPLY = ApplyState("version", "applied_version")


@dataclass(frozen=True)
class Service:
    service_id: str
    software: str
    ssh_host: str
    ssh_port: int
    host_key: str
    enabled: bool
    version: int
    rules: tuple[Rule, ...]
    apply_state: str
    applied_version: int | None
    applied_checksum: str | None
    applied_at: datetime | None
    last_error: str | None


def _service(row: asyncpg.Record | None) -> Service | None:
    if row is None:
        return None
    return Service(
        row["service_id"],
        row["software"],
        row["ssh_host"],
        row["ssh_port"],
        row["host_key"],
        row["enabled"],
        row["version"],
        tuple(Rule.from_json(r) for r in json.loads(row["rules"])),
        row["apply_state"],
        row["applied_version"],
        row["applied_checksum"],
        row["applied_at"],
        row["last_error"],
    )


def _rules_json(rules: tuple[Rule, ...]) -> str:
    return json.dumps([r.to_json() for r in rules])


async def lock_service(db: Connection, service_id: str) -> Service | None:
    """The service row, locked for this transaction: one service's changes never interleave."""
    return _service(await db.fetchrow("SELECT * FROM services WHERE service_id = $1 FOR UPDATE", service_id))


async def get_service(db: Connection, service_id: str) -> Service | None:
    return _service(await db.fetchrow("SELECT * FROM services WHERE service_id = $1", service_id))


async def insert_service(
    db: Connection,
    service_id: str,
    software: str,
    host: str,
    port: int,
    host_key: str,
    rules: tuple[Rule, ...],
    now: datetime,
) -> None:
    """A new service, enabled with `rules` (its defaults) as version 1."""
    await db.execute(
        "INSERT INTO services (service_id, software, ssh_host, ssh_port, host_key, enabled, version, rules,"
        " apply_requested_at, updated_at) VALUES ($1, $2, $3, $4, $5, true, 1, $6::jsonb, $7, $7)",
        service_id,
        software,
        host,
        port,
        host_key,
        _rules_json(rules),
        now,
    )


async def update_identity(
    db: Connection, service_id: str, software: str, host: str, port: int, host_key: str, now: datetime
) -> None:
    await db.execute(
        "UPDATE services SET software = $2, ssh_host = $3, ssh_port = $4, host_key = $5, updated_at = $6"
        " WHERE service_id = $1",
        service_id,
        software,
        host,
        port,
        host_key,
        now,
    )


async def delete_service(db: Connection, service_id: str) -> None:
    await db.execute("DELETE FROM services WHERE service_id = $1", service_id)
    await db.execute("DELETE FROM tls_domains WHERE service_id = $1", service_id)


async def set_rules(db: Connection, service_id: str, enabled: bool, rules: tuple[Rule, ...], now: datetime) -> int:
    """Record a new rule set (the next version) and mark an apply due; returns the version."""
    version: int = await db.fetchval(
        "UPDATE services SET enabled = $2, rules = $3::jsonb, version = version + 1, apply_state = 'pending',"
        " apply_requested_at = $4, updated_at = $4 WHERE service_id = $1 RETURNING version",
        service_id,
        enabled,
        _rules_json(rules),
        now,
    )
    return version


async def mark_pending(db: Connection, service_id: str, now: datetime) -> None:
    """An apply of the current version is due (re-provisioned VM, reconcile)."""
    await db.execute(
        "UPDATE services SET apply_state = 'pending', apply_requested_at = $2, updated_at = $2 WHERE service_id = $1",
        service_id,
        now,
    )


async def lock_apply(db: Connection, service_id: str) -> None:
    """Applies to one VM happen one at a time across replicas (a transaction-scoped
    advisory lock, so rule changes, which lock the row, never wait for SSH)."""
    await db.execute("SELECT pg_advisory_xact_lock(hashtextextended('firewall.apply:' || $1, 0))", service_id)


async def add_domain(db: Connection, service_id: str, domain: str, now: datetime) -> None:
    await db.execute(
        "INSERT INTO tls_domains (service_id, domain, accepted_at) VALUES ($1, lower($2), $3)"
        " ON CONFLICT (service_id, domain) DO NOTHING",
        service_id,
        domain,
        now,
    )


async def remove_domain(db: Connection, service_id: str, domain: str) -> None:
    await db.execute("DELETE FROM tls_domains WHERE service_id = $1 AND domain = lower($2)", service_id, domain)


async def count_domains(db: Connection, service_id: str) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM tls_domains WHERE service_id = $1", service_id)
    return n
