"""amqp_transport over a real loopback socket: what is written in one loop turn is handed to
the transport as one write, in order; drain and close send what is held at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiormq.exceptions import AMQPConnectionError
from yarl import URL

from palisade_events.amqp_transport import CoalescingStreamWriter, CoalescingTransportFactory


class Peer:
    """A loopback server that keeps every byte it receives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.changed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received.extend(data)
            self.changed.set()
        writer.close()

    async def wait_for(self, expected: bytes) -> None:
        async with asyncio.timeout(5):
            while bytes(self.received) != expected:
                self.changed.clear()
                await self.changed.wait()


# The peer, the writer under test, and every buffer the writer handed to its transport.
Connected = tuple[Peer, CoalescingStreamWriter, list[bytes]]


@pytest.fixture
async def connected() -> AsyncIterator[Connected]:
    peer = Peer()
    server = await asyncio.start_server(peer.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await CoalescingTransportFactory().create(URL(f"amqp://guest:guest@127.0.0.1:{port}/"))
    assert isinstance(writer, CoalescingStreamWriter)
    handed: list[bytes] = []
    transport_write = writer.transport.write

    def record(data: bytes | bytearray | memoryview) -> None:
        handed.append(bytes(data))
        transport_write(data)

    writer.transport.write = record  # type: ignore[method-assign]
    try:
        yield peer, writer, handed
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def test_frames_of_one_loop_turn_leave_in_one_write(connected: Connected) -> None:
    peer, writer, handed = connected
    writer.write(b"method|")
    writer.write(b"header|")
    writer.write(b"body|")
    assert handed == []  # held for the rest of this turn
    await asyncio.sleep(0)  # one turn of the loop: the flush was scheduled first, so it has run
    assert handed == [b"method|header|body|"]
    writer.write(b"ack|")
    await asyncio.sleep(0)
    assert handed == [b"method|header|body|", b"ack|"]
    await peer.wait_for(b"method|header|body|ack|")


async def test_drain_and_close_send_what_is_held_at_once(connected: Connected) -> None:
    peer, writer, handed = connected
    writer.write(b"a")
    writer.write(b"b")
    await writer.drain()
    assert handed == [b"ab"]
    writer.write(b"c")
    writer.close()  # no turn of the loop in between: close must not lose it
    assert handed == [b"ab", b"c"]
    await peer.wait_for(b"abc")


async def test_a_refused_connection_raises_what_aiormq_expects() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens there now
    with pytest.raises(AMQPConnectionError):
        await CoalescingTransportFactory().create(URL(f"amqp://127.0.0.1:{port}/"))
