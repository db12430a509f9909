"""RabbitMQ connection and the confirming publisher."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import aio_pika
import aiormq
import pamqp.frame
from aio_pika.abc import AbstractChannel, AbstractRobustConnection, DeliveryMode
from aiormq.abc import ChannelFrame
from opentelemetry.trace import SpanKind
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from .amqp_transport import CoalescingRobustConnection
from .messages import Envelope, encode
from .observability import inject_headers, messaging_attributes, span, tracing_on


class PublishError(RuntimeError):
    """A publish the broker did not take: unroutable (returned), nacked, or lost."""


async def connect(url: str) -> AbstractRobustConnection:
    """A robust connection: reconnects with back-off and restores topology and consumers;
    frames written in one turn of the event loop leave in one send (amqp_transport)."""
    return await aio_pika.connect_robust(
        url, reconnect_interval=1.0, fail_fast=True, connection_class=CoalescingRobustConnection
    )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One persistent, mandatory message for `Publisher.publish_many`."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    message_type: str | None
    correlation_id: str | None
    headers: Mapping[str, Any]


class Publisher:
    """Publishes persistent, mandatory messages and waits for the broker's confirm.

    Every failure raises `PublishError`: a returned (unroutable) message, a
    nack, a timeout, or a channel that closed under the publish.
    """

    def __init__(self, channel: AbstractChannel, *, timeout: float = 10.0) -> None:
        self._channel = channel
        self._timeout = timeout

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, *, timeout: float = 10.0) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel, timeout=timeout)

    @property
    def channel(self) -> AbstractChannel:
        return self._channel

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        message_type: str | None = None,
        correlation_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        reply_to: str | None = None,
        timestamp: datetime | None = None,
        mandatory: bool = True,
        persistent: bool = True,
    ) -> None:
        def properties() -> aiormq.spec.Basic.Properties:
            # Made inside the publish span, when there is one: the injected traceparent is its.
            return aiormq.spec.Basic.Properties(
                message_id=message_id,
                message_type=message_type,
                correlation_id=correlation_id,
                reply_to=reply_to,
                timestamp=timestamp,
                content_type="application/json",
                delivery_mode=(DeliveryMode.PERSISTENT if persistent else DeliveryMode.NOT_PERSISTENT).value,
                headers=dict(headers) if headers is not None else inject_headers(),
            )

        if not tracing_on():  # no span to make: the headers carry the trace on by themselves
            await self._send(exchange, routing_key, body, properties(), mandatory)
            return
        with span(
            f"{routing_key} publish",
            SpanKind.PRODUCER,
            lambda: messaging_attributes(
                operation="publish",
                destination=exchange,
                routing_key=routing_key,
                message_id=message_id,
                correlation_id=correlation_id,
            ),
        ):
            await self._send(exchange, routing_key, body, properties(), mandatory)

    async def _send(
        self, exchange: str, routing_key: str, body: bytes, properties: aiormq.spec.Basic.Properties, mandatory: bool
    ) -> None:
        # Straight to aiormq: aio_pika.Message and Exchange.publish only build these same
        # properties, at a third of this publish's CPU (bench/bus.py --profile).
        try:
            if self._channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{self._channel!r} closed")
            # The whole publish is bounded, not only its confirm: a robust channel's
            # get_underlay_channel() waits, without limit, for its connection to come back.
            async with asyncio.timeout(self._timeout):
                # aiormq's own Channel: its basic_publish takes `wait` (the abstract one does not say so).
                channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                    # Return once the frames are queued for the connection's writer, not once
                    # it wrote them: the default held the channel's lock across that write, so
                    # concurrent publishes (a batch's events) took turns with the writer task.
                    # The confirm is still awaited, and frames keep the order they were queued
                    # in. Client CPU per publish, 10 at a time: 69-71 -> 56 us.
                    wait=False,
                )
        except (aio_pika.exceptions.AMQPError, TimeoutError, ConnectionError, RuntimeError) as exc:
            raise _publish_error(exc, exchange, routing_key) from exc

    async def publish_many(self, messages: Sequence[Outgoing]) -> list[PublishError | None]:
        """Publish persistent, mandatory messages in one write and wait for their confirms;
        never raises: each result is None (confirmed) or what became of that message.

        One publish of aiormq's takes its channel's lock, queues its frames for the writer and
        makes its confirm's future, each message alone, under two timeouts: for a batch's
        events and audit records that was about a fifth of the worker's CPU per command
        (bench/bus.py). Here a batch takes the lock once and queues one buffer, keeping
        aiormq's own bookkeeping (delivery tags, confirm futures, returned messages by id),
        so its confirms, nacks, returns and a channel's close end each future as they end a
        lone publish's. It makes no producer spans: a caller that traces publishes each message
        with `publish_raw` in its own trace's context (the outbox relay does, with tracing on)."""
        if not messages:
            return []
        confirms: list[asyncio.Future[Any]] = []
        failure: BaseException | None = None
        try:
            if self._channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{self._channel!r} closed")
            async with asyncio.timeout(self._timeout):
                channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
                confirms = await _queue_publishes(channel, messages)
                await asyncio.wait(confirms)
        except Exception as exc:  # noqa: BLE001 - each message not confirmed gets the reason
            failure = exc
        if not confirms:  # nothing was queued
            assert failure is not None
            return [_publish_error(failure, m.exchange, m.routing_key) for m in messages]
        results: list[PublishError | None] = []
        for m, confirm in zip(messages, confirms, strict=True):
            if not confirm.done():  # timed out: a confirm arriving later finds it cancelled
                confirm.cancel()
            outcome = (failure or PublishError("publish cancelled")) if confirm.cancelled() else confirm.exception()
            results.append(None if outcome is None else _publish_error(outcome, m.exchange, m.routing_key))
        return results

    async def publish(self, env: Envelope[Any], *, reply_to: str | None = None) -> uuid.UUID:
        """Publish an envelope to the exchange and routing key its type names."""
        cls = type(env.payload)
        await self.publish_raw(
            cls.exchange(),
            cls.routing_key(),
            encode(env),
            message_id=str(env.message_id),
            message_type=env.type,
            correlation_id=str(env.correlation_id),
            reply_to=reply_to,
            timestamp=env.occurred_at,
        )
        return env.message_id

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()


