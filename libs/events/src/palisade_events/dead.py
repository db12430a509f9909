"""Parked messages: look at them, and send them back to their worker.

A worker parks a message in `palisade.<worker>.dead` with the reason in headers
(`x-palisade-error`, `x-palisade-attempts`, `x-palisade-original-routing-key`).
Listing takes every message unacked and gives all of them back, so it loses
nothing. Replay publishes a message to the worker's work queue (confirmed) and
only then acks it in the dead queue, with the retry bookkeeping stripped so the
retry ladder starts fresh.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from .amqp import Publisher
from .topology import LADDER_EXCHANGE, dead_queue, work_queue

# Headers that describe the message's past failures, not the message.
_BOOKKEEPING_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-palisade-", "x-delivery-count")


class DeadQueueError(RuntimeError):
    """The queue is missing, or the message asked for is not there."""


@dataclass(frozen=True)
class ParkedMessage:
    message_id: str | None
    type: str | None
    error: str | None
    attempts: int | None
    routing_key: str | None
    exchange: str | None
    correlation_id: str | None
    timestamp: datetime | None
    size: int

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> ParkedMessage:
        headers = message.headers or {}
        attempts = headers.get("x-palisade-attempts")
        return cls(
            message_id=message.message_id,
            type=message.type,
            error=_text(headers.get("x-palisade-error")),
            attempts=attempts if isinstance(attempts, int) else None,
            routing_key=_text(headers.get("x-palisade-original-routing-key")),
            exchange=_text(headers.get("x-palisade-original-exchange")),
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            size=len(message.body),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "type": self.type,
            "error": self.error,
            "attempts": self.attempts,
            "routing_key": self.routing_key,
            "exchange": self.exchange,
            "correlation_id": self.correlation_id,
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "size": self.size,
        }


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def fresh_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers without the broker's and the runtime's failure bookkeeping
    (trace context and the like stay)."""
    return {k: v for k, v in (headers or {}).items() if not k.lower().startswith(_BOOKKEEPING_PREFIXES)}


async def _existing_queue(channel: AbstractChannel, name: str) -> AbstractQueue:
    try:
        return await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        raise DeadQueueError(f"queue {name!r} does not exist (run `palisade migrate` or start the worker)") from None


class _Held:
    """Messages taken with basic.get and not yet settled; all given back at the end."""

    def __init__(self) -> None:
        self._messages: list[AbstractIncomingMessage] = []

    def add(self, message: AbstractIncomingMessage) -> None:
        self._messages.append(message)

    def settled(self, message: AbstractIncomingMessage) -> None:
        self._messages.remove(message)

    async def give_back(self) -> None:
        for message in self._messages:
            with contextlib.suppress(aio_pika.exceptions.MessageProcessError):
                await message.nack(requeue=True)
        self._messages.clear()


async def list_parked(
    connection: AbstractRobustConnection, worker: str, *, limit: int | None = None
) -> list[ParkedMessage]:
    """The parked messages of `worker`, oldest first; the queue is left as it was."""
    channel = await connection.channel()
    held = _Held()
    try:
        queue = await _existing_queue(channel, dead_queue(worker))
        parked: list[ParkedMessage] = []
        while limit is None or len(parked) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.add(message)
            parked.append(ParkedMessage.of(message))
        return parked
    finally:
        await held.give_back()
        await channel.close()


async def _move(publisher: Publisher, message: AbstractIncomingMessage, worker: str) -> None:
    await publisher.publish_raw(
        LADDER_EXCHANGE,
        work_queue(worker),
        message.body,
        message_id=message.message_id or str(uuid.uuid4()),
        message_type=message.type,
        correlation_id=message.correlation_id,
        headers=fresh_headers(message.headers),
        reply_to=message.reply_to,
        timestamp=message.timestamp,
    )


async def replay_parked(
    connection: AbstractRobustConnection, worker: str, *, message_id: str | None = None
) -> list[ParkedMessage]:
    """Move parked messages back to the work queue: all of them, or only `message_id`
    (the others stay parked). Returns what was moved.

    Each message is acked in the dead queue only after the broker confirmed it in the
    work queue, so a crash in between leaves a copy in both, never in neither (the
    worker's inbox makes the copy harmless). Raises `DeadQueueError` if `message_id`
    is not parked and `amqp.PublishError` if the work queue does not take a message.
    """
    publisher = await Publisher.open(connection)
    channel = await connection.channel()
    held = _Held()
    moved: list[ParkedMessage] = []
    try:
        queue = await _existing_queue(channel, dead_queue(worker))
        await _existing_queue(channel, work_queue(worker))
        # Only what is parked now: a replayed message that fails again is parked
        # behind them and waits for the next replay, instead of looping here.
        budget = queue.declaration_result.message_count or 0
        for _ in range(budget):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.add(message)
            if message_id is not None and message.message_id != message_id:
                continue
            await _move(publisher, message, worker)
            await message.ack()
            held.settled(message)
            moved.append(ParkedMessage.of(message))
            if message_id is not None:
                break
        if message_id is not None and not moved:
            raise DeadQueueError(f"no message {message_id} is parked in {dead_queue(worker)}")
        return moved
    finally:
        await held.give_back()
        await channel.close()
        await publisher.close()


__all__ = ["DeadQueueError", "ParkedMessage", "fresh_headers", "list_parked", "replay_parked"]
