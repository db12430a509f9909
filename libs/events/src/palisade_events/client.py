"""What other Python systems (and the CLI, the simulator, the tests) use to talk
to Palisade: publish with confirm, ask a query and wait for its reply."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from .amqp import Publisher, connect
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
    new_envelope,
)
from .topology import REPLIES_EXCHANGE

R = TypeVar("R", bound=Reply)


class QueryTimeout(TimeoutError):  # noqa: N818 - reads as the TimeoutError it is
    pass


class QueryRejectedError(RuntimeError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EventWatch:
    """Events of chosen types, collected from the moment the watch opened, so a
    command's outcome cannot be missed by subscribing too late."""

    def __init__(self, types: dict[str, type[Payload]]) -> None:
        self._types = types
        self._seen: list[Envelope[Any]] = []
        self._changed = asyncio.Condition()

    async def _on(self, message: AbstractIncomingMessage) -> None:
        try:
            env = decode(message.body, self._types)
        except DecodeError:
            return
        async with self._changed:
            self._seen.append(env)
            self._changed.notify_all()

    async def next(self, match: Callable[[Envelope[Any]], bool], timeout: float) -> Envelope[Any]:
        """The first collected event that matches; raises TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for env in self._seen:
                    if match(env):
                        self._seen.remove(env)
                        return env
                await self._changed.wait()


class PalisadeClient:
    def __init__(self, connection: AbstractRobustConnection, publisher: Publisher, actor: Actor) -> None:
        self._connection = connection
        self.publisher = publisher
        self.actor = actor
        self._reply_channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._pending: dict[str, tuple[asyncio.Future[Envelope[Any]], dict[str, type[Payload]]]] = {}

    @classmethod
    async def connect(cls, url: str, *, actor: Actor = SYSTEM) -> PalisadeClient:
        connection = await connect(url)
        publisher = await Publisher.open(connection)
        return cls(connection, publisher, actor)

    @property
    def connection(self) -> AbstractRobustConnection:
        return self._connection

    async def close(self) -> None:
        await self._connection.close()

    async def __aenter__(self) -> PalisadeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def envelope(
        self, payload: Payload, *, service_id: str | None = None, account_id: str | None = None, **kw: Any
    ) -> Envelope[Any]:
        return new_envelope(
            payload, actor=kw.pop("actor", self.actor), service_id=service_id, account_id=account_id, **kw
        )

    async def publish(
        self, payload: Payload, *, service_id: str | None = None, account_id: str | None = None, **kw: Any
    ) -> Envelope[Any]:
        env = self.envelope(payload, service_id=service_id, account_id=account_id, **kw)
        await self.publisher.publish(env)
        return env

    @contextlib.asynccontextmanager
    async def watch(self, *types: type[Payload]) -> AsyncIterator[EventWatch]:
        """Subscribe to these event types for the duration of the block."""
        watch = EventWatch({t.type_name(): t for t in types})
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for t in types:
                await queue.bind(t.exchange(), t.routing_key())
            await queue.consume(watch._on, no_ack=True)
            yield watch
        finally:
            await channel.close()

    async def _ensure_reply_queue(self) -> str:
        if self._reply_queue is None:
            self._reply_channel = await self._connection.channel()
            queue = await self._reply_channel.declare_queue(exclusive=True, auto_delete=True)
            # Workers answer through palisade.replies, never the default exchange (see topology).
            await queue.bind(REPLIES_EXCHANGE, queue.name)
            await queue.consume(self._on_reply, no_ack=True)
            self._reply_queue = queue
        return self._reply_queue.name

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        entry = self._pending.pop(message.correlation_id or "", None)
        if entry is None:
            return  # a late reply after the caller's timeout
        fut, types = entry
        try:
            fut.set_result(decode(message.body, types))
        except DecodeError as exc:
            fut.set_exception(exc)

    async def request(
        self,
        query: Query,
        *,
        service_id: str | None = None,
        account_id: str | None = None,
        timeout: float = 10.0,
    ) -> Any:
        """Send a query and return its reply payload; raises QueryTimeout or QueryRejectedError."""
        reply_to = await self._ensure_reply_queue()
        env = self.envelope(query, service_id=service_id, account_id=account_id)
        types: dict[str, type[Payload]] = {
            type(query).reply.type_name(): type(query).reply,
            QueryRejected.type_name(): QueryRejected,
        }
        fut: asyncio.Future[Envelope[Any]] = asyncio.get_running_loop().create_future()
        self._pending[str(env.message_id)] = (fut, types)
        try:
            await self.publisher.publish(env, reply_to=reply_to)
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise QueryTimeout(f"no reply to {env.type} within {timeout}s") from None
        finally:
            self._pending.pop(str(env.message_id), None)
        if isinstance(reply.payload, QueryRejected):
            raise QueryRejectedError(reply.payload.reason)
        return reply.payload


__all__ = ["EventWatch", "PalisadeClient", "QueryRejectedError", "QueryTimeout"]
