"""Transactional outbox: rows written with the handler's effects, published after commit.

The process that committed the rows publishes them at once, from memory, with
confirms (`publish_committed`), and marks them published in bulk a moment later: no
second transaction per message. Rows it could not publish are retried from memory.
A crash loses neither: the relay also polls for rows left unpublished longer than a
grace period (by this or any other process) with `FOR UPDATE SKIP LOCKED`, publishes
and marks them in the same transaction, so two replicas never both publish such a row.
A crash between a publish and its mark publishes the same message id again later;
downstream inboxes make that harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from opentelemetry import context as otel_context

from .amqp import Outgoing, Publisher
from .audit import AuditRecord
from .db import Connection, sql_literal
from .messages import Envelope, encode
from .observability import (
    OUTBOX_OLDEST_SECONDS,
    OUTBOX_PENDING,
    OUTBOX_PUBLISHED,
    extract_context,
    inject_headers,
    tracing_on,
)
from .topology import AUDIT_EXCHANGE

log = logging.getLogger("palisade.outbox")

# All of a transaction's rows in one statement, just before its commit: one round trip
# whatever the number of events and audit records. WITH ORDINALITY keeps the ids in the
# rows' order.
_INSERT_MANY = """
INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, body, headers)
SELECT m, e, r, t, c, b, h
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::bytea[], $7::jsonb[])
     WITH ORDINALITY AS rows (m, e, r, t, c, b, h, n)
ORDER BY n
"""


def mark_published_statement(message_ids: Sequence[uuid.UUID]) -> str:
    """The rows' mark, as one simple query. By message id: rows inserted with their COMMIT
    (insert_statement) have no id the writer learns. Idempotent: the poll may have taken (and
    marked) a row meanwhile.

    A mark need not survive a crash: lost, it only makes its rows be published again, with the
    same message ids, which every consumer's inbox dedupes. So its transaction commits without
    waiting for the WAL flush (synchronous_commit off for it alone; a multi-statement query is
    one transaction): no fdatasync, ~60 us less of the database backend's CPU on this machine."""
    ids = ",".join(str(i) for i in message_ids)  # uuid.UUID renders as hex and dashes only
    return (
        "SET LOCAL synchronous_commit = off;"
        f" UPDATE outbox SET published_at = now() WHERE message_id = ANY('{{{ids}}}'::uuid[]) AND published_at IS NULL"
    )


@dataclass(frozen=True)
class OutboxRow:
    message_id: uuid.UUID
    exchange: str
    routing_key: str
    message_type: str
    correlation_id: uuid.UUID | None
    body: bytes
    headers: str  # JSON: the W3C trace context of the span that produced the row


def envelope_row(env: Envelope[Any]) -> OutboxRow:
    cls = type(env.payload)
    return OutboxRow(
        env.message_id,
        cls.exchange(),
        cls.routing_key(),
        env.type,
        env.correlation_id,
        encode(env),
        json.dumps(inject_headers()),
    )


def audit_row(record: AuditRecord) -> OutboxRow:
    return OutboxRow(
        record.audit_id,
        AUDIT_EXCHANGE,
        record.routing_key(),
        "AuditRecord",
        record.correlation_id,
        record.model_dump_json().encode(),
        json.dumps(inject_headers()),
    )


async def insert_rows(conn: Connection, rows: list[OutboxRow]) -> None:
    if not rows:
        return
    await conn.execute(
        _INSERT_MANY,
        [r.message_id for r in rows],
        [r.exchange for r in rows],
        [r.routing_key for r in rows],
        [r.message_type for r in rows],
        [r.correlation_id for r in rows],
        [r.body for r in rows],
        [r.headers for r in rows],
    )


def insert_statement(rows: list[OutboxRow]) -> str:
    """The rows as one INSERT with literal values, to be sent with the transaction's COMMIT in
    one round trip (db.transaction_opened_by); the VALUES order is the ids' order."""
    return (
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, body, headers)"
        f" VALUES {', '.join(_values(r) for r in rows)}"
    )