def _publish_error(exc: BaseException, exchange: str, routing_key: str) -> PublishError:
    """What a publish's failure tells its caller (`PublishError`'s three kinds)."""
    if isinstance(exc, PublishError):
        return exc
    if isinstance(exc, aio_pika.exceptions.PublishError):
        return PublishError(
            f"unroutable: no queue is bound for {routing_key!r} on {exchange or 'the default exchange'!r}"
        )
    if isinstance(exc, aio_pika.exceptions.DeliveryError):
        return PublishError(f"broker refused {routing_key!r}: {exc}")
    return PublishError(f"publish of {routing_key!r} not confirmed: {exc!r}")


# A publish's method frame is the same for every message to one exchange and routing key.
_METHOD_FRAMES: dict[tuple[int, str, str], bytes] = {}


def _method_frame(channel_number: int, exchange: str, routing_key: str) -> bytes:
    key = (channel_number, exchange, routing_key)
    frame = _METHOD_FRAMES.get(key)
    if frame is None:
        if len(_METHOD_FRAMES) >= 4096:  # bounded: routing keys are few, but not promised
            _METHOD_FRAMES.clear()
        publish = aiormq.spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
        frame = _METHOD_FRAMES[key] = pamqp.frame.marshal(publish, channel_number)
    return frame


async def _queue_publishes(channel: aiormq.Channel, messages: Sequence[Outgoing]) -> list[asyncio.Future[Any]]:
    """Queue the messages' frames for the connection's writer as one buffer, each with its
    confirm's future registered as aiormq.Channel.basic_publish registers it. This uses the
    attributes that method uses (delivery_tag, confirmations, message_id_delivery_tag,
    write_queue, lock) of the aiormq pinned in requirements.lock; should a release change
    them, tests/backbone/test_publish_many.py fails."""
    if not channel.publisher_confirms:
        raise aiormq.exceptions.ChannelInvalidStateError("publisher confirms are off")
    number, max_body = channel.number, channel.max_content_size
    parts: list[bytes] = []
    confirms: list[asyncio.Future[Any]] = []
    async with channel.lock:
        first_tag = channel.delivery_tag + 1
        try:
            for m in messages:
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                confirm = channel.create_future()
                channel.confirmations[tag] = confirm
                channel.message_id_delivery_tag[m.message_id] = tag
                confirm.add_done_callback(_forget_message_id(channel, m.message_id, tag))
                confirms.append(confirm)
                properties = aiormq.spec.Basic.Properties(
                    message_id=m.message_id,
                    message_type=m.message_type,
                    correlation_id=m.correlation_id,
                    content_type="application/json",
                    delivery_mode=DeliveryMode.PERSISTENT.value,
                    headers=dict(m.headers),
                )
                parts.append(_method_frame(number, m.exchange, m.routing_key))
                parts.append(pamqp.frame.marshal(ContentHeader(0, len(m.body), properties), number))
                for start in range(0, len(m.body), max_body):
                    parts.append(pamqp.frame.marshal(ContentBody(m.body[start : start + max_body]), number))
            await channel.write_queue.put(ChannelFrame(payload=b"".join(parts), should_close=False))
        except BaseException:
            # Nothing was queued: the broker never sees these tags, so they are handed back.
            for tag in range(first_tag, channel.delivery_tag + 1):
                channel.confirmations.pop(tag, None)
            for m in messages:
                if channel.message_id_delivery_tag.get(m.message_id, 0) >= first_tag:
                    channel.message_id_delivery_tag.pop(m.message_id, None)
            channel.delivery_tag = first_tag - 1
            for confirm in confirms:
                confirm.cancel()
            raise
    return confirms


def _forget_message_id(channel: aiormq.Channel, message_id: str, tag: int) -> Callable[[asyncio.Future[Any]], None]:
    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            channel.message_id_delivery_tag.pop(message_id)

    return forget
