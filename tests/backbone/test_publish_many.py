"""`Publisher.publish_many` against the real broker: one write for many messages, and each
message's confirm, nack or return reaches that message alone."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from palisade_events.amqp import Outgoing, Publisher, PublishError, connect
from tests.fixtures import AMQP_URL, unique, wait_until


@pytest.fixture
async def publisher() -> AsyncIterator[Publisher]:
    connection = await connect(AMQP_URL)
    pub = await Publisher.open(connection, timeout=10.0)
    yield pub
    await connection.close()


# An exchange of the tests' own: palisade.events routes everything to its log stream, so
# nothing published there is unroutable.
EXCHANGE = "palisade.test.publish_many"


async def bound_queue(amqp: AbstractRobustConnection, key: str, **arguments: object) -> AbstractQueue:
    channel = await amqp.channel()
    await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT, auto_delete=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True, arguments=arguments or None)
    await queue.bind(EXCHANGE, key)
    return queue


async def drain(queue: AbstractQueue, count: int) -> list[AbstractIncomingMessage]:
    got: list[AbstractIncomingMessage] = []

    async def all_there() -> bool:
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(msg)
        return len(got) >= count

    await wait_until(all_there, 10, what=f"{count} messages in {queue.name}")
    return got


def outgoing(key: str, body: bytes, **headers: str) -> Outgoing:
    return Outgoing(EXCHANGE, key, body, str(uuid.uuid4()), "ProbeDone", str(uuid.uuid4()), headers)


async def test_every_message_is_confirmed_and_arrives_whole_in_order_with_its_properties(
    amqp: AbstractRobustConnection, publisher: Publisher
) -> None:
    key = unique("many")
    queue = await bound_queue(amqp, key)
    # An empty body has no body frame; one over the connection's frame size is split in three.
    bodies: Sequence[bytes] = [json.dumps({"n": i}).encode() for i in range(40)] + [b"", b"x" * 300_000]
    sent = [outgoing(key, body, traceparent=f"00-{uuid.uuid4().hex}-{'1' * 16}-01") for body in bodies]

    assert await publisher.publish_many(sent) == [None] * len(sent)

    got = await drain(queue, len(sent))
    assert [m.body for m in got] == list(bodies)
    for out, msg in zip(sent, got, strict=True):
        assert (msg.message_id, msg.type, msg.correlation_id) == (out.message_id, out.message_type, out.correlation_id)
        assert msg.headers == out.headers
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.content_type == "application/json"


async def test_an_unroutable_message_fails_alone_and_the_channel_goes_on(
    amqp: AbstractRobustConnection, publisher: Publisher
) -> None:
    key = unique("many")
    queue = await bound_queue(amqp, key)
    batch = [outgoing(key, b"1"), outgoing(unique("nobody"), b"2"), outgoing(key, b"3")]

    results = await publisher.publish_many(batch)

    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], PublishError)
    assert "unroutable" in str(results[1])
    # The delivery tags stayed in step with the broker's: later publishes, batched or not, confirm.
    assert await publisher.publish_many([outgoing(key, b"4")]) == [None]
    await publisher.publish_raw(EXCHANGE, key, b"5", message_id=str(uuid.uuid4()))
    assert [m.body for m in await drain(queue, 4)] == [b"1", b"3", b"4", b"5"]


async def test_a_message_the_broker_nacks_fails_alone(amqp: AbstractRobustConnection, publisher: Publisher) -> None:
    key = unique("many")
    # A full queue that rejects publishes: the broker nacks what it cannot take.
    queue = await bound_queue(amqp, key, **{"x-max-length": 2, "x-overflow": "reject-publish"})

    results = await publisher.publish_many([outgoing(key, str(i).encode()) for i in range(4)])

    assert results[:2] == [None, None]
    assert all(isinstance(r, PublishError) and "refused" in str(r) for r in results[2:])
    assert [m.body for m in await drain(queue, 2)] == [b"0", b"1"]


async def test_on_a_closed_channel_every_message_fails_and_nothing_raises(publisher: Publisher) -> None:
    await publisher.channel.close()

    results = await publisher.publish_many([outgoing(unique("many"), b"1"), outgoing(unique("many"), b"2")])

    assert len(results) == 2
    assert all(isinstance(r, PublishError) and "not confirmed" in str(r) for r in results)
