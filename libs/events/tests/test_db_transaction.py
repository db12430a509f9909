"""db.transaction_opened_by, outbox.insert_statement and outbox.mark_published_statement against
the real PostgreSQL: BEGIN sent with the first statement, COMMIT with the last, values as
literals, a mark that commits without the WAL flush and leaves the session as it was."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from palisade_events import db, outbox
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
    async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('a') ON CONFLICT DO NOTHING") as tx:
        assert tx.status == "INSERT 0 1"
        assert conn.is_in_transaction()
        await conn.execute("INSERT INTO t VALUES ($1)", "b")
        tx.closing = "INSERT INTO t VALUES ('c')"  # travels with the COMMIT
    assert not conn.is_in_transaction()
    assert await keys(conn) == ["a", "b", "c"]
    # The first statement's status tells a repeat: nothing inserted.
    async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('a') ON CONFLICT DO NOTHING") as tx:
        assert tx.status == "INSERT 0 0"


async def test_a_failing_closing_statement_rolls_everything_back(conn: asyncpg.Connection) -> None:
    async def closing_fails() -> None:
        async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('a')") as tx:
            tx.closing = "INSERT INTO t VALUES ('a')"  # a duplicate key

    with pytest.raises(asyncpg.UniqueViolationError):
        await closing_fails()
    assert not conn.is_in_transaction()
    assert await keys(conn) == []


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


async def test_outbox_rows_read_back_exactly_from_their_literals(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "CREATE TEMP TABLE outbox (id bigserial PRIMARY KEY, message_id uuid NOT NULL, exchange text NOT NULL,"
        " routing_key text NOT NULL, message_type text NOT NULL, correlation_id uuid, body bytea NOT NULL,"
        " headers jsonb NOT NULL)"
    )
    awkward_body = b'{"a": "x\'\\\\"}\x00\xff'  # quotes, backslashes, a NUL, a non-UTF-8 byte
    rows = [
        outbox.OutboxRow(uuid.uuid4(), "palisade.events", "w.It's", "It's", None, awkward_body, "{}"),
        outbox.OutboxRow(uuid.uuid4(), "ex", "r.k", "T", uuid.uuid4(), bytes(range(256)), '{"tp": "it\'s"}'),
    ]
    await conn.execute(outbox.insert_statement(rows))
    got = await conn.fetch(
        "SELECT message_id, exchange, routing_key, message_type, correlation_id, body, headers::text FROM outbox"
        " ORDER BY id"
    )
    assert [tuple(g) for g in got] == [
        (r.message_id, r.exchange, r.routing_key, r.message_type, r.correlation_id, r.body, r.headers) for r in rows
    ]


async def test_a_mark_marks_its_rows_alone_and_leaves_commits_durable(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "CREATE TEMP TABLE outbox (id bigserial PRIMARY KEY, message_id uuid NOT NULL, published_at timestamptz)"
    )
    ids = [uuid.uuid4() for _ in range(4)]
    await conn.executemany("INSERT INTO outbox (message_id) VALUES ($1)", [(i,) for i in ids])
    await conn.execute("UPDATE outbox SET published_at = '2000-01-01' WHERE message_id = $1", ids[0])

    await conn.execute(outbox.mark_published_statement(ids[:3]))

    marked = {r["message_id"]: r["published_at"] for r in await conn.fetch("SELECT * FROM outbox")}
    assert marked[ids[0]].year == 2000  # a row marked before keeps its mark
    assert marked[ids[1]] is not None
    assert marked[ids[2]] is not None
    assert marked[ids[3]] is None
    # synchronous_commit was off for the mark's own transaction only: what the pooled
    # connection commits next (a handler's effects) still waits for the WAL flush.
    assert await conn.fetchval("SHOW synchronous_commit") == "on"
    assert not conn.is_in_transaction()


def test_writes_run_in_order_and_only_neighbours_with_the_same_sql_share_a_run() -> None:
    a, b = "INSERT INTO t VALUES ($1)", "DELETE FROM t WHERE k = $1"
    writes: list[db.Write] = [(a, ("1",)), (a, ("2",)), (b, ("1",)), (a, ("3",)), (a, ("1",))]
    assert db.runs_of_writes(writes) == [(a, [("1",), ("2",)]), (b, [("1",)]), (a, [("3",), ("1",)])]
    assert db.runs_of_writes([]) == []


class Recording:
    """The connection, with a note of each call `send_writes` made on it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.calls: list[tuple[str, int]] = []

    async def execute(self, sql: str, *args: object) -> str:
        self.calls.append(("execute", 1))
        return await self.conn.execute(sql, *args)

    async def executemany(self, sql: str, args: list[tuple[object, ...]]) -> None:
        self.calls.append(("executemany", len(args)))
        await self.conn.executemany(sql, args)


async def test_a_run_of_writes_is_one_executemany_and_the_order_holds(conn: asyncpg.Connection) -> None:
    ins, dele = "INSERT INTO t VALUES ($1)", "DELETE FROM t WHERE k = $1"
    recording = Recording(conn)
    async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('x')"):
        # Deleting 'a' only works after it was inserted, and inserting it again after that:
        # any other order leaves a different table (or fails on the key).
        await db.send_writes(recording, [(ins, ("a",)), (ins, ("b",)), (dele, ("a",)), (ins, ("a",)), (ins, ("c",))])  # type: ignore[arg-type]
    assert await keys(conn) == ["a", "b", "c", "x"]
    assert recording.calls == [("executemany", 2), ("execute", 1), ("executemany", 2)]


async def test_a_failing_write_raises_and_its_transaction_rolls_back(conn: asyncpg.Connection) -> None:
    async def duplicate() -> None:
        async with db.transaction_opened_by(conn, "INSERT INTO t VALUES ('x')"):
            await db.send_writes(conn, [("INSERT INTO t VALUES ($1)", ("a",)), ("INSERT INTO t VALUES ($1)", ("a",))])

    with pytest.raises(asyncpg.UniqueViolationError):
        await duplicate()
    assert not conn.is_in_transaction()
    assert await keys(conn) == []
