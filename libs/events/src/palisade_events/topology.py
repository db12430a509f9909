"""Names and declaration of every exchange and queue. Declared idempotently at each start.

- `palisade.commands` (topic): commands and queries, routing key `<worker>.<Type>`.
- `palisade.events` (topic): events, `<owner>.<Type>`; integration events arrive here too.
- `palisade.audit` (topic): audit records, `<worker>.<action>.<outcome>`.
- `palisade.events.log` / `palisade.audit.log`: streams bound to everything, so an
  event nobody subscribes to yet is still routed (not an unroutable publish) and the
  audit history can be read back (`palisade audit tail`).
- `palisade.ladder` (topic): a worker's ways into its own queues (retry, park, replay,
  and the retry queues' dead-lettering back), routing key = the queue's name. Not the
  default exchange: RabbitMQ cannot limit who writes to which queue through that one,
  while topic permissions limit each worker's user to its own queue names.
- `palisade.replies` (direct): query replies; a caller binds its exclusive reply queue
  with the queue's own name and sets that name as `reply_to`.
- per worker: quorum queue `palisade.<w>`, retry queues `palisade.<w>.retry.<ms>ms`
  (TTL, dead-letter back to the work queue), parking queue `palisade.<w>.dead`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, ExchangeType
from aiormq.abc import FieldTable

COMMANDS_EXCHANGE = "palisade.commands"
EVENTS_EXCHANGE = "palisade.events"
AUDIT_EXCHANGE = "palisade.audit"
EVENTS_LOG = "palisade.events.log"
AUDIT_LOG = "palisade.audit.log"
LADDER_EXCHANGE = "palisade.ladder"
REPLIES_EXCHANGE = "palisade.replies"

log = logging.getLogger(__name__)

STREAM_ARGS: FieldTable = {
    "x-queue-type": "stream",
    "x-max-age": "7D",
    "x-max-length-bytes": 2_000_000_000,
    "x-stream-max-segment-size-bytes": 50_000_000,
}


def work_queue(worker: str) -> str:
    return f"palisade.{worker}"


def dead_queue(worker: str) -> str:
    return f"palisade.{worker}.dead"


def retry_queue(worker: str, delay_seconds: float) -> str:
    return f"palisade.{worker}.retry.{round(delay_seconds * 1000)}ms"


def retry_prefix(worker: str) -> str:
    return f"palisade.{worker}.retry."


@dataclass(frozen=True)
class Binding:
    exchange: str
    routing_key: str


async def declare_exchanges(channel: AbstractChannel) -> None:
    for name in (COMMANDS_EXCHANGE, EVENTS_EXCHANGE, AUDIT_EXCHANGE, LADDER_EXCHANGE):
        await channel.declare_exchange(name, ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(REPLIES_EXCHANGE, ExchangeType.DIRECT, durable=True)
    for stream, exchange in ((EVENTS_LOG, EVENTS_EXCHANGE), (AUDIT_LOG, AUDIT_EXCHANGE)):
        q = await channel.declare_queue(stream, durable=True, arguments=STREAM_ARGS)
        await q.bind(exchange, "#")


async def shared_topology_declared(connection: AbstractConnection) -> bool:
    """Whether the exchanges and logs exist already, checked passively (no permission needed).

    Where an operator loaded them (deploy/rabbitmq/definitions.json), a worker's user has no
    configure permission on them, so that no worker can delete the audit log or an exchange;
    declaring them again would be refused."""
    channel = await connection.channel()
    try:
        for name in (COMMANDS_EXCHANGE, EVENTS_EXCHANGE, AUDIT_EXCHANGE, LADDER_EXCHANGE):
            await channel.declare_exchange(name, ExchangeType.TOPIC, passive=True)
        await channel.declare_exchange(REPLIES_EXCHANGE, ExchangeType.DIRECT, passive=True)
        for stream in (EVENTS_LOG, AUDIT_LOG):
            await channel.declare_queue(stream, passive=True)
    except aio_pika.exceptions.ChannelClosed:  # NOT_FOUND closes the channel
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def declare_worker(
    channel: AbstractChannel,
    worker: str,
    bindings: Iterable[Binding],
    retry_delays: Sequence[float],
    *,
    declare_shared: bool = True,
) -> aio_pika.abc.AbstractQueue:
    """Declare a worker's queues and bindings (and the shared exchanges and logs unless
    `declare_shared` is false); returns the work queue."""
    if declare_shared:
        await declare_exchanges(channel)
    queue = await channel.declare_queue(work_queue(worker), durable=True, arguments={"x-queue-type": "quorum"})
    for b in bindings:
        await queue.bind(b.exchange, b.routing_key)
    await queue.bind(LADDER_EXCHANGE, queue.name)
    for delay in retry_delays:
        retry = await _declare_retry_queue(channel, worker, delay)
        await retry.bind(LADDER_EXCHANGE, retry.name)
    dead = await channel.declare_queue(dead_queue(worker), durable=True, arguments={"x-queue-type": "quorum"})
    await dead.bind(LADDER_EXCHANGE, dead.name)
    return queue


def retry_queue_arguments(worker: str, delay_seconds: float) -> FieldTable:
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": round(delay_seconds * 1000),
        "x-dead-letter-exchange": LADDER_EXCHANGE,
        "x-dead-letter-routing-key": work_queue(worker),
        # at-least-once dead-lettering: the broker keeps the message until
        # the work queue confirmed it, so a retry cannot vanish in between.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def _declare_retry_queue(channel: AbstractChannel, worker: str, delay: float) -> aio_pika.abc.AbstractQueue:
    name = retry_queue(worker, delay)
    try:
        return await channel.declare_queue(name, durable=True, arguments=retry_queue_arguments(worker, delay))
    except aio_pika.exceptions.ChannelPreconditionFailed:
        # Declared by a Palisade before palisade.ladder, dead-lettering through the default
        # exchange: it still works (the broker's own dead-lettering needs no permission), and
        # deleting it could drop retries waiting in it, so it stays. The refusal closed the
        # channel; a robust channel reopens with its QoS and declarations.
        await channel.reopen()
        log.warning(
            "retry queue %s predates palisade.ladder and is kept as it is; delete it once it is "
            "empty so the next start declares it anew (see deploy/rabbitmq/README.md)",
            name,
        )
        return await channel.get_queue(name, ensure=False)


def attempts_from_x_death(headers: Mapping[str, object] | None, worker: str) -> int:
    """How many times the message already went round the retry ladder.

    Counted from the broker's `x-death` header (one entry per retry queue, each
    with a count), so the number survives restarts and redeliveries.
    """
    if not headers:
        return 0
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return 0
    prefix = retry_prefix(worker)
    total = 0
    for entry in deaths:
        if not isinstance(entry, dict):
            continue
        queue = entry.get("queue")
        if isinstance(queue, bytes):
            queue = queue.decode()
        if isinstance(queue, str) and queue.startswith(prefix):
            count = entry.get("count", 1)
            total += int(count) if isinstance(count, int) else 1
    return total
