"""The load generator's and the collector's AMQP connection: as little CPU per message as the
protocol allows, because they share the machine's two cores with what they measure.

In production the systems that publish commands and read events run elsewhere. Here they
run beside the worker, and with aiormq (Palisade's own `Publisher` over it, and an aio-pika
consumer for the collector) they took 0.32-0.38 ms of CPU per message at the latency run's
rate, against 0.14-0.18 ms over this connection (the floor, 1188 msg/s, 2026-12-05): per
publish aiormq makes a future, a timeout and a task and encodes the frames as it sends;
per delivery aio-pika makes an `IncomingMessage` and a task. Here each command's frames are
encoded by pamqp before the run and written with one `transport.write` when the command is
due; confirms are counted as they come, not awaited one by one (the run waits for all of
them at its end and fails on any nack or return); deliveries are unacknowledged (`no_ack`)
and only their bodies are handed on. The frames on the wire are what `Publisher` sends:
persistent, mandatory, the same properties.

pamqp encodes and decodes every frame; this module only cuts the byte stream into frames
(type, channel, size, end marker: AMQP 0-9-1 section 4.2.3) and keeps the handshake to what
the bench needs: PLAIN login, no heartbeats, no reconnect. A closed connection or channel
fails every wait at once.
"""

from __future__ import annotations

import asyncio
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pamqp import body as pamqp_body
from pamqp import commands, frame, header, heartbeat
from yarl import URL

FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
FRAME_END = 0xCE
PUBLISH_CHANNEL = 1


class LeanAmqpError(Exception):
    """The broker closed the connection or a channel, or refused a publish."""


