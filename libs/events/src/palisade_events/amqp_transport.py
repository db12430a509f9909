"""The socket under a Palisade AMQP connection: frames written in one turn of the event loop
leave in one send.

aiormq's writer task takes each queued frame and writes it to its StreamWriter, and a write
to an idle socket is a system call at once: a batch's ten events and their audit records
were twenty sends, and as many TCP segments for the broker to read. The writer here holds
what is written until the loop's next turn (or a drain, or the close) and sends it as one
buffer. The frames keep their order, a drain still waits until everything is handed to the
socket, and nothing waits for a timer: the held bytes go out before the loop polls again.

It plugs in through aiormq's own extension point, the connection's `transport_factory`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError
from yarl import URL


class CoalescingStreamWriter(asyncio.StreamWriter):
    """A StreamWriter whose writes within one loop turn become one `transport.write`."""

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        protocol: asyncio.BaseProtocol,
        reader: asyncio.StreamReader | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._held: list[bytes | bytearray | memoryview] = []
        self._call_soon = loop.call_soon

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._call_soon(self.flush)
        self._held.append(data)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what is held to the transport (a no-op when nothing is)."""
        if not self._held:
            return
        held, self._held = self._held, []
        if self.transport.is_closing():
            return  # the connection is going: its frames could not leave anyway (and uvloop raises)
        self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    async def drain(self) -> None:
        self.flush()
        await super().drain()

    def write_eof(self) -> None:
        self.flush()
        super().write_eof()

    def close(self) -> None:
        self.flush()
        super().close()


class CoalescingTransportFactory(TransportFactory):
    """aiormq's TCP/TLS transport factory, with a `CoalescingStreamWriter`."""

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        provider = kwargs.pop("ssl_context_provider", None)
        tls = url.scheme == "amqps"
        ssl = await provider.get_context() if tls and provider is not None else None
        host, port = url.host or "localhost", url.port or (5671 if tls else 5672)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(lambda: protocol, host, port, ssl=ssl, **kwargs)
        except OSError as exc:
            # What aiormq's own factories raise, so its connect and aio-pika's reconnect treat it alike.
            raise AMQPConnectionError(*exc.args) from exc
        return reader, CoalescingStreamWriter(transport, protocol, reader, loop)


class CoalescingRobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection over `CoalescingTransportFactory` (every reconnect too:
    aio-pika hands its `kwargs` to each new aiormq connection)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kwargs["transport_factory"] = CoalescingTransportFactory()
