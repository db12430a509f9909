"""PostgreSQL: the pool, the database created if missing, and numbered migrations."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# What handlers get: a pooled connection inside a transaction (or a plain one).
Connection = asyncpg.Connection | PoolConnectionProxy

log = logging.getLogger("palisade.db")

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def schema_name(worker: str) -> str:
    return "palisade_" + worker.replace("-", "_")


async def ensure_database(url: str) -> None:
    """Create the database named in `url` if it does not exist."""
    parts = urlsplit(url)
    dbname = parts.path.lstrip("/") or "postgres"
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        admin = urlunsplit(parts._replace(path="/postgres"))
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'CREATE DATABASE "{dbname}"')
            log.info("created database %s", dbname)
        except asyncpg.DuplicateDatabaseError:
            pass
        finally:
            await conn.close()
        return
    await conn.close()


async def create_pool(url: str, size: int, schema: str) -> asyncpg.Pool:
    """A pool whose connections see the worker's schema first."""
    pool = await asyncpg.create_pool(
        url,
        min_size=min(2, size),
        max_size=size,
        server_settings={"search_path": f"{schema},public", "application_name": schema},
        # asyncpg still rolls back an unfinished transaction on release; the full session
        # reset (RESET ALL, UNLISTEN, advisory unlock…) would cost a round trip per message,
        # and Palisade keeps no session state: locks are transaction-scoped, SETs are LOCAL.
        reset=_keep_session,
    )
    assert pool is not None
    return pool


async def _keep_session(_: asyncpg.Connection) -> None:
    return None


# A write a handler left for its transaction's end (Context.write_at_commit): SQL and arguments.
Write = tuple[str, tuple[object, ...]]


def runs_of_writes(writes: Sequence[Write]) -> list[tuple[str, list[tuple[object, ...]]]]:
    """The writes in order, each run of consecutive ones with the same SQL as one entry."""
    runs: list[tuple[str, list[tuple[object, ...]]]] = []
    for sql, args in writes:
        if runs and runs[-1][0] == sql:
            runs[-1][1].append(args)
        else:
            runs.append((sql, [args]))
    return runs


async def send_writes(conn: Connection, writes: Sequence[Write]) -> None:
    """Run the writes in order, a run of the same statement in one round trip: asyncpg's
    `executemany` sends every Bind/Execute before a single Sync. Raises what a write raises."""
    for sql, arg_sets in runs_of_writes(writes):
        if len(arg_sets) == 1:
            await conn.execute(sql, *arg_sets[0])
        else:
            await conn.executemany(sql, arg_sets)


class RolledBackError(RuntimeError):
    """COMMIT found the transaction aborted (a statement in it had failed and its error was
    swallowed): PostgreSQL rolled it back instead."""


def sql_literal(value: str) -> str:
    """A string as an SQL literal (standard_conforming_strings, on since PostgreSQL 9.1:
    only the quote needs doubling)."""
    if "\x00" in value:
        raise ValueError("an SQL literal cannot hold a NUL character")
    return "'" + value.replace("'", "''") + "'"


@dataclass
class OpenTransaction:
    """What `transaction_opened_by` yields: the first statement's status, and the statement, if
    any, the block wants sent with the COMMIT (the outbox rows: outbox.insert_statement)."""

    status: str
    closing: str | None = None


@contextlib.asynccontextmanager
async def transaction_opened_by(conn: Connection, first: str) -> AsyncIterator[OpenTransaction]:
    """A transaction whose BEGIN travels with its first statement, and whose COMMIT with its
    last: two round trips fewer than asyncpg's `transaction()`, which sends BEGIN and COMMIT
    alone. The simple query protocol takes several statements but no parameters, so these two
    carry their values as literals (`sql_literal`). Commits when the block ends, rolls back when
    it raises (or when the closing statement fails), and raises `RolledBackError` when COMMIT
    finds the transaction aborted. Not nestable: inside it, `conn.transaction()` refuses."""
    try:
        tx = OpenTransaction(await conn.execute(f"BEGIN; {first}"))
        yield tx
        status = await conn.execute(f"{tx.closing}; COMMIT" if tx.closing else "COMMIT")
    except BaseException:
        if not conn.is_closed() and conn.is_in_transaction():
            # A broken connection fails here too; the pool terminates a closed connection
            # and rolls back one still in a transaction when it comes back.
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        raise
    if status != "COMMIT":
        raise RolledBackError(f"the transaction was rolled back at COMMIT ({status})")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str


def load_migrations(source: Traversable | None, *, prefix: str) -> list[Migration]:
    if source is None:
        return []
    out = []
    for entry in source.iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            out.append(Migration(f"{prefix}{m.group(1)}", entry.name, entry.read_text()))
    return sorted(out, key=lambda m: m.version)


def runtime_migrations() -> list[Migration]:
    return load_migrations(files("palisade_events") / "sql", prefix="runtime-")


async def migrate(conn: asyncpg.Connection, schema: str, migrations: Sequence[Migration]) -> list[str]:
    """Apply the pending migrations into `schema`, each in its own transaction.

    An advisory lock per schema lets replicas start together: one applies, the
    others wait and then find nothing to do.
    """
    applied_now: list[str] = []
    lock_key = f"palisade-migrate:{schema}"
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", lock_key)
    try:
        # CREATE SCHEMA needs CREATE on the database even when the schema exists; a worker's own
        # role (deploy/postgres/roles.sql) owns its schema and has no such right, so ask first.
        if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
            " version text PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')}
        for mig in migrations:
            if mig.version in done:
                continue
            async with conn.transaction():
                await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
                await conn.execute(mig.sql)
                await conn.execute(
                    f'INSERT INTO "{schema}".schema_migrations (version, name) VALUES ($1, $2)',
                    mig.version,
                    mig.name,
                )
            applied_now.append(mig.version)
            log.info("applied migration %s %s into %s", mig.version, mig.name, schema)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
    return applied_now
