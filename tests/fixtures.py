"""Shared fixtures (a pytest plugin loaded by the root conftest): the real RabbitMQ and PostgreSQL
of the machine, names isolated per test."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from palisade_events import RuntimeSettings, WorkerRuntime, WorkerSpec
from palisade_events.client import PalisadeClient
from palisade_events.db import schema_name
from palisade_events.topology import dead_queue, retry_queue, work_queue

# Every test session gets a RabbitMQ vhost of its own, so tests never touch the queues
# of a Palisade running on the same broker (`make run`) and leave nothing behind.
TEST_VHOST = os.environ.get("PALISADE_TEST_VHOST", f"palisade-test-{os.getpid()}")
AMQP_URL = f"amqp://guest:guest@127.0.0.1:5672/{TEST_VHOST}"
# ... and a database of its own (created by the runtime on first use, dropped at the end).
TEST_DATABASE = f"palisade_test_{os.getpid()}"
DATABASE_URL = os.environ.get("PALISADE_TEST_DATABASE_URL", f"postgresql://postgres@127.0.0.1:5432/{TEST_DATABASE}")
TEST_RETRY_DELAYS = [0.2, 0.4, 0.8]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def settings_for_test(**overrides: Any) -> RuntimeSettings:
    base: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "database_url": DATABASE_URL,
        "metrics_port": 0,
        "retry_delays": TEST_RETRY_DELAYS,
        "outbox_poll_seconds": 0.2,
        "outbox_grace_seconds": 1.0,
        "shutdown_grace_seconds": 10.0,
    }
    base.update(overrides)
    return RuntimeSettings(**base)


async def wait_until(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll `condition` until true; fail with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Received:
    body: bytes
    routing_key: str
    message_id: str | None
    headers: dict[str, Any]
    received_at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Collector:
    """A raw consumer that dedupes nothing: what really crossed the broker."""

    messages: list[Received] = field(default_factory=list)

    def of(self, routing_key: str) -> list[Received]:
        return [m for m in self.messages if m.routing_key == routing_key]

    async def wait_for(self, count: int, routing_key: str | None = None, timeout: float = 10.0) -> list[Received]:
        def enough() -> bool:
            return len(self.of(routing_key) if routing_key else self.messages) >= count

        await wait_until(enough, timeout, what=f"{count} messages on {routing_key or 'collector'}")
        return self.of(routing_key) if routing_key else list(self.messages)


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc", sql],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session", autouse=True)
def session_isolation() -> Iterator[str]:
    """A RabbitMQ vhost and a database for this test session alone."""
    own_database = "PALISADE_TEST_DATABASE_URL" not in os.environ
    if own_database:
        _psql(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)')
        _psql(f'CREATE DATABASE "{TEST_DATABASE}"')
    _rabbitmqctl("add_vhost", TEST_VHOST)
    _rabbitmqctl("set_permissions", "-p", TEST_VHOST, "guest", ".*", ".*", ".*")
    yield TEST_VHOST
    _rabbitmqctl("delete_vhost", TEST_VHOST)
    if own_database:
        _psql(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def amqp() -> AsyncIterator[AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(AMQP_URL)
    yield conn
    await conn.close()


@pytest.fixture
async def collect(amqp: AbstractRobustConnection) -> AsyncIterator[Callable[..., Awaitable[Collector]]]:
    """`await collect(exchange, *routing_keys)` -> a Collector fed by an exclusive queue."""
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=500)

    async def make(exchange: str, *keys: str) -> Collector:
        from palisade_events.topology import declare_exchanges

        await declare_exchanges(channel)
        col = Collector()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in keys:
            await queue.bind(exchange, key)

        async def on(msg: AbstractIncomingMessage) -> None:
            col.messages.append(
                Received(
                    body=msg.body,
                    routing_key=msg.routing_key or "",
                    message_id=msg.message_id,
                    headers=dict(msg.headers or {}),
                    received_at=asyncio.get_running_loop().time(),
                )
            )

        await queue.consume(on, no_ack=True)
        return col

    yield make
    await channel.close()


@pytest.fixture
async def client() -> AsyncIterator[PalisadeClient]:
    c = await PalisadeClient.connect(AMQP_URL)
    yield c
    await c.close()


async def drop_worker_state(
    name: str, amqp_conn: AbstractRobustConnection, delays: list[float] = TEST_RETRY_DELAYS
) -> None:
    """Delete a test worker's queues and schema."""
    channel = await amqp_conn.channel()
    for q in [work_queue(name), dead_queue(name), *(retry_queue(name, d) for d in delays)]:
        try:
            await channel.queue_delete(q)
        except aio_pika.exceptions.ChannelClosed:
            channel = await amqp_conn.channel()
    await channel.close()
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_name(name)}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def run_worker(amqp: AbstractRobustConnection) -> AsyncIterator[Callable[..., Awaitable[WorkerRuntime[Any]]]]:
    """`await run_worker(spec, **settings)` starts a runtime in-process; stopped and
    cleaned up (queues, schema) after the test."""
    started: list[WorkerRuntime[Any]] = []
    names: set[str] = set()

    async def start(spec: WorkerSpec[Any], clock: Any = None, **overrides: Any) -> WorkerRuntime[Any]:
        if spec.name not in names:
            await drop_worker_state(spec.name, amqp)  # whatever an interrupted run left
        rt: WorkerRuntime[Any] = WorkerRuntime(spec, settings_for_test(**overrides), clock=clock)
        await rt.start()
        started.append(rt)
        names.add(spec.name)
        return rt

    yield start
    for rt in started:
        await rt.stop()
    for name in names:
        await drop_worker_state(name, amqp)
