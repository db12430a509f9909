"""The ack bookkeeping (acks.ChannelAcks): which acks settle the ended deliveries."""

from __future__ import annotations

from palisade_events.acks import AckPlan, ChannelAcks


def channel_with(*tags: int) -> ChannelAcks:
    acks = ChannelAcks()
    for tag in tags:
        acks.delivered(tag)
    return acks


def test_nothing_ended_nothing_to_send() -> None:
    acks = channel_with(1, 2, 3)
    assert acks.plan() is None
    assert list(acks.outstanding) == [1, 2, 3]


def test_the_ended_run_at_the_head_is_one_multiple_ack() -> None:
    acks = channel_with(1, 2, 3, 4)
    for tag in (2, 1, 3):  # ended out of order, within one loop turn
        acks.ended(tag)
    assert acks.plan() == AckPlan(up_to=3, singles=())
    assert list(acks.outstanding) == [4]
    assert acks.plan() is None


def test_an_ended_delivery_behind_one_in_progress_is_acked_alone_at_once() -> None:
    # Holding 3 and 4 back until 2 ends would keep them counted against the prefetch window:
    # a slow handling could then stall the whole consumer.
    acks = channel_with(1, 2, 3, 4, 5)
    for tag in (1, 3, 4):
        acks.ended(tag)
    assert acks.plan() == AckPlan(up_to=1, singles=(3, 4))
    assert list(acks.outstanding) == [2, 5]
    acks.ended(2)
    assert acks.plan() == AckPlan(up_to=2, singles=())
    acks.ended(5)
    assert acks.plan() == AckPlan(up_to=5, singles=())
    assert not acks.outstanding


def test_a_multiple_ack_never_covers_a_delivery_in_progress() -> None:
    acks = channel_with(1, 2, 3)
    acks.ended(3)
    plan = acks.plan()
    assert plan == AckPlan(up_to=None, singles=(3,))
    assert list(acks.outstanding) == [1, 2]


def test_a_nacked_delivery_is_out_of_the_way() -> None:
    acks = channel_with(1, 2, 3)
    acks.forget(2)  # requeued: its tag must not be acked, and must not hold 3 back
    acks.ended(1)
    acks.ended(3)
    assert acks.plan() == AckPlan(up_to=3, singles=())


def test_an_unknown_tag_is_ignored() -> None:
    acks = channel_with(1)
    acks.ended(7)
    acks.forget(8)
    assert acks.plan() is None
    assert list(acks.outstanding) == [1]
