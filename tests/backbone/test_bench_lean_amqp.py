"""bench/lean_amqp.py, the bench's load generator and collector connection, against the real
RabbitMQ: what it publishes arrives whole and confirmed, large bodies cross frame boundaries
both ways, and a refused publish or a closed channel is reported, never waited on forever."""

from __future__ import annotations

import json

import pytest
from aio_pika.abc import AbstractRobustConnection

from bench.lean_amqp import LeanAmqp, LeanAmqpError
from tests.fixtures import AMQP_URL, unique, wait_until


@pytest.fixture
async def exchange(amqp: AbstractRobustConnection) -> str:
    name = unique("lean-x")
    channel = await amqp.channel()
    await channel.declare_exchange(name, "topic", auto_delete=True)
    await channel.close()
    return name


async def test_publishes_are_confirmed_and_arrive_in_order_with_their_properties(
    exchange: str, amqp: AbstractRobustConnection
) -> None:
    client = await LeanAmqp.connect(AMQP_URL)
    try:
        bodies: list[bytes] = []
        queue = unique("lean-q")
        await client.declare_bound_queue(queue, exchange, "probe.#")
        await client.consume(queue, bodies.append)
        sent = [json.dumps({"n": n}).encode() for n in range(500)]
        for n, body in enumerate(sent):
            client.publish(client.prepare(exchange, "probe.cmd", body, message_id=f"m-{n}", message_type="Probe"))
        await client.confirmed(timeout=10)
        await wait_until(lambda: len(bodies) == len(sent), what="500 deliveries")
        assert bodies == sent

        # What the workers receive: Publisher's persistent JSON message with its id and type.
        channel = await amqp.channel()
        q = await channel.declare_queue(exclusive=True)
        await q.bind(exchange, "probe.props")
        client.publish(client.prepare(exchange, "probe.props", b"{}", message_id="m-x", message_type="Probe"))
        await client.confirmed(timeout=10)
        message = await q.get(timeout=5)
        assert (message.message_id, message.type, message.content_type, message.delivery_mode.value) == (
            "m-x",
            "Probe",
            "application/json",
            2,
        )
        await channel.close()
    finally:
        client.close()


async def test_a_body_larger_than_a_frame_is_split_and_joined(exchange: str) -> None:
    client = await LeanAmqp.connect(AMQP_URL)
    try:
        bodies: list[bytes] = []
        queue = unique("lean-q")
        await client.declare_bound_queue(queue, exchange, "#")
        await client.consume(queue, bodies.append)
        big = bytes(range(256)) * 1500  # 384,000 bytes: three frames and a part at 131,072
        client.publish(client.prepare(exchange, "big", big, message_id="m-big", message_type="Probe"))
        client.publish(client.prepare(exchange, "empty", b"", message_id="m-empty", message_type="Probe"))
        await client.confirmed(timeout=10)
        await wait_until(lambda: len(bodies) == 2, what="both deliveries")
        assert bodies == [big, b""]
    finally:
        client.close()


async def test_an_unroutable_publish_is_reported_and_not_delivered(exchange: str) -> None:
    client = await LeanAmqp.connect(AMQP_URL)
    try:
        bodies: list[bytes] = []
        queue = unique("lean-q")
        await client.declare_bound_queue(queue, exchange, "routed")
        await client.consume(queue, bodies.append)
        client.publish(client.prepare(exchange, "nowhere", b"lost", message_id="m-1", message_type="Probe"))
        client.publish(client.prepare(exchange, "routed", b"kept", message_id="m-2", message_type="Probe"))
        with pytest.raises(LeanAmqpError, match="1 publishes nacked or returned"):
            await client.confirmed(timeout=10)
        await wait_until(lambda: bodies == [b"kept"], what="the routed message")
    finally:
        client.close()


async def test_a_refused_login_fails_the_connect() -> None:
    with pytest.raises(LeanAmqpError, match="connection lost"):
        await LeanAmqp.connect(AMQP_URL.replace("guest:guest", "guest:wrong"))


async def test_a_channel_closed_by_the_broker_fails_the_waits_and_later_publishes() -> None:
    client = await LeanAmqp.connect(AMQP_URL)
    try:
        missing = unique("no-such-exchange")
        client.publish(client.prepare(missing, "x", b"{}", message_id="m-1", message_type="Probe"))
        with pytest.raises(LeanAmqpError, match="404"):
            await client.confirmed(timeout=10)
        with pytest.raises(LeanAmqpError):
            client.publish(client.prepare(missing, "x", b"{}", message_id="m-2", message_type="Probe"))
    finally:
        client.close()
