"""Acknowledgements in as few frames as the order of the handlings allows.

A worker handles a channel's deliveries concurrently (different services), so they end
out of order. Each ended handling wants its ack, and an ack of its own costs the broker a
frame and, for a quorum queue, a settle command in its log per message. Here the acks
wanted during one turn of the event loop leave at the end of that turn: the run of ended
deliveries at the head of the channel's outstanding ones as one `multiple` ack, each ended
delivery behind one still in progress with an ack of its own. So no ack waits for a
slow handling (which would fill the prefetch window and stall the consumer), and a batch
committed together is acked in one frame.

`ChannelAcks` is the bookkeeping (pure); `Acker` keeps one per channel and sends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiormq.abc
from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger("palisade.acks")

# An ack is one frame for the connection's writer queue: this only ends one that can never be
# queued. (When the runtime awaited each ack's write, a connection closing in between, a broker
# restart, once left that wait unanswered and held up every later message of its service for
# good: the RabbitMQ fault test, 1 run in about 7.)
ACK_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class AckPlan:
    """One channel's acks to send: a `multiple` ack up to `up_to` (if any), then `singles`."""

    up_to: int | None
    singles: tuple[int, ...]


@dataclass
class ChannelAcks:
    """A channel's delivery tags handed to the worker and not yet acked, in delivery order
    (tags grow on a channel), each with whether its handling ended."""

    outstanding: dict[int, bool] = field(default_factory=dict)

    def delivered(self, tag: int) -> None:
        self.outstanding[tag] = False

    def ended(self, tag: int) -> None:
        if tag in self.outstanding:
            self.outstanding[tag] = True

    def forget(self, tag: int) -> None:
        """Settled otherwise (nacked back to the queue): no ack, and no longer in the way."""
        self.outstanding.pop(tag, None)

    def plan(self) -> AckPlan | None:
        """The acks that settle every ended delivery; those stop being outstanding."""
        up_to: int | None = None
        for tag, ended in self.outstanding.items():
            if not ended:
                break
            up_to = tag
        if up_to is not None:
            for tag in [t for t in self.outstanding if t <= up_to]:
                del self.outstanding[tag]
        singles = tuple(t for t, ended in self.outstanding.items() if ended)
        for tag in singles:
            del self.outstanding[tag]
        return AckPlan(up_to, singles) if up_to is not None or singles else None


class _Channel:
    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel  # held: its id keys it, and a live object's id is not reused
        self.acks = ChannelAcks()


class Acker:
    """Collects the acks a worker's handlings want and sends them at the end of the loop turn."""

    def __init__(self) -> None:
        self._channels: dict[int, _Channel] = {}  # id(channel) -> its bookkeeping
        self._of: dict[int, _Channel] = {}  # id(message) -> its channel's, from delivery to settling
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """Call in delivery order, as the delivery arrives (its channel is open then)."""
        tag = message.delivery_tag
        if tag is None:
            return
        try:
            channel = message.channel
        except aiormq.exceptions.ChannelInvalidStateError:
            return  # closed already: the broker requeues the message; nothing to ack
        state = self._channels.get(id(channel))
        if state is None:
            state = self._channels[id(channel)] = _Channel(channel)
        state.acks.delivered(tag)
        self._of[id(message)] = state

    def ack(self, message: AbstractIncomingMessage) -> None:
        """The handling ended, its effects committed: ack it at the end of this loop turn."""
        state = self._of.pop(id(message), None)
        if state is None or message.delivery_tag is None:
            return
        state.acks.ended(message.delivery_tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def forget(self, message: AbstractIncomingMessage) -> None:
        """The message is nacked instead: it needs no ack."""
        state = self._of.pop(id(message), None)
        if state is not None and message.delivery_tag is not None:
            state.acks.forget(message.delivery_tag)

    async def drain(self) -> None:
        """Send what is wanted now and wait until every ack so far has been handed over."""
        self._flush()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    def _flush(self) -> None:
        self._scheduled = False
        for key, state in list(self._channels.items()):
            if state.channel.is_closed:
                # The broker requeued whatever this channel had not acked; the inbox knows
                # the redeliveries of what was handled.
                del self._channels[key]
                continue
            plan = state.acks.plan()
            if plan is None:
                if not state.acks.outstanding:
                    del self._channels[key]  # rebuilt at its next delivery
                continue
            task = asyncio.create_task(self._send(state.channel, plan))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    @staticmethod
    async def _send(channel: aiormq.abc.AbstractChannel, plan: AckPlan) -> None:
        acks = [(plan.up_to, True)] if plan.up_to is not None else []
        acks += [(tag, False) for tag in plan.singles]
        try:
            async with asyncio.timeout(ACK_TIMEOUT_SECONDS):
                for tag, multiple in acks:
                    # Queued for the connection's writer in this order, not awaited one by one.
                    await channel.basic_ack(tag, multiple=multiple, wait=False)
        except Exception as exc:  # noqa: BLE001
            # The channel went away after the commits: the broker redelivers and the inbox
            # recognises the messages, so no second effect.
            log.info("ack failed (%r); the redelivery will be deduplicated", exc)
