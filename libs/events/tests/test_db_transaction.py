"""db.transaction_opened_by against the real PostgreSQL: BEGIN sent with the first statement."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from palisade_events import db
from tests.fixtures import settings_for_test


@pytest.fixture
async def conn() -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(settings_for_test().database_url)
    await c.execute("CREATE TEMP TABLE t (k text PRIMARY KEY)")
    try:
        yield c
    finally:
        await c.close()


async def keys(conn: asyncpg.Connection) -> list[str]:
    return [r["k"] for r in await conn.fetch("SELECT k FROM t ORDER BY k")]


async def test_the_block_commits_with_the_first_statement_in_it(conn: asyncpg.Connection) -> None:
    async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('a') ON CONFLICT DO NOTHING") as status:
        assert status == "INSERT 0 1"
        assert conn.is_in_transaction()
        await conn.execute("INSERT INTO t VALUES ($1)", "b")
    assert not conn.is_in_transaction()
    assert await keys(conn) == ["a", "b"]
    # The first statement's status tells a repeat: nothing inserted.
    async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('a') ON CONFLICT DO NOTHING") as status:
        assert status == "INSERT 0 0"


async def test_a_raising_block_rolls_everything_back(conn: asyncpg.Connection) -> None:
    async def failing() -> None:
        async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('a')"):
            await conn.execute("INSERT INTO t VALUES ('b')")
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await failing()
    assert not conn.is_in_transaction()
    assert await keys(conn) == []


async def test_a_failing_first_statement_leaves_no_transaction_open(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO t VALUES ('a')")
    with pytest.raises(asyncpg.UniqueViolationError):
        async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('a')"):
            pytest.fail("the block must not run")
    assert not conn.is_in_transaction()
    assert await keys(conn) == ["a"]


async def test_a_swallowed_error_does_not_pass_for_a_commit(conn: asyncpg.Connection) -> None:
    async def swallowing() -> None:
        async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('a')"):
            with contextlib.suppress(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO t VALUES ('a')")  # aborts the transaction

    with pytest.raises(db.RolledBackError):
        await swallowing()
    assert not conn.is_in_transaction()
    assert await keys(conn) == []


@pytest.mark.parametrize("value", ["plain", "it's", "''", "a\\'b", "--", "$$x$$", "ünï", "a;DROP TABLE t;--"])
async def test_literals_read_back_as_the_string_itself(conn: asyncpg.Connection, value: str) -> None:
    assert await conn.fetchval(f"SELECT {db.sql_literal(value)}::text") == value
    assert await keys(conn) == []  # t is still there, and empty


def test_a_nul_cannot_become_a_literal() -> None:
    with pytest.raises(ValueError, match="NUL"):
        db.sql_literal("a\x00b")