class LeanAmqp(asyncio.Protocol):
    """One connection: channel 1 publishes in confirm mode, each `consume` gets a channel."""

    def __init__(self, url: URL) -> None:
        self._url = url
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiters: list[tuple[int, type[Any], asyncio.Future[Any]]] = []
        self._frame_max = 131072
        self._next_channel = PUBLISH_CHANNEL + 1
        self._consumers: dict[int, Callable[[bytes], None]] = {}
        self._incoming: dict[int, tuple[int, list[bytes]]] = {}  # channel -> (body size, chunks so far)
        self._returning: set[int] = set()  # channels whose next content is a returned message
        self._next_tag = 1
        self._unconfirmed: OrderedDict[int, None] = OrderedDict()
        self._all_confirmed = asyncio.Event()
        self._all_confirmed.set()
        self.refused = 0  # publishes nacked or returned (unroutable)
        self.error: LeanAmqpError | None = None

    # ----------------------------------------------------------------  setting up

    @classmethod
    async def connect(cls, url: str, timeout: float = 10.0) -> LeanAmqp:
        parsed = URL(url)
        conn = cls(parsed)
        opened = conn._expect(0, commands.Connection.OpenOk)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: conn, parsed.host or "127.0.0.1", parsed.port or 5672)
            await opened  # a refused login closes the connection: connection_lost fails this wait
        await conn._rpc(PUBLISH_CHANNEL, commands.Channel.Open(), commands.Channel.OpenOk)
        await conn._rpc(PUBLISH_CHANNEL, commands.Confirm.Select(), commands.Confirm.SelectOk)
        return conn

    async def declare_bound_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        """An exclusive queue of this connection's, bound to `exchange`."""
        await self._rpc(PUBLISH_CHANNEL, commands.Queue.Declare(queue=queue, exclusive=True), commands.Queue.DeclareOk)
        await self._rpc(
            PUBLISH_CHANNEL,
            commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key),
            commands.Queue.BindOk,
        )

    async def consume(self, queue: str, on_body: Callable[[bytes], None]) -> None:
        """Each message's body to `on_body`, unacknowledged, on a channel of its own."""
        channel = self._next_channel
        self._next_channel += 1
        await self._rpc(channel, commands.Channel.Open(), commands.Channel.OpenOk)
        self._consumers[channel] = on_body
        await self._rpc(channel, commands.Basic.Consume(queue=queue, no_ack=True), commands.Basic.ConsumeOk)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ----------------------------------------------------------------  publishing

    def prepare(self, exchange: str, routing_key: str, body: bytes, *, message_id: str, message_type: str) -> bytes:
        """The frames of one persistent, mandatory publish, ready for `publish`."""
        properties = commands.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            headers={},
            message_id=message_id,
            message_type=message_type,
        )
        parts = [
            frame.marshal(
                commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True), PUBLISH_CHANNEL
            ),
            frame.marshal(header.ContentHeader(0, len(body), properties), PUBLISH_CHANNEL),
        ]
        room = self._frame_max - 8  # a frame's header and end marker
        parts += [
            frame.marshal(pamqp_body.ContentBody(body[i : i + room]), PUBLISH_CHANNEL)
            for i in range(0, len(body), room)
        ]
        return b"".join(parts)

    def publish(self, prepared: bytes) -> None:
        """Send one prepared publish now; its confirm is counted when it comes."""
        if self.error is not None:
            raise self.error
        assert self._transport is not None
        self._unconfirmed[self._next_tag] = None
        self._next_tag += 1
        self._all_confirmed.clear()
        self._transport.write(prepared)

    async def confirmed(self, timeout: float) -> None:
        """Wait until the broker confirmed every publish so far; raise if any was refused."""
        async with asyncio.timeout(timeout):
            await self._all_confirmed.wait()
        if self.error is not None:
            raise self.error
        if self.refused:
            raise LeanAmqpError(f"{self.refused} publishes nacked or returned")

    # ----------------------------------------------------------------  asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(frame.marshal(header.ProtocolHeader(), 0))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(LeanAmqpError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos, end_of_data = 0, len(buffer)
        while end_of_data - pos >= FRAME_HEADER.size + 1:
            _, channel, size = FRAME_HEADER.unpack_from(buffer, pos)
            end = pos + FRAME_HEADER.size + size  # the end marker's offset
            if end >= end_of_data:
                break
            if buffer[end] != FRAME_END:
                self._fail(LeanAmqpError(f"frame without its end marker on channel {channel}"))
                self.close()
                return
            _, _, value = frame.unmarshal(bytes(buffer[pos : end + 1]))
            self._on_frame(channel, value)
            pos = end + 1
        del buffer[:pos]

    # ----------------------------------------------------------------  frames

    def _on_frame(self, channel: int, value: Any) -> None:
        if isinstance(value, pamqp_body.ContentBody):
            self._on_body(channel, value.value)
        elif isinstance(value, header.ContentHeader):
            self._incoming[channel] = (value.body_size, [])
            if value.body_size == 0:
                self._on_body(channel, b"")
        elif isinstance(value, commands.Basic.Deliver):
            pass  # its header and body follow
        elif isinstance(value, commands.Basic.Ack):
            self._confirm(value.delivery_tag, value.multiple, refused=False)
        elif isinstance(value, commands.Basic.Nack):
            self._confirm(value.delivery_tag, value.multiple, refused=True)
        elif isinstance(value, commands.Basic.Return):
            self.refused += 1  # its ack follows; its content is not handed on
            self._returning.add(channel)
        elif isinstance(value, commands.Connection.Start):
            login = f"\0{self._url.user or 'guest'}\0{self._url.password or 'guest'}"
            self._send(0, commands.Connection.StartOk(client_properties={"product": "palisade-bench"}, response=login))
        elif isinstance(value, commands.Connection.Tune):
            self._frame_max = value.frame_max or self._frame_max
            self._send(0, commands.Connection.TuneOk(value.channel_max, self._frame_max, 0))  # no heartbeats
            self._send(0, commands.Connection.Open(virtual_host=self._url.path[1:] or "/"))
        elif isinstance(value, commands.Connection.Close | commands.Channel.Close):
            self._fail(LeanAmqpError(f"broker closed channel {channel}: {value.reply_code} {value.reply_text}"))
        elif isinstance(value, heartbeat.Heartbeat):
            pass
        else:
            for i, (on, kind, fut) in enumerate(self._waiters):
                if on == channel and isinstance(value, kind):
                    del self._waiters[i]
                    if not fut.done():
                        fut.set_result(value)
                    break

    def _on_body(self, channel: int, chunk: bytes) -> None:
        size, chunks = self._incoming.get(channel, (0, []))
        chunks.append(chunk)
        if sum(len(c) for c in chunks) < size:
            return
        del self._incoming[channel]
        if channel in self._returning:
            self._returning.discard(channel)
            return
        on_body = self._consumers.get(channel)
        if on_body is not None:
            on_body(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _confirm(self, tag: int, multiple: bool, *, refused: bool) -> None:
        settled = 0
        if multiple:
            while self._unconfirmed and next(iter(self._unconfirmed)) <= tag:
                self._unconfirmed.popitem(last=False)
                settled += 1
        elif tag in self._unconfirmed:
            del self._unconfirmed[tag]
            settled = 1
        if refused:
            self.refused += settled
        if not self._unconfirmed:
            self._all_confirmed.set()

    def _fail(self, error: LeanAmqpError) -> None:
        if self.error is None:
            self.error = error
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()
        self._all_confirmed.set()  # `confirmed` then raises the error

    # ----------------------------------------------------------------  requests

    def _send(self, channel: int, value: Any) -> None:
        assert self._transport is not None
        self._transport.write(frame.marshal(value, channel))

    def _expect(self, channel: int, kind: type[Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            fut.set_exception(self.error)
        else:
            self._waiters.append((channel, kind, fut))
        return fut

    async def _rpc(self, channel: int, request: Any, reply: type[Any], timeout: float = 10.0) -> Any:
        answer = self._expect(channel, reply)
        self._send(channel, request)
        async with asyncio.timeout(timeout):
            return await answer
