"""GroupCommit's `pace` hook, in memory: the next batch is taken only once `pace` returns,
and what was submitted meanwhile goes in it."""

from __future__ import annotations

import asyncio

from palisade_events.group_commit import GroupCommit


async def test_the_next_batch_is_taken_once_pace_returns_with_what_came_meanwhile() -> None:
    batches: list[list[int]] = []
    go_on = asyncio.Event()
    pacing_second = asyncio.Event()
    paced = 0

    async def commit(items: list[int]) -> list[int]:
        batches.append(items)
        return items

    async def pace() -> None:
        nonlocal paced
        paced += 1
        if paced > 1:  # the first batch goes at once; the second waits for the test
            pacing_second.set()
            await go_on.wait()

    group: GroupCommit[int, int] = GroupCommit(commit, max_batch=100, pace=pace)
    group.start()
    try:
        first = [asyncio.create_task(group.submit(i)) for i in (1, 2)]
        assert await asyncio.gather(*first) == [1, 2]
        later = [asyncio.create_task(group.submit(i)) for i in (3, 4)]
        await pacing_second.wait()  # 3 and 4 are queued; the loop waits in pace, no batch in hand
        later += [asyncio.create_task(group.submit(i)) for i in (5, 6)]
        for _ in range(10):
            await asyncio.sleep(0)
        assert batches == [[1, 2]]  # held by pace
        go_on.set()
        assert await asyncio.gather(*later) == [3, 4, 5, 6]
        assert batches == [[1, 2], [3, 4, 5, 6]]
    finally:
        await group.stop()


async def test_a_stop_while_pacing_hands_every_waiting_item_back() -> None:
    never = asyncio.Event()
    pacing = asyncio.Event()

    async def commit(items: list[int]) -> list[int]:
        return items

    async def pace() -> None:
        pacing.set()
        await never.wait()

    group: GroupCommit[int, int] = GroupCommit(commit, max_batch=100, pace=pace)
    group.start()
    waiting = [asyncio.create_task(group.submit(i)) for i in (1, 2, 3)]
    await pacing.wait()
    await group.stop()
    # None: each submitter handles its item alone.
    assert await asyncio.gather(*waiting) == [None, None, None]


async def test_the_runtime_pipelines_one_batch_deep_except_in_a_backlog() -> None:
    from palisade_events import RuntimeSettings, WorkerRuntime, WorkerSpec

    rt: WorkerRuntime[None] = WorkerRuntime(WorkerSpec(name="pace-probe", handlers={}), RuntimeSettings(prefetch=8))
    loop = asyncio.get_running_loop()
    never = asyncio.Event()

    def handlings(n: int) -> set[asyncio.Task[bool]]:
        return {asyncio.create_task(never.wait()) for _ in range(n)}

    async def paced_until(done: asyncio.Future[None], other: asyncio.Future[None]) -> bool:
        """Whether the pace returns once `done` is (and not before, while `other` is pending)."""
        pace = asyncio.create_task(rt._one_batch_publishing())
        for _ in range(5):
            await asyncio.sleep(0)
        held = not pace.done()
        done.set_result(None)
        await asyncio.wait_for(pace, 5)
        return held and not other.done()

    # Light load (3 handlings in flight): the next batch waits for the batch before the last.
    rt._previous_batch_publishing, rt._batch_publishing = loop.create_future(), loop.create_future()
    rt._inflight = handlings(3)
    assert await paced_until(rt._previous_batch_publishing, rt._batch_publishing)
    # A backlog (half the prefetch in flight): it waits for the last batch, as without pipelining.
    rt._previous_batch_publishing, rt._batch_publishing = loop.create_future(), loop.create_future()
    rt._inflight = handlings(4)
    assert await paced_until(rt._batch_publishing, rt._previous_batch_publishing)
    never.set()
