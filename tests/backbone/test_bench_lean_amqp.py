"""bench/lean_amqp.py, the bench's load generator and collector connection, against the real
RabbitMQ: what it publishes arrives whole and confirmed, large bodies cross frame boundaries
both ways, and a refused publish or a closed channel is reported, never waited on forever."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

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


@pytest.fixture
async def lean() -> AsyncIterator[LeanAmqp]:
    client = await LeanAmqp.connect(AMQP_URL)
    yield client
    client.close()


async def collected(client: LeanAmqp, exchange: str, routing_key: str) -> list[bytes]:
    """The bodies arriving at a new queue bound to `exchange`, as they arrive."""
    bodies: list[bytes] = []
    queue = unique("lean-q")
    await client.declare_bound_queue(queue, exchange, routing_key)
    await client.consume(queue, bodies.append)
    return bodies


async def test_publishes_are_confirmed_and_arrive_in_order_with_their_properties(
    lean: LeanAmqp, exchange: str, amqp: AbstractRobustConnection
) -> None:
    bodies = await collected(lean, exchange, "probe.#")
    sent = [json.dumps({"n": n}).encode() for n in range(500)]
    for n, body in enumerate(sent):
        lean.publish(lean.prepare(exchange, "probe.cmd", body, message_id=f"m-{n}", message_type="Probe"))
    await lean.confirmed(timeout=10)
    await wait_until(lambda: len(bodies) == len(sent), what="500 deliveries")
    assert bodies == sent

    # What the workers receive: Publisher's persistent JSON message with its id and type.
    channel = await amqp.channel()
    q = await channel.declare_queue(exclusive=True)
    await q.bind(exchange, "probe.props")
    lean.publish(lean.prepare(exchange, "probe.props", b"{}", message_id="m-x", message_type="Probe"))
    await lean.confirmed(timeout=10)
    message = await q.get(timeout=5)
    assert (message.message_id, message.type, message.content_type, message.delivery_mode.value) == (
        "m-x",
        "Probe",
        "application/json",
        2,
    )
    await channel.close()


async def test_a_body_larger_than_a_frame_is_split_and_joined(lean: LeanAmqp, exchange: str) -> None:
    bodies = await collected(lean, exchange, "#")
    big = bytes(range(256)) * 1500  # 384,000 bytes: three frames and a part at 131,072
    lean.publish(lean.prepare(exchange, "big", big, message_id="m-big", message_type="Probe"))
    lean.publish(lean.prepare(exchange, "empty", b"", message_id="m-empty", message_type="Probe"))
    await lean.confirmed(timeout=10)
    await wait_until(lambda: len(bodies) == 2, what="both deliveries")
    assert bodies == [big, b""]


async def test_an_unroutable_publish_is_reported_and_not_delivered(lean: LeanAmqp, exchange: str) -> None:
    bodies = await collected(lean, exchange, "routed")
    lean.publish(lean.prepare(exchange, "nowhere", b"lost", message_id="m-1", message_type="Probe"))
    lean.publish(lean.prepare(exchange, "routed", b"kept", message_id="m-2", message_type="Probe"))
    with pytest.raises(LeanAmqpError, match="1 publishes nacked or returned"):
        await lean.confirmed(timeout=10)
    await wait_until(lambda: bodies == [b"kept"], what="the routed message")


async def test_a_refused_login_fails_the_connect() -> None:
    with pytest.raises(LeanAmqpError, match="connection lost"):
        await LeanAmqp.connect(AMQP_URL.replace("guest:guest", "guest:wrong"))


async def test_a_channel_closed_by_the_broker_fails_the_waits_and_later_publishes(lean: LeanAmqp) -> None:
    missing = unique("no-such-exchange")
    lean.publish(lean.prepare(missing, "x", b"{}", message_id="m-1", message_type="Probe"))
    with pytest.raises(LeanAmqpError, match="404"):
        await lean.confirmed(timeout=10)
    with pytest.raises(LeanAmqpError):
        lean.publish(lean.prepare(missing, "x", b"{}", message_id="m-2", message_type="Probe"))
