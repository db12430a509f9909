"""The worker runtime: one consumer loop, one transaction per message, the outbox
relay, the retry ladder and the parking queue, shared by every Palisade worker.

A worker is a `WorkerSpec`: its name, its handler table, its migrations, and a
`bootstrap` that builds the dependencies its handlers need. `WorkerRuntime`
runs a spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources.abc import Traversable
from typing import Any, Generic, TypeVar

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import db, outbox, topology
from .acks import ACK_TIMEOUT_SECONDS, Acker
from .amqp import Publisher, PublishError, connect
from .audit import AuditRecord, Outcome
from .clock import Clock
from .contract import METRICS_PORTS
from .db import Write as PendingWrite  # `db` inside Context.__init__ is its connection
from .errors import PermanentError, Rejected
from .group_commit import GroupCommit
from .messages import (
    SYSTEM,
    Actor,
    DecodeError,
    Envelope,
    Payload,
    Query,
    QueryRejected,
    Reply,
    decode,
    encode,
    new_envelope,
)
from .observability import (
    DEAD_LETTERS,
    GROUP_COMMIT_MESSAGES,
    HANDLER_SECONDS,
    MESSAGES,
    UP,
    HealthServer,
    configure_tracing,
    extract_context,
    messaging_attributes,
)
from .observability import span as start_span
from .settings import RuntimeSettings

log = logging.getLogger("palisade.runtime")

D = TypeVar("D")
P = TypeVar("P", bound=Payload)


class Context(Generic[D]):
    """What a handler gets besides its payload: the envelope, the transaction's
    connection, the clock, the worker's dependencies, and `emit`."""

    def __init__(
        self,
        *,
        worker: str,
        db: db.Connection,
        clock: Clock,
        deps: D,
        envelope: Envelope[Any] | None,
    ) -> None:
        self.worker = worker
        self.db = db
        self.clock = clock
        self.deps = deps
        self.envelope = envelope
        self.emitted: list[Envelope[Any]] = []
        self.audit_detail: dict[str, str | int | bool | None] = {}
        self._audits: list[AuditRecord] = []
        self._pending_rows: list[outbox.OutboxRow] = []
        self._written: list[outbox.OutboxRow] = []
        self._after_commit: list[Callable[[], None]] = []
        self._writes: list[PendingWrite] = []

    async def _flush_outbox(self) -> None:
        """Write the transaction's events and audit records (called just before commit)."""
        rows, self._pending_rows = self._pending_rows, []
        await outbox.insert_rows(self.db, rows)
        self._written.extend(rows)

    def _close_with_outbox(self, tx: db.OpenTransaction) -> None:
        """Have the transaction's events and audit records sent with its COMMIT."""
        rows, self._pending_rows = self._pending_rows, []
        if rows:
            tx.closing = outbox.insert_statement(rows)
        self._written.extend(rows)

    def write_at_commit(self, sql: str, *args: object) -> None:
        """A write the handler needs no answer from, sent when the handler has returned, just
        before the transaction's outbox rows and COMMIT, in the order written: no round trip of
        its own while the handler runs. Under group commit the batch's writes go together, a
        run of the same statement in one round trip, so a state-row update costs a batch one
        round trip instead of one per message. What the handler (or, in a batch, a later
        message's handler) reads does not see it yet: for a write nothing after it in the batch
        reads. Should it fail, the message fails as if the handler had raised."""
        self._writes.append((sql, args))

    async def _send_writes(self) -> None:
        writes, self._writes = self._writes, []
        await db.send_writes(self.db, writes)

    def _take_written(self) -> list[outbox.OutboxRow]:
        """The outbox rows of the committed transaction, for the relay to publish at once."""
        written, self._written = self._written, []
        return written

    def _forget_writes(self) -> None:
        """The transaction rolled back: what it emitted never happened (after-commit callbacks stay)."""
        self.emitted.clear()
        self._audits.clear()
        self._writes.clear()
        self._pending_rows.clear()
        self._written.clear()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the transaction committed (metrics, wake-ups); it is
        kept when the handler rejects, dropped when the message fails."""
        self._after_commit.append(callback)

    def _run_after_commit(self) -> None:
        for cb in self._after_commit:
            try:
                cb()
            except Exception:
                log.exception("after-commit callback failed")

    @property
    def service_id(self) -> str | None:
        return self.envelope.service_id if self.envelope else None

    @property
    def account_id(self) -> str | None:
        return self.envelope.account_id if self.envelope else None

    def now(self) -> datetime:
        return self.clock.now()

    async def emit(
        self,
        event: Payload,
        *,
        service_id: str | None = None,
        account_id: str | None = None,
    ) -> Envelope[Any]:
        """Write an event (or a command to another worker) to the outbox, caused by
        the message being handled."""
        env = self.envelope
        out = new_envelope(
            event,
            actor=Actor(kind="system", id=self.worker),
            service_id=service_id if service_id is not None else (env.service_id if env else None),
            account_id=account_id if account_id is not None else (env.account_id if env else None),
            correlation_id=env.correlation_id if env else None,
            causation_id=env.message_id if env else None,
            occurred_at=self.clock.now(),
        )
        self._pending_rows.append(outbox.envelope_row(out))
        self.emitted.append(out)
        return out

    async def audit(
        self,
        action: str,
        outcome: Outcome,
        reason: str | None = None,
        *,
        service_id: str | None = None,
        account_id: str | None = None,
        detail: Mapping[str, str | int | bool | None] | None = None,
    ) -> None:
        """An explicit audit record (scheduled actions, extra decisions)."""
        env = self.envelope
        record = AuditRecord(
            audit_id=uuid.uuid4(),
            occurred_at=self.clock.now(),
            worker=self.worker,
            action=action,
            outcome=outcome,
            reason=reason,
            message_id=env.message_id if env else None,
            correlation_id=env.correlation_id if env else None,
            actor=env.actor if env else Actor(kind="system", id=self.worker),
            service_id=service_id if service_id is not None else (env.service_id if env else None),
            account_id=account_id if account_id is not None else (env.account_id if env else None),
            detail=dict(detail or {}),
        )
        self._pending_rows.append(outbox.audit_row(record))
        self._audits.append(record)


Handler = Callable[[Any, Context[Any]], Awaitable[Reply | None]]
# A message for group commit: its handler, its envelope, the trace context it is handled in.
_GroupItem = tuple[Handler, Envelope[Any], otel_context.Context]
# What group commit gives back for it: the outcome, the reply, and the publishing of its batch's
# events and audit records (done when the broker confirmed them, or when they were left to retry).
_GroupResult = tuple[str, Reply | None, asyncio.Future[None]]


def _inbox_insert(envs: Sequence[Envelope[Any]]) -> str:
    """The inbox rows of messages about to be handled, as the statement that opens their
    transaction (db.transaction_opened_by): its status counts the new ones, a redelivery
    inserts nothing. Values as literals: a validated UUID and a type name of the registry."""
    rows = ", ".join(f"('{env.message_id}', {db.sql_literal(env.type)})" for env in envs)
    return f"INSERT INTO inbox (message_id, type) VALUES {rows} ON CONFLICT (message_id) DO NOTHING"


class _RedeliveryInBatchError(Exception):
    """A message of a group was handled before (or came twice): the group rolls back and each
    message is handled alone, which tells the redelivery from the rest."""


@dataclass(frozen=True)
class Job:
    """A periodic task (scheduler tick, renewal scan). `run` returns how much it did;
    a non-zero result runs it again at once."""

    name: str
    every_seconds: float
    run: Callable[[WorkerRuntime[Any]], Awaitable[int]]


@dataclass
class WorkerSpec(Generic[D]):
    name: str
    handlers: Mapping[type[Payload], Handler]
    migrations: Traversable | None = None
    bootstrap: Callable[[WorkerRuntime[D]], AbstractAsyncContextManager[D]] | None = None
    jobs: Sequence[Job] = ()
    # Extra servers/loops the worker runs beside the consumer (e.g. the SMTP listener).
    services: Sequence[Callable[[WorkerRuntime[D]], AbstractAsyncContextManager[None]]] = ()
    # What orders messages within a process: by default the service, else the account.
    order_key: Callable[[Envelope[Any]], str | None] = field(default=lambda env: env.service_id or env.account_id)
    # The handlers only touch the worker's database (no VM, no network, nothing outside the
    # transaction): messages that arrive together may then be committed together (group_commit).
    group_commit: bool = False

    def __post_init__(self) -> None:
        for cls in self.handlers:
            if cls.kind in ("command", "query") and cls.owner != self.name:
                raise ValueError(f"{self.name} cannot handle {cls.routing_key()}: commands have one owner")

    def bindings(self) -> list[topology.Binding]:
        out = []
        for cls in self.handlers:
            ex = topology.COMMANDS_EXCHANGE if cls.kind in ("command", "query") else topology.EVENTS_EXCHANGE
            out.append(topology.Binding(ex, cls.routing_key()))
        return out

    def types(self) -> dict[str, type[Payload]]:
        return {cls.type_name(): cls for cls in self.handlers}


class _Serializer:
    """Runs work for one key in arrival order; different keys run concurrently."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    def enter(self, key: str | None) -> tuple[asyncio.Future[None] | None, asyncio.Future[None] | None]:
        if key is None:
            return None, None
        prev = self._tails.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        return prev, mine

    def leave(self, key: str | None, mine: asyncio.Future[None] | None) -> None:
        if key is None or mine is None:
            return
        if not mine.done():
            mine.set_result(None)
        if self._tails.get(key) is mine:
            del self._tails[key]


