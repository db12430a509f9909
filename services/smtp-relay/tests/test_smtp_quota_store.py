"""The quota store on the real PostgreSQL, driven with explicit times."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import asyncpg
import pytest

from palisade_events import db
from palisade_smtp_relay import domain, store
from tests.fixtures import DATABASE_URL, unique

T = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    """The relay's migrations in a schema of this test's own."""
    schema = unique("smtp_quota_test").replace("-", "_")
    await db.ensure_database(DATABASE_URL)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await db.migrate(conn, schema, db.load_migrations(files("palisade_smtp_relay") / "migrations", prefix=""))
    finally:
        await conn.close()
    p = await db.create_pool(DATABASE_URL, 10, schema)
    try:
        yield p
    finally:
        async with p.acquire() as c:
            await c.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await p.close()


async def service(pool: asyncpg.Pool, ip: str = "10.0.0.5") -> str:
    sid = unique("svc")
    async with pool.acquire() as conn:
        await store.upsert_service(conn, sid, "app", ip, T)
    return sid


async def reserve(pool: asyncpg.Pool, sid: str, at: datetime, count: int = 1) -> store.Reservation:
    async with pool.acquire() as conn, conn.transaction():
        found = await store.reserve(conn, sid, count, at)
    assert found is not None
    return found


async def test_300_at_t_the_301st_refused_one_slot_back_3600_s_after_the_first(pool: asyncpg.Pool) -> None:
    sid = await service(pool)
    first = await reserve(pool, sid, T)
    assert first.decision is not None
    assert first.decision.granted
    for _ in range(299):
        r = await reserve(pool, sid, T + timedelta(seconds=30))
        assert r.decision is not None
        assert r.decision.granted
    refused = await reserve(pool, sid, T + timedelta(seconds=60))
    assert refused.decision is not None
    assert (refused.decision.granted, refused.decision.retry_after_seconds) == (False, 3540)
    almost = await reserve(pool, sid, T + timedelta(seconds=3599, microseconds=999_999))
    assert almost.decision is not None
    assert not almost.decision.granted
    back = await reserve(pool, sid, T + timedelta(seconds=3600))
    assert back.decision is not None
    assert back.decision.granted
    again = await reserve(pool, sid, T + timedelta(seconds=3600))
    assert again.decision is not None
    assert (again.decision.granted, again.decision.retry_after_seconds) == (False, 30)


async def test_the_database_decides_every_reservation_as_domain_reserve_does(pool: asyncpg.Pool) -> None:
    """reserve_slots (one statement) against domain.reserve (the specification), on rings
    with expired entries, entries from a clock ahead of ours, ties and overfull rings, with
    a small limit so that every branch is taken often. Seeded: the same cases every run."""
    rng = random.Random(20261204)
    sid = await service(pool)
    limit, window = 5, timedelta(seconds=60)
    seen: set[tuple[bool, bool]] = set()
    async with pool.acquire() as conn:
        for case in range(400):
            now = T + timedelta(milliseconds=rng.randint(0, 10_000_000))
            offsets = [rng.choice([0, 60_000, rng.randint(-3_000, 90_000)]) for _ in range(rng.randint(0, 8))]
            ring = sorted(now - timedelta(milliseconds=o) for o in offsets)
            count = rng.randint(1, 7)
            await conn.execute("UPDATE services SET sends = $2 WHERE service_id = $1", sid, ring)
            expected = domain.reserve(ring, now, count, limit=limit, window=window)
            got = await store.reserve(conn, sid, count, now, limit=limit, window=window)
            assert got is not None
            assert got.decision is not None
            decided = (got.decision.granted, got.decision.used, got.decision.retry_after_seconds, got.decision.warn)
            wanted = (expected.granted, expected.used, expected.retry_after_seconds, expected.warn)
            assert decided == wanted, (case, ring, now, count)
            stored = await conn.fetchval("SELECT sends FROM services WHERE service_id = $1", sid)
            assert stored == (list(expected.sends) if expected.granted else ring), (case, ring, now, count)
            seen.add((expected.granted, expected.warn))
    assert seen == {(True, True), (True, False), (False, False)}, "a branch was never taken"


async def test_release_gives_the_slots_back_and_other_services_are_independent(pool: asyncpg.Pool) -> None:
    a, b = await service(pool), await service(pool, "10.0.0.6")
    assert (await reserve(pool, a, T, 300)).decision.granted  # type: ignore[union-attr]
    assert (await reserve(pool, b, T, 300)).decision.granted  # type: ignore[union-attr]
    async with pool.acquire() as conn, conn.transaction():
        await store.release(conn, a, T, 50)
    assert (await reserve(pool, a, T, 50)).decision.granted  # type: ignore[union-attr]
    assert not (await reserve(pool, a, T, 1)).decision.granted  # type: ignore[union-attr]
    async with pool.acquire() as conn:
        assert await store.top_quota_users(conn, T, 10) == sorted([(a, 300), (b, 300)])
        assert await store.top_quota_users(conn, T + timedelta(hours=1), 10) == []


async def test_concurrent_reservations_on_many_connections_grant_exactly_300(pool: asyncpg.Pool) -> None:
    sid = await service(pool)

    async def one(i: int) -> bool:
        r = await reserve(pool, sid, T + timedelta(microseconds=i))
        assert r.decision is not None
        return r.decision.granted

    results = await asyncio.gather(*(one(i) for i in range(400)))  # ten connections at a time
    async with pool.acquire() as conn:
        found = await store.status(conn, sid)
    assert found is not None
    assert sum(results) == len(found.sends) == 300


async def test_a_suspended_or_unknown_service_reserves_nothing(pool: asyncpg.Pool) -> None:
    sid = await service(pool)
    async with pool.acquire() as conn, conn.transaction():
        for i in range(5):
            count, suspended = await store.record_violation(conn, sid, T + timedelta(minutes=i))
        assert (count, suspended) == (5, True)
        assert await store.record_violation(conn, sid, T + timedelta(minutes=6)) == (5, False)  # already suspended
    assert (await reserve(pool, sid, T)).decision is None
    async with pool.acquire() as conn, conn.transaction():
        assert await store.reserve(conn, "svc-nobody", 1, T) is None
        assert await store.lift_suspension(conn, sid) is True
        assert await store.lift_suspension(conn, sid) is False
    assert (await reserve(pool, sid, T)).decision is not None


async def test_concurrent_violations_are_all_counted_and_suspend_once(pool: asyncpg.Pool) -> None:
    sid = await service(pool)

    async def one(i: int) -> tuple[int, bool]:
        async with pool.acquire() as conn, conn.transaction():
            return await store.record_violation(conn, sid, T + timedelta(seconds=i))

    # Five at once on five connections: without the row lock, each wrote back the list it read.
    results = await asyncio.gather(*(one(i) for i in range(5)))
    assert sorted(count for count, _ in results) == [1, 2, 3, 4, 5]
    assert [suspended for _, suspended in results].count(True) == 1
    assert (await reserve(pool, sid, T)).decision is None


async def test_a_batch_decides_every_ask_exactly_as_one_at_a_time(pool: asyncpg.Pool) -> None:
    """reserve_many (one statement for many sessions' asks) against store.reserve called ask by
    ask, on twin services with the same rings: same decisions, same rings after. Asks repeat
    services (their order must hold), and include an unknown and a suspended service."""
    rng = random.Random(20261205)
    limit, window = 5, timedelta(seconds=60)
    twins = [(await service(pool), await service(pool)) for _ in range(4)]
    suspended = (await service(pool), await service(pool))
    async with pool.acquire() as conn:
        await conn.execute("UPDATE services SET suspended = true WHERE service_id = ANY($1)", list(suspended))
        for case in range(100):
            now = T + timedelta(milliseconds=rng.randint(0, 10_000_000))
            for pair in twins:
                ring = sorted(
                    now - timedelta(milliseconds=rng.randint(-3_000, 90_000)) for _ in range(rng.randint(0, 6))
                )
                await conn.execute("UPDATE services SET sends = $2 WHERE service_id = ANY($1)", list(pair), ring)
            picks = [rng.choice([*twins, suspended, ("svc-unknown", "svc-unknown")]) for _ in range(rng.randint(2, 9))]
            asks = [(pair, rng.randint(1, 4), now + timedelta(milliseconds=i)) for i, pair in enumerate(picks)]
            together = await store.reserve_many(
                conn, [store.Ask(pair[0], n, at) for pair, n, at in asks], limit=limit, window=window
            )
            alone = [await store.reserve(conn, pair[1], n, at, limit=limit, window=window) for pair, n, at in asks]
            assert together == alone, (case, asks)
            for a, b in twins:
                rings = await conn.fetch("SELECT sends FROM services WHERE service_id = ANY($1)", [a, b])
                assert rings[0]["sends"] == rings[1]["sends"], case


async def test_a_full_ring_is_stored_uncompressed(pool: asyncpg.Pool) -> None:
    # A compressed ring costs PostgreSQL a decompression and a compression per reservation
    # (migration 005): the ring of a service at its quota is written as plain 8-byte entries.
    sid = await service(pool)
    for i in range(domain.QUOTA_LIMIT):
        await reserve(pool, sid, T + timedelta(milliseconds=i))
    async with pool.acquire() as conn:
        stored, entries = await conn.fetchrow(
            "SELECT pg_column_size(sends), cardinality(sends) FROM services WHERE service_id = $1", sid
        )
    assert entries == domain.QUOTA_LIMIT
    assert stored >= 8 * domain.QUOTA_LIMIT  # compressed, these near-identical times took ~1 KB
