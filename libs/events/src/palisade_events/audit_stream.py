"""Reading the audit history back from the stream `palisade.audit.log`.

Every audit record published on `palisade.audit` also lands in that stream queue.
A stream is read over AMQP 0.9.1 by a consumer with a prefetch, manual acks and
the `x-stream-offset` argument (`first`, `next`, a point in time or an offset);
the broker keeps the records, acks only grant credit for more. Each delivery
carries its position in the header `x-stream-offset`.

The last N records are found by reading backwards in growing windows: the newest
window first (which then goes on for `follow`), then older ranges, each twice as
long as the one before, until N matching records are found or the stream's start
is reached. A long history costs only what the answer needs.

"Caught up" with the newest window is judged from two things: the message count
the broker reports for the stream (refreshed by the broker only every few seconds,
so it can be behind) and silence. Until the reported end is reached the reader
waits up to `timeout` for the next record; after it, only a short grace period,
long enough for the records the count did not include yet.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from pydantic import ValidationError

from .audit import AuditRecord
from .topology import AUDIT_LOG

# "last": as far back as the answer needs (the default of `palisade audit tail`).
StartAt = Literal["last", "first", "next"] | datetime

FIRST_WINDOW = 2000  # records; each older window is twice the one after it


class AuditStreamMissingError(RuntimeError):
    pass


@dataclass(frozen=True)
class AuditFilter:
    """Which records to show; empty means all."""

    workers: frozenset[str] = field(default_factory=frozenset)
    service_id: str | None = None
    outcomes: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(
        cls, workers: Iterable[str] = (), service_id: str | None = None, outcomes: Iterable[str] = ()
    ) -> AuditFilter:
        return cls(frozenset(workers), service_id, frozenset(outcomes))

    def wants_key(self, routing_key: str) -> bool:
        """Cheap check on `<worker>.<action>.<outcome>` before decoding the body."""
        worker, _, rest = routing_key.partition(".")
        if self.workers and worker not in self.workers:
            return False
        return not self.outcomes or rest.rpartition(".")[2] in self.outcomes

    def wants(self, record: AuditRecord) -> bool:
        return (
            (not self.workers or record.worker in self.workers)
            and (self.service_id is None or record.service_id == self.service_id)
            and (not self.outcomes or record.outcome in self.outcomes)
        )


def _offset(message: AbstractIncomingMessage) -> int | None:
    value = (message.headers or {}).get("x-stream-offset")
    return value if isinstance(value, int) else None


class _Reader:
    """One stream consumer on its own channel; deliveries in arrival order."""

    def __init__(self, connection: AbstractRobustConnection, prefetch: int) -> None:
        self._connection = connection
        self._prefetch = prefetch
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._unacked = 0
        self.reported_end = 0

    async def find(self) -> int:
        """Open the channel and find the stream; returns the (possibly stale) end the broker reports."""
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self._prefetch)  # a stream consumer must have one
        try:
            self._queue = await self._channel.declare_queue(AUDIT_LOG, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise AuditStreamMissingError(
                f"the audit stream {AUDIT_LOG!r} does not exist yet (run `palisade migrate` or start a worker)"
            ) from None
        self.reported_end = self._queue.declaration_result.message_count or 0
        return self.reported_end

    async def consume(self, start: int | str | datetime) -> None:
        if self._queue is None:
            await self.find()
        assert self._queue is not None
        await self._queue.consume(self._on_message, no_ack=False, arguments={"x-stream-offset": start})

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Runs before any other await of this delivery's task, so arrival order is kept.
        self._inbox.put_nowait(message)

    async def next_reported_end(self, previous: int, every: float = 0.5) -> int | None:
        """The stream's message count once the broker reports a value other than `previous`."""
        assert self._channel is not None
        while True:
            await asyncio.sleep(every)
            try:
                underlay = await self._channel.get_underlay_channel()
                declared = await underlay.queue_declare(AUDIT_LOG, passive=True)
            except (aio_pika.exceptions.AMQPError, RuntimeError):
                return None  # then silence alone decides
            count = declared.message_count or 0
            if count != previous:
                return count

    async def next(self, timeout: float | None) -> AbstractIncomingMessage | None:
        try:
            message = self._inbox.get_nowait()  # the common case while reading history, and cheap
        except asyncio.QueueEmpty:
            try:
                message = await asyncio.wait_for(self._inbox.get(), timeout)
            except TimeoutError:
                return None
        self._unacked += 1
        # Acks only give the stream credit for more; one per half prefetch is enough.
        if self._unacked >= self._prefetch // 2:
            await message.ack(multiple=True)
            self._unacked = 0
        return message