class WorkerRuntime(Generic[D]):
    def __init__(
        self,
        spec: WorkerSpec[D],
        settings: RuntimeSettings | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.settings = settings or RuntimeSettings()
        self.clock: Clock = clock or self.settings.clock()
        self.schema = db.schema_name(spec.name)
        self._types = spec.types()
        self._serializer = _Serializer()
        self._acks = Acker()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._inflight_count = 0
        self._group: GroupCommit[_GroupItem, _GroupResult] | None = None
        # The publishing of the last committed batch and of the one before it (_commit_group).
        self._batch_publishing: asyncio.Future[None] | None = None
        self._previous_batch_publishing: asyncio.Future[None] | None = None
        self._drained = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._job_tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.pool: asyncpg.Pool
        self.publisher: Publisher
        self.relay: outbox.OutboxRelay
        self.deps: D
        self.health: HealthServer | None = None
        self.metrics_port: int | None = None
        self.handled = 0  # messages this process committed (tests compare replicas with it)

    # ---------------------------------------------------------------- lifecycle

    async def migrate(self) -> list[str]:
        await db.ensure_database(self.settings.database_url)
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            migrations = db.runtime_migrations() + db.load_migrations(self.spec.migrations, prefix="")
            return await db.migrate(conn, self.schema, migrations)
        finally:
            await conn.close()

    async def declare(self, channel: aio_pika.abc.AbstractChannel) -> AbstractQueue:
        # Only what is missing: under its least-privilege user (deploy/rabbitmq) a worker may not
        # configure the shared exchanges and logs, which the operator declared.
        shared = self._connection is None or not await topology.shared_topology_declared(self._connection)
        return await topology.declare_worker(
            channel, self.name, self.spec.bindings(), self.settings.retry_delays, declare_shared=shared
        )

    async def start(self, *, consume: bool = True) -> None:
        try:
            await self._start(consume)
        except BaseException:
            # Whatever was opened before the failure (pool, connection, servers) is closed.
            self._stopping = True
            for t in self._job_tasks:
                t.cancel()
            await self._stack.aclose()
            raise

    async def _start(self, consume: bool) -> None:
        configure_tracing(self.settings, f"palisade-{self.name}")
        await self.migrate()
        self.pool = await db.create_pool(self.settings.database_url, self.settings.db_pool_size, self.schema)
        self._stack.push_async_callback(self.pool.close)
        self._connection = await connect(self.settings.amqp_url)
        self._stack.push_async_callback(self._connection.close)
        self.publisher = await Publisher.open(self._connection)
        self.relay = outbox.OutboxRelay(
            self.name,
            self.pool,
            self.publisher,
            batch=self.settings.outbox_batch,
            poll_seconds=self.settings.outbox_poll_seconds,
            grace_seconds=self.settings.outbox_grace_seconds,
        )
        self._connection.reconnect_callbacks.add(lambda *_: self.relay.broker_back())
        if self.spec.bootstrap is not None:
            self.deps = await self._stack.enter_async_context(self.spec.bootstrap(self))
        else:
            self.deps = None  # type: ignore[assignment]
        self.relay.start()
        self._stack.push_async_callback(self.relay.stop)
        if self.spec.group_commit:
            # Runs after the group stopped, before the relay stops: its batches' publishing ends.
            self._stack.push_async_callback(self._batches_published)
            self._group = GroupCommit(
                self._commit_group, max_batch=self.settings.prefetch, pace=self._one_batch_publishing
            )
            self._group.start()
            self._stack.push_async_callback(self._group.stop)
        for svc in self.spec.services:
            await self._stack.enter_async_context(svc(self))
        port = self.settings.metrics_port
        if port is None:
            port = METRICS_PORTS.get(self.name, 0)
        self.health = HealthServer(self.settings.metrics_host, port, self.ready)
        await self.health.start()
        self.metrics_port = self.health.port
        self._stack.push_async_callback(self.health.stop)
        # The work queue's consumer has this channel to itself: a `multiple` ack (acks.py) covers
        # every delivery of its channel, and must never reach another consumer's.
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._queue = await self.declare(channel)
        for job in (*self.spec.jobs, _MAINTENANCE):
            self._job_tasks.append(asyncio.create_task(self._job_loop(job), name=f"job-{job.name}"))
        if consume:
            await self.resume()
        UP.labels(self.name).set(1)
        log.info("%s ready (queue %s)", self.name, topology.work_queue(self.name))

    async def resume(self) -> None:
        assert self._queue is not None
        if self._consumer_tag is None:
            self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)

    async def pause(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._consumer_tag)
            self._consumer_tag = None

    async def stop(self) -> None:
        """Graceful: stop consuming, finish in-flight messages, flush the outbox, close."""
        if self._stopping:
            return
        self._stopping = True
        UP.labels(self.name).set(0)
        await self.pause()
        for t in self._job_tasks:
            t.cancel()
        await asyncio.gather(*self._job_tasks, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=self.settings.shutdown_grace_seconds)
            for t in pending:
                t.cancel()
        await self._acks.drain()
        await self._stack.aclose()
        log.info("%s stopped", self.name)

    async def ready(self) -> bool:
        if self._stopping or self._connection is None or self._connection.is_closed:
            return False
        try:
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1")
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False
        return True

    async def run_forever(self) -> None:
        """Start, then run until SIGTERM/SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        freeze_startup_heap()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # ----------------------------------------------------------- transactions

    @contextlib.asynccontextmanager
    async def transaction(self, envelope: Envelope[Any] | None = None) -> AsyncIterator[Context[D]]:
        """A transaction with `emit`/`audit`; the relay publishes after commit (and after
        the `after_commit` callbacks). For jobs and tests; message handling uses the same path."""
        async with self.pool.acquire() as conn:
            ctx: Context[D] = Context(worker=self.name, db=conn, clock=self.clock, deps=self.deps, envelope=envelope)
            async with conn.transaction():
                yield ctx
                await ctx._send_writes()
                await ctx._flush_outbox()
        ctx._run_after_commit()
        await self.relay.publish_committed(ctx._take_written())

    async def emit_committed(
        self, events: Sequence[tuple[Payload, str | None]], *, committed: Callable[[], None] | None = None
    ) -> None:
        """Events that record something outside the database (no other write goes with them):
        their outbox rows are one INSERT, a transaction by itself, without the BEGIN and COMMIT
        round trips of `transaction()`. `committed` runs once they are, before the relay
        publishes them. Raises when the insert fails: then nothing was recorded."""
        async with self.pool.acquire() as conn:
            ctx: Context[D] = Context(worker=self.name, db=conn, clock=self.clock, deps=self.deps, envelope=None)
            for event, service_id in events:
                await ctx.emit(event, service_id=service_id)
            await ctx._flush_outbox()
        if committed is not None:
            ctx.after_commit(committed)
        ctx._run_after_commit()
        await self.relay.publish_committed(ctx._take_written())

    async def _job_loop(self, job: Job) -> None:
        while not self._stopping:
            try:
                n = await job.run(self)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s failed; next run in %.0fs", job.name, job.every_seconds)
                n = 0
            if n == 0:
                await asyncio.sleep(job.every_seconds)

    async def run_job(self, name: str) -> int:
        """Run one job now (tests move the clock, then call this)."""
        for job in (*self.spec.jobs, _MAINTENANCE):
            if job.name == name:
                return await job.run(self)
        raise KeyError(name)

    # ---------------------------------------------------------------- consume

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aiormq runs this as one task per delivery and, when the channel closes (the broker
        # went away), throws into every such task. A handler cut there may already have sent
        # its COMMIT: its effect stands, but it was never counted and its redelivery only finds
        # it in the inbox. So the handling runs in a task of ours that a channel close does not
        # reach; it finishes, and only its ack fails. The task is made here, before the first
        # await, so handlings start in delivery order, which is what orders a service's messages.
        try:
            env: Envelope[Any] | None = decode(message.body, self._types)
            error: str | None = None
        except DecodeError as exc:
            env, error = None, str(exc)
        key = self.spec.order_key(env) if env is not None else None
        self._acks.delivered(message)
        prev, mine = self._serializer.enter(key)
        task = asyncio.create_task(self._process(message, env, error, key, prev, mine))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        await asyncio.shield(task)

    async def _process(
        self,
        message: AbstractIncomingMessage,
        env: Envelope[Any] | None,
        error: str | None,
        key: str | None,
        prev: asyncio.Future[None] | None,
        mine: asyncio.Future[None] | None,
    ) -> None:
        try:
            if prev is not None:
                # Shielded: cancelling this handling (a stop past its grace) must not cancel the
                # previous one's future, which that one resolves when it leaves.
                await asyncio.shield(prev)
            if env is None:
                assert error is not None
                await self._reject_invalid(message, error)
            else:
                await self._handle(message, env)
        finally:
            self._serializer.leave(key, mine)

    async def _handle(self, message: AbstractIncomingMessage, env: Envelope[Any]) -> None:
        cls = type(env.payload)
        handler = self.spec.handlers[cls]
        started = time.perf_counter()
        with start_span(
            f"{topology.work_queue(self.name)} process",
            SpanKind.CONSUMER,
            lambda: messaging_attributes(
                operation="process",
                destination=topology.work_queue(self.name),
                routing_key=message.routing_key or "",
                message_id=str(env.message_id),
                correlation_id=str(env.correlation_id),
            ),
            context=extract_context(message.headers),
        ) as span:
            try:
                outcome, reply = await self._run_handler(handler, env)
            except Exception as exc:  # noqa: BLE001 - every failure gets a decision below
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                await self._fail(message, env, exc)
                return
            if outcome != "duplicate":
                self.handled += 1
            HANDLER_SECONDS.labels(self.name, env.type).observe(time.perf_counter() - started)
            MESSAGES.labels(self.name, env.type, outcome).inc()
            if reply is not None and message.reply_to:
                await self._send_reply(message, env, reply)
            self._ack(message)

    async def _run_handler(self, handler: Handler, env: Envelope[Any]) -> tuple[str, Reply | None]:
        if self._group is not None:
            # With the message's trace context: the batch runs in the group's own task.
            grouped = await self._group.submit((handler, env, otel_context.get_current()))
            if grouped is not None:
                outcome, reply, published = grouped
                # Acked once its batch's events left, as below: the service's next message is
                # handled only then. Shielded: the publishing is the whole batch's.
                await asyncio.shield(published)
                return outcome, reply
        is_command = env.payload.kind == "command"
        async with self.pool.acquire() as conn:
            ctx: Context[D] = Context(worker=self.name, db=conn, clock=self.clock, deps=self.deps, envelope=env)
            try:
                async with db.transaction_opened_by(conn, _inbox_insert([env])) as tx:
                    if tx.status == "INSERT 0 0":
                        return "duplicate", None
                    reply = await self._decide(handler, env, ctx)
                    await ctx._send_writes()
                    ctx._close_with_outbox(tx)
                outcome = "handled"
            except Rejected as rej:
                # The handler's writes rolled back with the transaction; the decision itself
                # (inbox, rejection event, audit record) commits in a short one of its own.
                ctx._forget_writes()
                reply = QueryRejected(reason=rej.reason) if isinstance(env.payload, Query) else None
                async with db.transaction_opened_by(conn, _inbox_insert([env])) as tx:
                    if tx.status == "INSERT 0 0":
                        return "duplicate", None
                    if rej.event is not None:
                        await ctx.emit(rej.event)
                    if is_command:
                        await ctx.audit(env.type, "rejected", rej.reason, detail={**ctx.audit_detail, **rej.detail})
                    ctx._close_with_outbox(tx)
                outcome = "rejected"
        ctx._run_after_commit()
        # Published before the ack (and before the next message of the service starts), so a
        # service's events leave in the order they were decided.
        await self.relay.publish_committed(ctx._take_written())
        return outcome, reply

    async def _commit_group(self, items: list[_GroupItem]) -> list[_GroupResult]:
        """Handle a batch in one transaction (see group_commit); raises, rolling everything
        back, when any handler does: the runtime then handles each message alone."""
        decided: list[tuple[str, Reply | None]] = []
        contexts: list[Context[D]] = []
        envs = [env for _, env, _ in items]
        async with self.pool.acquire() as conn, db.transaction_opened_by(conn, _inbox_insert(envs)) as tx:
            if tx.status != f"INSERT 0 {len(envs)}":
                # A redelivery among them (rare): each is handled alone, which tells which.
                raise _RedeliveryInBatchError
            for handler, env, trace_context in items:
                ctx: Context[D] = Context(worker=self.name, db=conn, clock=self.clock, deps=self.deps, envelope=env)
                # What the handler emits carries its own message's trace, not the batch's.
                token = otel_context.attach(trace_context)
                try:
                    reply = await self._decide(handler, env, ctx)
                finally:
                    otel_context.detach(token)
                contexts.append(ctx)
                decided.append(("handled", reply))
            # The batch's writes in message order, one round trip per run of the same statement.
            await db.send_writes(conn, [w for ctx in contexts for w in ctx._writes])
            written = [row for ctx in contexts for row in ctx._pending_rows]
            if written:
                tx.closing = outbox.insert_statement(written)
        GROUP_COMMIT_MESSAGES.labels(self.name).observe(len(items))
        for ctx in contexts:
            ctx._run_after_commit()
        # Pipelined one batch deep: this batch's publishing starts (chained after the previous
        # batch's: batches publish in commit order) and the results return at once; each message is
        # acked once its batch's publishing ended (_run_handler). The next batch is taken once the
        # publishing of the batch before this one ended (`_one_batch_publishing`, GroupCommit's
        # pace), so its transaction runs while the broker confirms this batch's events.
        # Against waiting for the confirms before the next transaction, bench/bus.py at half the
        # maximum, 2026-12-04: p99 median 22.7 ms against 28.9 (26 and 24 runs), for more commits
        # per message (0.43-0.64 against 0.23-0.45) and ~6 % more machine CPU. Not deeper: with
        # no wait at all, p99 was 35-62 ms (smaller batches still, more CPU). In a backlog (half
        # the prefetch in flight) the prefetch window, not the confirms, bounds the rate, and
        # pipelining only split each window's acks and deliveries: RabbitMQ spent 0.33-0.39 ms
        # per message in a drain against 0.25-0.31, drain rate -4 %. So then the next batch waits
        # for this one's publishing, as before.
        # The same pipelining, tried in 2026-11 and earlier on 2026-12-04, looked no better then: a
        # WAL segment made mid-run stalled every commit 40-55 ms and set both arms' p99
        # (bench/bus.py's settle_database).
        previous = self._batch_publishing
        published = asyncio.ensure_future(self._publish_after(previous, written))
        self._previous_batch_publishing, self._batch_publishing = previous, published
        return [(outcome, reply, published) for outcome, reply in decided]

    async def _publish_after(self, previous: asyncio.Future[None] | None, written: list[outbox.OutboxRow]) -> None:
        if previous is not None:
            await asyncio.wait({previous})  # never raises, whatever became of `previous`
        await self.relay.publish_committed(written)

    async def _one_batch_publishing(self) -> None:
        """Wait until at most one committed batch is still being published; none when the
        worker holds half its prefetch or more (a backlog)."""
        backlog = len(self._inflight) >= self.settings.prefetch // 2
        waiting_on = self._batch_publishing if backlog else self._previous_batch_publishing
        if waiting_on is not None:
            await asyncio.wait({waiting_on})  # (cancelling this wait leaves it alone)

    async def _batches_published(self) -> None:
        """At a stop: let the committed batches' publishing end before the relay stops."""
        if self._batch_publishing is not None:
            await asyncio.wait({self._batch_publishing}, timeout=self.settings.shutdown_grace_seconds)

    @staticmethod
    async def _decide(handler: Handler, env: Envelope[Any], ctx: Context[D]) -> Reply | None:
        """Run the handler. Commands are decisions and always audited; queries only when their
        handler says so."""
        reply = await handler(env.payload, ctx)
        if env.payload.kind == "command" and not ctx._audits:
            await ctx.audit(env.type, "accepted", detail=ctx.audit_detail)
        return reply

    async def _send_reply(self, message: AbstractIncomingMessage, env: Envelope[Any], reply: Reply) -> None:
        out = new_envelope(
            reply,
            actor=Actor(kind="system", id=self.name),
            service_id=env.service_id,
            account_id=env.account_id,
            correlation_id=env.correlation_id,
            causation_id=env.message_id,
            occurred_at=self.clock.now(),
        )
        try:
            await self.publisher.publish_raw(
                topology.REPLIES_EXCHANGE,
                message.reply_to or "",
                encode(out),
                message_id=str(out.message_id),
                message_type=out.type,
                correlation_id=str(env.message_id),
                mandatory=False,  # the caller may have given up; that is its business
                persistent=False,
            )
        except PublishError as exc:
            log.warning("reply to %s not sent: %s", env.type, exc)

    def _ack(self, message: AbstractIncomingMessage) -> None:
        # Sent at the end of this loop turn, with the other acks wanted meanwhile (acks.py):
        # nothing to wait for here.
        self._acks.ack(message)

    async def _nack(self, message: AbstractIncomingMessage) -> None:
        """Back to the queue (bounded like an ack); a lost nack is a redelivery anyway."""
        self._acks.forget(message)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ACK_TIMEOUT_SECONDS):
                await message.nack(requeue=True)

    # ---------------------------------------------------------------- failures

    async def _reject_invalid(self, message: AbstractIncomingMessage, error: str) -> None:
        mtype = message.type or "unknown"
        MESSAGES.labels(self.name, mtype[:100], "invalid").inc()
        await self._audit_direct(
            AuditRecord(
                audit_id=uuid.uuid4(),
                occurred_at=self.clock.now(),
                worker=self.name,
                action=mtype[:100] if mtype.isidentifier() else "unknown",
                outcome="rejected",
                reason=error[:2000],
                message_id=_uuid_or_none(message.message_id),
                correlation_id=_uuid_or_none(message.correlation_id),
            )
        )
        await self._park(message, error, attempts=0)

    async def _fail(self, message: AbstractIncomingMessage, env: Envelope[Any], exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        attempts = topology.attempts_from_x_death(message.headers, self.name)
        delays = self.settings.retry_delays
        if not isinstance(exc, PermanentError) and attempts < len(delays):
            log.warning(
                "%s %s failed (attempt %d), retrying in %ss: %s",
                self.name,
                env.type,
                attempts + 1,
                delays[attempts],
                error,
            )
            try:
                await self._republish(
                    message, topology.LADDER_EXCHANGE, topology.retry_queue(self.name, delays[attempts]), {}
                )
            except PublishError as pub_exc:
                # Cannot even reach the retry queue: leave the message to the broker.
                log.warning("retry publish failed (%s); requeueing", pub_exc)
                await self._nack(message)
                return
            MESSAGES.labels(self.name, env.type, "retried").inc()
            self._ack(message)
            return
        log.error("%s %s parked after %d attempts: %s", self.name, env.type, attempts + 1, error)
        MESSAGES.labels(self.name, env.type, "parked").inc()
        await self._audit_direct(
            AuditRecord(
                audit_id=uuid.uuid4(),
                occurred_at=self.clock.now(),
                worker=self.name,
                action=env.type,
                outcome="failed",
                reason=error,
                message_id=env.message_id,
                correlation_id=env.correlation_id,
                actor=env.actor,
                service_id=env.service_id,
                account_id=env.account_id,
                detail={"attempts": attempts + 1},
            )
        )
        await self._park(message, error, attempts=attempts + 1)

    async def _park(self, message: AbstractIncomingMessage, error: str, *, attempts: int) -> None:
        headers = {
            "x-palisade-error": error[:2000],
            "x-palisade-attempts": attempts,
            "x-palisade-original-routing-key": message.routing_key or "",
            "x-palisade-original-exchange": message.exchange or "",
        }
        try:
            await self._republish(message, topology.LADDER_EXCHANGE, topology.dead_queue(self.name), headers)
        except PublishError as exc:
            log.warning("park failed (%s); requeueing", exc)
            await self._nack(message)
            return
        DEAD_LETTERS.labels(self.name).inc()
        self._ack(message)

    async def _republish(
        self, message: AbstractIncomingMessage, exchange: str, routing_key: str, extra: Mapping[str, Any]
    ) -> None:
        headers = dict(message.headers or {})
        headers.update(extra)
        await self.publisher.publish_raw(
            exchange,
            routing_key,
            message.body,
            message_id=message.message_id or str(uuid.uuid4()),
            message_type=message.type,
            correlation_id=message.correlation_id,
            headers=headers,
            reply_to=message.reply_to,
            timestamp=message.timestamp,
        )

    async def _audit_direct(self, record: AuditRecord) -> None:
        """Audit records for failures go straight to the broker: the database may be
        the thing that failed."""
        try:
            await self.publisher.publish_raw(
                topology.AUDIT_EXCHANGE,
                record.routing_key(),
                record.model_dump_json().encode(),
                message_id=str(record.audit_id),
                message_type="AuditRecord",
                correlation_id=str(record.correlation_id) if record.correlation_id else None,
            )
        except PublishError as exc:
            log.error("audit record for %s not published: %s", record.action, exc)


def freeze_startup_heap() -> None:
    """Take what the process built at startup (modules, models, pools: most of its objects,
    alive till exit) out of the cycle collector's reach. Without it every full collection
    walked them all: two pauses of ~50 ms in ten seconds of steady traffic, the largest part
    of the command -> event p99 (bench/bus.py, issue 2). For a worker process, not for tests
    that start many runtimes in one process (their garbage would stay)."""
    gc.collect()
    gc.freeze()


async def _prune(rt: WorkerRuntime[Any]) -> int:
    """Forget what is old enough that no redelivery can still come for it."""
    async with rt.pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM outbox WHERE published_at < now() - make_interval(days => $1::int)",
            round(rt.settings.retention_days),
        )
        await conn.execute(
            "DELETE FROM inbox WHERE handled_at < now() - make_interval(days => $1::int)",
            round(rt.settings.retention_days),
        )
    return 0


_MAINTENANCE = Job("prune-outbox-and-inbox", 3600.0, _prune)


def _uuid_or_none(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


__all__ = [
    "SYSTEM",
    "Context",
    "Job",
    "QueryRejected",
    "WorkerRuntime",
    "WorkerSpec",
    "freeze_startup_heap",
]