def _values(r: OutboxRow) -> str:
    correlation = "NULL" if r.correlation_id is None else f"'{r.correlation_id}'"
    return (
        f"('{r.message_id}', {sql_literal(r.exchange)}, {sql_literal(r.routing_key)}, {sql_literal(r.message_type)},"
        f" {correlation}, '\\x{r.body.hex()}'::bytea, {sql_literal(r.headers)}::jsonb)"
    )


class OutboxRelay:
    """Publishes outbox rows: a committed transaction's own rows at once
    (`publish_committed`), and, polling, rows left unpublished past `grace_seconds`."""

    def __init__(
        self,
        worker: str,
        pool: asyncpg.Pool,
        publisher: Publisher,
        *,
        batch: int = 200,
        poll_seconds: float = 1.0,
        grace_seconds: float = 5.0,
        mark_seconds: float = 0.05,
    ) -> None:
        self._worker = worker
        self._pool = pool
        self._publisher = publisher
        self._batch = batch
        self._poll = poll_seconds
        self._grace = grace_seconds
        self._mark_every = mark_seconds
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._gauges_at = 0.0
        self._next_poll = 0.0  # time.monotonic() of the next poll
        self._to_mark: list[uuid.UUID] = []  # message ids published, not yet marked
        self._mark_due = 0.0  # when the oldest of them must be marked
        self._to_retry: list[OutboxRow] = []  # committed, their publish failed
        self._broker_back = asyncio.Event()  # set on every reconnect: cuts a back-off short

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self._worker}")

    async def stop(self, *, flush: bool = True, timeout: float = 10.0) -> None:
        """Stop the loop; with `flush`, publish what is pending first."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if flush:
            try:
                await asyncio.wait_for(self.drain(), timeout)
            except Exception as exc:  # noqa: BLE001 - the rows stay for the next start
                log.warning("outbox not fully flushed at shutdown: %r", exc)

    async def drain(self) -> None:
        """Publish and mark what this process holds, and what the poll may take. Rows younger
        than the grace stay with the replica that wrote them: taking them here would publish
        a second copy of rows that replica has published and not yet marked."""
        await self._retry()
        await self._mark()
        while await self.publish_batch(grace_seconds=self._grace) > 0:
            pass

    async def publish_committed(self, written: list[OutboxRow]) -> None:
        """Publish a committed transaction's rows now; never raises. What the broker did not
        confirm is retried from memory (and, should this process die, polled after the grace)."""
        if not written:
            return
        results = await self._publish_all(written)
        confirmed = [w.message_id for w, r in zip(written, results, strict=True) if not isinstance(r, BaseException)]
        self._published(confirmed)
        failed = [w for w, r in zip(written, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            error = next(r for r in results if isinstance(r, BaseException))
            log.warning("outbox: %d rows not published (%s); retrying", len(failed), error)
            self._to_retry.extend(failed)
            self._wake.set()

    def broker_back(self) -> None:
        """The connection to the broker was restored (its channels too): retry what waits now
        rather than at the end of the back-off, which grows to 5 s while the broker is away."""
        self._broker_back.set()

    def _published(self, ids: list[uuid.UUID]) -> None:
        if not ids:
            return
        OUTBOX_PUBLISHED.labels(self._worker).inc(len(ids))
        if not self._to_mark:
            # Marks go out in bulk: the first one waits a few milliseconds for company.
            self._mark_due = time.monotonic() + self._mark_every
            self._wake.set()
        self._to_mark.extend(ids)
        if len(self._to_mark) >= self._batch:
            self._mark_due = 0.0
            self._wake.set()

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            self._wake.clear()
            try:
                await self._retry()
                if self._to_mark and time.monotonic() >= self._mark_due:
                    await self._mark()
                if time.monotonic() >= self._next_poll:
                    n = await self.publish_batch(grace_seconds=self._grace)
                    # A full batch: more may be waiting.
                    self._next_poll = 0.0 if n >= self._batch else time.monotonic() + self._poll
                    if n == 0 and time.monotonic() - self._gauges_at > 1.0:
                        await self._refresh_gauges()
                        self._gauges_at = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the relay must outlive whatever a restart throws
                # Not only PublishError, OSError and asyncpg's Postgres/Interface errors: right
                # after a PostgreSQL restart a pooled connection can fail with asyncpg's
                # InternalClientError ("another operation is in progress"), which once ended
                # this loop for good and left the outbox unpublished (a full-suite CI run).
                log.warning("outbox relay: %r; retrying in %.1fs", exc, backoff)
                # Not the general wake-up: new rows keep coming while the broker is down, and
                # each would start a retry at once. A reconnect may have come before this wait
                # (then one retry goes at once, and the next failure waits in full).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._broker_back.wait(), backoff)
                self._broker_back.clear()
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if self._to_retry:
                continue
            wake_at = min(self._next_poll, self._mark_due) if self._to_mark else self._next_poll
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - time.monotonic()))

    async def _retry(self) -> None:
        if not self._to_retry:
            return
        rows, self._to_retry = self._to_retry, []
        for i, w in enumerate(rows):
            try:
                await self._publish(w)
            except BaseException:
                self._to_retry[:0] = rows[i:]
                raise
            self._published([w.message_id])

    async def _mark(self) -> None:
        if not self._to_mark:
            return
        ids, self._to_mark = self._to_mark, []
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(mark_published_statement(ids))
        except BaseException:
            self._to_mark[:0] = ids
            raise

    async def publish_batch(self, *, grace_seconds: float) -> int:
        """Publish and mark, in one transaction, unpublished rows older than `grace_seconds`."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, message_id, exchange, routing_key, message_type, correlation_id, body, headers"
                " FROM outbox WHERE published_at IS NULL"
                " AND created_at < clock_timestamp() - make_interval(secs => $2::float8)"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch,
                grace_seconds,
            )
            if not rows:
                return 0
            # One write and one round trip of confirms for the batch.
            errors = [e for e in await self._publish_all([_row_of(r) for r in rows]) if e is not None]
            if errors:
                raise errors[0]  # rolled back: the rows stay for the next poll
            await conn.execute(mark_published_statement([r["message_id"] for r in rows]))
        OUTBOX_PUBLISHED.labels(self._worker).inc(len(rows))
        return len(rows)

    async def _publish_all(self, rows: Sequence[OutboxRow]) -> list[BaseException | None]:
        """Each row's outcome: None, or why the broker did not take it. With tracing on each row
        is published in its own trace's context, so its producer span joins the trace that wrote
        it (a batch's rows belong to several); otherwise all of them go in one write."""
        if tracing_on():
            return await asyncio.gather(*(self._publish(w) for w in rows), return_exceptions=True)
        return list(await self._publisher.publish_many([_outgoing(w) for w in rows]))

    async def _publish(self, row: OutboxRow) -> None:
        out = _outgoing(row)
        # The row's trace is made current for the publish span alone; without a tracer provider
        # there is none, and the stored headers carry the trace on by themselves.
        token = otel_context.attach(extract_context(out.headers)) if tracing_on() else None
        try:
            await self._publisher.publish_raw(
                out.exchange,
                out.routing_key,
                out.body,
                message_id=out.message_id,
                message_type=out.message_type,
                correlation_id=out.correlation_id,
                headers=out.headers,
            )
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _refresh_gauges(self) -> None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, extract(epoch FROM now() - min(created_at)) AS age"
                " FROM outbox WHERE published_at IS NULL"
            )
        assert row is not None
        OUTBOX_PENDING.labels(self._worker).set(row["n"])
        OUTBOX_OLDEST_SECONDS.labels(self._worker).set(float(row["age"] or 0))


def _outgoing(row: OutboxRow) -> Outgoing:
    """What the broker gets of a row, for `publish_many` and, one at a time, `publish_raw`."""
    return Outgoing(
        row.exchange,
        row.routing_key,
        row.body,
        str(row.message_id),
        row.message_type,
        str(row.correlation_id) if row.correlation_id else None,
        {} if row.headers == "{}" else json.loads(row.headers),  # mostly "{}": tracing off, no caller trace
    )


def _row_of(record: asyncpg.Record) -> OutboxRow:
    headers = record["headers"]
    return OutboxRow(
        record["message_id"],
        record["exchange"],
        record["routing_key"],
        record["message_type"],
        record["correlation_id"],
        bytes(record["body"]),
        headers if isinstance(headers, str) else json.dumps(headers),
    )
