"""The ratelimit worker's SQL. Every function takes the handler's connection (its transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from palisade_events.db import Connection
from palisade_events.vm_apply import ApplyState

from .domain import DEFAULT_POLICY, OutputCache, RateLimit, WebPolicy

# Apply state: pending / applied / failed against the row's policy_version (palisade_events.vm_apply).
APPLY = ApplyState("policy_version", "applied_version")


@dataclass(frozen=True)
class Service:
    service_id: str
    ssh_host: str
    ssh_port: int
    host_key: str
    has_ipv6: bool
    policy: WebPolicy
    policy_version: int
    apply_state: str
    applied_version: int | None
    applied_checksum: str | None
    last_error: str | None


def _service(row: asyncpg.Record | None) -> Service | None:
    if row is None:
        return None
    return Service(
        service_id=row["service_id"],
        ssh_host=row["ssh_host"],
        ssh_port=row["ssh_port"],
        host_key=row["host_key"],
        has_ipv6=row["has_ipv6"],
        policy=WebPolicy(
            RateLimit(row["rate_requests"], row["rate_per"], row["rate_enabled"]),
            OutputCache(row["cache_ttl_seconds"], row["cache_enabled"]),
        ),
        policy_version=row["policy_version"],
        apply_state=row["apply_state"],
        applied_version=row["applied_version"],
        applied_checksum=row["applied_checksum"],
        last_error=row["last_error"],
    )


async def lock_service(db: Connection, service_id: str) -> Service | None:
    """The service row, locked for this transaction: one service's changes never interleave."""
    return _service(await db.fetchrow("SELECT * FROM services WHERE service_id = $1 FOR UPDATE", service_id))


async def get_service(db: Connection, service_id: str) -> Service | None:
    return _service(await db.fetchrow("SELECT * FROM services WHERE service_id = $1", service_id))


async def upsert_service(
    db: Connection, service_id: str, host: str, port: int, host_key: str, has_ipv6: bool, now: datetime
) -> Service | None:
    """Record a service's SSH identity (a new service gets the default policy); returns
    what was known before."""
    before = await lock_service(db, service_id)
    rate, cache = DEFAULT_POLICY.rate_limit, DEFAULT_POLICY.output_cache
    await db.execute(
        "INSERT INTO services (service_id, ssh_host, ssh_port, host_key, has_ipv6, rate_requests, rate_per,"
        " rate_enabled, cache_ttl_seconds, cache_enabled, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        " ON CONFLICT (service_id) DO UPDATE SET ssh_host = $2, ssh_port = $3, host_key = $4, has_ipv6 = $5,"
        " updated_at = $11",
        service_id,
        host,
        port,
        host_key,
        has_ipv6,
        rate.requests,
        rate.per,
        rate.enabled,
        cache.ttl_seconds,
        cache.enabled,
        now,
    )
    return before


async def delete_service(db: Connection, service_id: str) -> None:
    await db.execute("DELETE FROM services WHERE service_id = $1", service_id)


async def set_policy(db: Connection, service_id: str, policy: WebPolicy, now: datetime) -> int:
    """Record the service's policy (the row is locked); returns its version, bumped when it changed."""
    rate, cache = policy.rate_limit, policy.output_cache
    version: int = await db.fetchval(
        "UPDATE services SET rate_requests = $2, rate_per = $3, rate_enabled = $4, cache_ttl_seconds = $5,"
        " cache_enabled = $6, updated_at = $7,"
        " policy_version = policy_version + CASE WHEN (rate_requests, rate_per, rate_enabled, cache_ttl_seconds,"
        " cache_enabled) IS DISTINCT FROM ($2, $3, $4, $5, $6) THEN 1 ELSE 0 END"
        " WHERE service_id = $1 RETURNING policy_version",
        service_id,
        rate.requests,
        rate.per,
        rate.enabled,
        cache.ttl_seconds,
        cache.enabled,
        now,
    )
    return version


async def lock_apply(db: Connection, service_id: str) -> None:
    """Applies to one VM happen one at a time across replicas (a transaction-scoped
    advisory lock, so policy changes, which lock the row, never wait for SSH)."""
    await db.execute("SELECT pg_advisory_xact_lock(hashtextextended('ratelimit.apply:' || $1, 0))", service_id)


async def mark_pending(db: Connection, service_id: str, now: datetime) -> None:
    await db.execute(
        "UPDATE services SET apply_state = 'pending', apply_requested_at = $2, updated_at = $2 WHERE service_id = $1",
        service_id,
        now,
    )
