"""The relay's SQL. Every change of a service's quota ring or violations happens
with its row locked (`FOR UPDATE`) inside the caller's transaction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from palisade_events.db import Connection

from . import domain


@dataclass(frozen=True)
class Service:
    service_id: str
    slug: str
    private_ip: str
    suspended: bool


@dataclass(frozen=True)
class QuotaResult:
    """domain.QuotaDecision without the ring, which stays in the database."""

    granted: bool
    used: int  # entries in the window after the decision
    retry_after_seconds: int | None  # when refused: until enough entries left the window
    warn: bool  # this reservation reached QUOTA_WARN_AT


@dataclass(frozen=True)
class Reservation:
    decision: QuotaResult | None  # None: the service is suspended


async def upsert_service(conn: Connection, service_id: str, slug: str, private_ip: str, now: datetime) -> None:
    # A re-announced service keeps its quota ring, violations and suspension.
    await conn.execute(
        "INSERT INTO services (service_id, slug, private_ip, provisioned_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (service_id) DO UPDATE SET slug = excluded.slug, private_ip = excluded.private_ip,"
        " provisioned_at = excluded.provisioned_at",
        service_id,
        slug,
        private_ip,
        now,
    )


async def delete_service(conn: Connection, service_id: str) -> None:
    await conn.execute("DELETE FROM services WHERE service_id = $1", service_id)


async def service_by_ip(conn: Connection, private_ip: str) -> Service | None:
    """The service that owns the address; if an address was reused before the old
    service's deprovisioning arrived, the newest provisioning wins."""
    row = await conn.fetchrow(
        "SELECT service_id, slug, private_ip, suspended FROM services WHERE private_ip = $1"
        " ORDER BY provisioned_at DESC LIMIT 1",
        private_ip,
    )
    return Service(**dict(row)) if row is not None else None


async def reserve(
    conn: Connection,
    service_id: str,
    count: int,
    now: datetime,
    *,
    limit: int = domain.QUOTA_LIMIT,
    window: timedelta = domain.QUOTA_WINDOW,
) -> Reservation | None:
    """Take `count` slots at `now` for the service, all or none (None: unknown service),
    as domain.reserve decides, in one statement (the reserve_slots function of migration
    002). Its row lock lasts until the statement's transaction ends: the statement's own
    in autocommit, the caller's inside one. Reservations of one service from any number
    of relay processes are serialized either way."""
    if count < 1:
        raise ValueError("a reservation takes at least one slot")
    row = await conn.fetchrow(
        "SELECT known, suspended, granted, used, frees_at, warn FROM reserve_slots($1, $2, $3, $4, $5)",
        service_id,
        count,
        now,
        limit,
        window,
    )
    assert row is not None
    return _reservation(row, now, window)


@dataclass(frozen=True)
class Ask:
    """One session's reservation request."""

    service_id: str
    count: int
    now: datetime


async def reserve_many(
    conn: Connection,
    asks: list[Ask],
    *,
    limit: int = domain.QUOTA_LIMIT,
    window: timedelta = domain.QUOTA_WINDOW,
) -> list[Reservation | None]:
    """`reserve` for each ask, in one statement (reserve_slots_batch, migration 004): every
    ask decided exactly as alone, a service's asks in their order. One commit for all."""
    if any(a.count < 1 for a in asks):
        raise ValueError("a reservation takes at least one slot")
    rows = await conn.fetch(
        "SELECT ord, known, suspended, granted, used, frees_at, warn FROM reserve_slots_batch($1, $2, $3, $4, $5)",
        [a.service_id for a in asks],
        [a.count for a in asks],
        [a.now for a in asks],
        limit,
        window,
    )
    by_ord = {row["ord"]: row for row in rows}
    return [_reservation(by_ord[i], a.now, window) for i, a in enumerate(asks, start=1)]


def _reservation(row: asyncpg.Record, now: datetime, window: timedelta) -> Reservation | None:
    if not row["known"]:
        return None
    if row["suspended"]:
        return Reservation(None)
    retry: int | None = None
    if not row["granted"]:
        frees_at = row["frees_at"]
        wait = window if frees_at is None else frees_at - now
        retry = max(1, math.ceil(wait.total_seconds()))
    return Reservation(QuotaResult(row["granted"], row["used"], retry, row["warn"]))


async def release(conn: Connection, service_id: str, at: datetime, count: int) -> None:
    """Give back `count` slots taken at `at` (the upstream did not take the message).
    Must run inside a transaction, like `reserve`: the row lock keeps two concurrent
    releases (or a release and a reservation) from each writing back the ring they read,
    which lost one of them."""
    row = await conn.fetchrow("SELECT sends FROM services WHERE service_id = $1 FOR UPDATE", service_id)
    if row is None:
        return
    await conn.execute(
        "UPDATE services SET sends = $2 WHERE service_id = $1",
        service_id,
        list(domain.release(row["sends"], at, count)),
    )


async def record_violation(conn: Connection, service_id: str, now: datetime) -> tuple[int, bool]:
    """Count a marketing violation; returns (violations in 24 h, suspended by this one).
    Inside a transaction: the row lock keeps concurrent violations of one service (several
    clients, several relays) from each writing back the list they read, as in `release`."""
    row = await conn.fetchrow("SELECT suspended, violations FROM services WHERE service_id = $1 FOR UPDATE", service_id)
    if row is None:
        return 0, False
    violations, reached = domain.record_violation(row["violations"], now)
    suspend = reached and not row["suspended"]
    await conn.execute(
        "UPDATE services SET violations = $2,"
        " suspended = suspended OR $3, suspended_at = CASE WHEN $3 THEN $4 ELSE suspended_at END"
        " WHERE service_id = $1",
        service_id,
        list(violations),
        suspend,
        now,
    )
    return len(violations), suspend


async def lift_suspension(conn: Connection, service_id: str) -> bool | None:
    """None: unknown service; False: was not suspended; True: lifted (violations forgotten)."""
    row = await conn.fetchrow("SELECT suspended FROM services WHERE service_id = $1 FOR UPDATE", service_id)
    if row is None:
        return None
    if not row["suspended"]:
        return False
    await conn.execute(
        "UPDATE services SET suspended = false, suspended_at = NULL, violations = '{}' WHERE service_id = $1",
        service_id,
    )
    return True


@dataclass(frozen=True)
class Status:
    service: Service
    sends: list[datetime]
    violations: list[datetime]


async def status(conn: Connection, service_id: str) -> Status | None:
    row = await conn.fetchrow(
        "SELECT service_id, slug, private_ip, suspended, sends, violations FROM services WHERE service_id = $1",
        service_id,
    )
    if row is None:
        return None
    return Status(
        Service(row["service_id"], row["slug"], row["private_ip"], row["suspended"]),
        list(row["sends"]),
        list(row["violations"]),
    )


async def top_quota_users(conn: Connection, now: datetime, limit: int) -> list[tuple[str, int]]:
    """The services with the most sends inside the window (for the bounded gauge)."""
    rows = await conn.fetch(
        "SELECT service_id, used FROM ("
        "  SELECT service_id, (SELECT count(*) FROM unnest(sends) AS s WHERE s > $1) AS used"
        "  FROM services WHERE last_send_at > $1"
        ") AS u WHERE used > 0 ORDER BY used DESC, service_id LIMIT $2",
        now - domain.QUOTA_WINDOW,
        limit,
    )
    return [(r["service_id"], r["used"]) for r in rows]