class AuditTail:
    """`async with AuditTail(conn, filter) as tail:` then `await tail.catch_up(...)`
    for history and/or `async for record in tail.follow()` for what comes next."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        audit_filter: AuditFilter | None = None,
        *,
        start: StartAt = "last",
        prefetch: int = 1000,
    ) -> None:
        self._connection = connection
        self._filter = audit_filter or AuditFilter()
        self._start = start
        self._prefetch = prefetch
        self._newest = _Reader(connection, prefetch)
        self._origin: int | None = None  # where the newest window starts, when reading backwards
        self.read = 0  # messages taken from the stream
        self.skipped = 0  # messages under a matching routing key that are not audit records

    async def __aenter__(self) -> AuditTail:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        end = await self._newest.find()
        if self._start == "last":
            # The broker's count tells roughly where the end is: start a window before it.
            self._origin = max(0, end - FIRST_WINDOW)
            await self._newest.consume(self._origin)
        else:
            await self._newest.consume(self._start)

    async def close(self) -> None:
        await self._newest.close()

    def _record(self, message: AbstractIncomingMessage) -> AuditRecord | None:
        self.read += 1
        if not self._filter.wants_key(message.routing_key or ""):
            return None
        try:
            record = AuditRecord.model_validate_json(message.body)
        except ValidationError:
            self.skipped += 1
            return None
        return record if self._filter.wants(record) else None

    async def catch_up(self, *, limit: int, timeout: float, grace: float = 1.0) -> list[AuditRecord]:
        """Read to the end of the stream as it was when called; the last `limit`
        matching records, oldest first."""
        found: deque[AuditRecord] = deque(maxlen=limit)
        reported = self._newest.reported_end
        # The broker refreshes the count every few seconds: the first new value it
        # reports covers everything published before this call, so reading up to it
        # is caught up, even while the stream keeps growing.
        refreshed = asyncio.ensure_future(self._newest.next_reported_end(reported))
        past_reported = reported == 0
        lowest: int | None = None
        try:
            while True:
                message = await self._newest.next(min(timeout, grace) if past_reported else timeout)
                if message is None:
                    break
                offset = _offset(message)
                if offset is not None:
                    lowest = offset if lowest is None else min(lowest, offset)
                    past_reported = past_reported or offset >= reported - 1
                in_window = self._origin is None or offset is None or offset >= self._origin
                if in_window and (record := self._record(message)) is not None:
                    found.append(record)
                target = refreshed.result() if refreshed.done() and not refreshed.cancelled() else None
                if target is not None and offset is not None and offset >= target - 1:
                    break
        finally:
            refreshed.cancel()
        origin = self._origin
        # Older records exist only if the newest window began after the stream's start.
        if origin and len(found) < limit and (lowest is None or lowest <= origin):
            older = await self._scan_back(origin, limit - len(found), timeout)
            return [*older, *found]
        return list(found)

    async def _scan_back(self, before: int, need: int, timeout: float) -> list[AuditRecord]:
        collected: list[AuditRecord] = []
        window = FIRST_WINDOW
        stop = before
        while stop > 0 and len(collected) < need:
            begin = max(0, stop - window)
            records, reached_start = await self._scan_range(begin, stop, timeout)
            collected = records + collected
            if reached_start:
                break
            stop, window = begin, window * 2
        return collected[-need:]

    async def _scan_range(self, begin: int, stop: int, timeout: float) -> tuple[list[AuditRecord], bool]:
        """Matching records with offsets in [begin, stop), and whether nothing older exists."""
        reader = _Reader(self._connection, self._prefetch)
        records: list[AuditRecord] = []
        lowest: int | None = None
        try:
            await reader.consume(begin)
            while (message := await reader.next(timeout)) is not None:
                offset = _offset(message)
                if offset is None:
                    continue
                lowest = offset if lowest is None else min(lowest, offset)
                if offset >= stop:
                    break
                if offset >= begin and (record := self._record(message)) is not None:
                    records.append(record)
                if offset == stop - 1:
                    break
        finally:
            await reader.close()
        return records, begin == 0 or lowest is None or lowest > begin

    async def follow(self) -> AsyncIterator[AuditRecord]:
        """Every matching record as it arrives, until the caller stops."""
        while True:
            message = await self._newest.next(None)
            if message is not None and (record := self._record(message)) is not None:
                yield record


async def tail_once(
    connection: AbstractRobustConnection,
    audit_filter: AuditFilter,
    *,
    limit: int,
    timeout: float,
    start: StartAt = "last",
) -> list[AuditRecord]:
    """The last `limit` matching records of the stream (from `start`)."""
    async with AuditTail(connection, audit_filter, start=start) as tail:
        return await tail.catch_up(limit=limit, timeout=timeout)


__all__ = ["AuditFilter", "AuditStreamMissingError", "AuditTail", "StartAt", "tail_once"]
