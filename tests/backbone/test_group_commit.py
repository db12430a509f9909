"""Group commit (WorkerSpec.group_commit) through the probe worker, the real broker and database."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from palisade_events import Context, Rejected
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from tests.backbone.probe import probe_spec
from tests.backbone.test_runtime import effects, get_parked
from tests.fixtures import TEST_RETRY_DELAYS, unique, wait_until


def batches_committed(worker: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("palisade_group_commit_messages_count", {"worker": worker}) or 0.0


def committed_together(worker: str) -> float:
    """Messages the worker committed in batches of two or more (palisade_group_commit_messages)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("palisade_group_commit_messages_sum", {"worker": worker}) or 0.0


async def paused_group_committer(run_worker, collect, **settings):  # type: ignore[no-untyped-def]
    """A probe worker with group commit, its events and audit collected, its consumer paused:
    what is published now becomes a backlog the broker hands over a prefetch at a time."""
    spec, t = probe_spec(unique("probe"))
    spec = dataclasses.replace(spec, group_commit=True)
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    audit = await collect(AUDIT_EXCHANGE, f"{spec.name}.#")
    rt = await run_worker(spec, **settings)
    await rt.pause()
    return rt, t, events, audit


async def test_a_backlog_is_committed_in_batches_each_effect_once(run_worker, client, collect):
    rt, t, events, audit = await paused_group_committer(run_worker, collect)
    sent = [await client.publish(t.ProbeCommand(n=i), service_id=f"svc-{i % 50}") for i in range(300)]
    again = client.envelope(t.ProbeCommand(n=300), service_id="svc-0")
    await client.publisher.publish(again)
    await client.publisher.publish(again)  # a redelivery, quite possibly in the same batch
    await rt.resume()

    done = await events.wait_for(301, timeout=30)
    await audit.wait_for(301, timeout=30)
    assert sorted(d.json()["payload"]["n"] for d in done) == list(range(301))
    assert await effects(rt) == 301
    for env in [*sent, again]:
        assert await effects(rt, env.message_id) == 1
    assert committed_together(rt.name) >= 2, "no two messages were ever committed together"
    assert rt.handled == 301
    # One service's messages still in order: its events left in the order its commands came.
    for s in range(50):
        ns = [d.json()["payload"]["n"] for d in done if d.json()["service_id"] == f"svc-{s}"]
        assert ns == sorted(ns), s


async def test_a_rejection_rolls_its_batch_back_and_every_message_is_handled_alone(run_worker, client, collect):
    rt, t, events, audit = await paused_group_committer(run_worker, collect)
    rejected = {i for i in range(120) if i % 7 == 3}
    for i in range(120):
        await client.publish(t.ProbeCommand(n=i, reject=i in rejected), service_id=f"svc-{i % 40}")
    await rt.resume()

    records = await audit.wait_for(120, timeout=30)
    done = await events.wait_for(120, timeout=30)
    outcomes = sorted(r.json()["outcome"] for r in records)
    assert outcomes == sorted(["rejected"] * len(rejected) + ["accepted"] * (120 - len(rejected)))
    # The rejected ones left their rejection event (n = -1) and no effect; every other one exactly one.
    assert sorted(d.json()["payload"]["n"] for d in done) == sorted(
        [-1] * len(rejected) + [i for i in range(120) if i not in rejected]
    )
    assert await effects(rt) == 120 - len(rejected)
    assert rt.handled == 120


async def test_a_batch_commits_while_the_one_before_is_confirmed_and_none_is_acked_before_its_events_left(
    run_worker, client, collect
):
    # A long grace: the relay's poll must not publish the rows held below (it would send them twice).
    rt, t, events, _ = await paused_group_committer(run_worker, collect, outbox_grace_seconds=60, prefetch=1000)
    # Every publishing of the worker's committed rows waits here until the test lets it go
    # (then goes to the real broker).
    gate = asyncio.Event()
    publish = rt.relay.publish_committed

    async def held(written):
        await gate.wait()
        await publish(written)

    rt.relay.publish_committed = held
    for i in range(200):
        await client.publish(t.ProbeCommand(n=i), service_id=f"svc-{i % 100}")
    await rt.resume()

    # A second batch commits while the first one's events are held.
    await wait_until(lambda: batches_committed(rt.name) >= 2, timeout=20, what="a second batch committed")
    # One deep: more messages, of services with nothing in flight, wait for the group; no third
    # batch is taken while the first one's events are held.
    for i in range(200, 250):
        await client.publish(t.ProbeCommand(n=i), service_id=f"svc-{i}")
    assert rt._group is not None
    group = rt._group
    await wait_until(lambda: len(group._queue) >= 50, timeout=20, what="the next messages queued for a batch")
    assert batches_committed(rt.name) == 2
    # And no message has finished (it would be acked) before its events left.
    assert rt.handled == 0

    gate.set()
    done = await events.wait_for(250, timeout=30)
    assert sorted(d.json()["payload"]["n"] for d in done) == list(range(250))
    assert rt.handled == 250
    assert batches_committed(rt.name) > 2
    for s in range(100):
        ns = [d.json()["payload"]["n"] for d in done if d.json()["service_id"] == f"svc-{s}"]
        assert ns == sorted(ns), s


async def test_writes_left_for_the_commit_land_once_go_with_rejections_and_fail_their_message_alone(
    run_worker, client, collect, amqp
):
    """Context.write_at_commit under group commit: a batch's writes are sent together after its
    handlers; a rejection drops its message's; a failing one fails its own message only."""
    rt, t, events, audit = await paused_group_committer(run_worker, collect)
    seen_before_commit: list[int] = []

    async def on_command(cmd: Any, ctx: Context[None]) -> None:
        message_id = ctx.envelope.message_id if ctx.envelope else None
        # n = 13 breaks the table's NOT NULL, at the COMMIT, not here.
        ctx.write_at_commit(
            "INSERT INTO effects (message_id, n) VALUES ($1, $2)", message_id, None if cmd.n == 13 else cmd.n
        )
        ctx.write_at_commit(
            "INSERT INTO service_state (service_id, handled) VALUES ($1, 1)"
            " ON CONFLICT (service_id) DO UPDATE SET handled = service_state.handled + 1",
            ctx.service_id or "",
        )
        # Not sent yet: the handler's own reads do not see them.
        seen_before_commit.append(
            await ctx.db.fetchval("SELECT count(*) FROM effects WHERE message_id = $1", message_id)
        )
        if cmd.reject:
            raise Rejected("probe_rejected", t.ProbeDone(n=-1))
        await ctx.emit(t.ProbeDone(n=cmd.n))

    rt.spec.handlers[t.ProbeCommand] = on_command  # type: ignore[index]
    rejected = {i for i in range(150) if i % 11 == 5}
    sent = {}
    for i in range(150):
        sent[i] = await client.publish(t.ProbeCommand(n=i, reject=i in rejected), service_id=f"svc-{i % 50}")
    await rt.resume()

    parked = await get_parked(amqp, rt.name, timeout=15)
    assert parked.message_id == str(sent[13].message_id)
    assert "NotNullViolationError" in parked.headers["x-palisade-error"]
    assert parked.headers["x-palisade-attempts"] == len(TEST_RETRY_DELAYS) + 1
    done = await events.wait_for(149, timeout=30)
    assert sorted(d.json()["payload"]["n"] for d in done) == sorted(
        [-1] * len(rejected) + [i for i in range(150) if i not in rejected and i != 13]
    )
    assert committed_together(rt.name) >= 2, "no two messages were ever committed together"
    # Every accepted message's writes landed once; a rejected or failed one's not at all.
    for i, env in sent.items():
        assert await effects(rt, env.message_id) == (0 if i in rejected or i == 13 else 1), i
    async with rt.pool.acquire() as conn:
        handled = {r["service_id"]: r["handled"] for r in await conn.fetch("SELECT * FROM service_state")}
    expected: dict[str, int] = {}
    for i in range(150):
        if i not in rejected and i != 13:
            expected[f"svc-{i % 50}"] = expected.get(f"svc-{i % 50}", 0) + 1
    assert handled == expected
    assert set(seen_before_commit) == {0}
    records = await audit.wait_for(150, timeout=30)
    outcomes = sorted(r.json()["outcome"] for r in records)
    assert outcomes == sorted(["rejected"] * len(rejected) + ["accepted"] * (149 - len(rejected)) + ["failed"])


async def test_a_transaction_of_a_job_sends_its_writes_at_commit_and_drops_them_on_a_raise(run_worker):
    spec, _ = probe_spec(unique("probe"))
    rt = await run_worker(spec)
    async with rt.transaction() as ctx:
        ctx.write_at_commit("INSERT INTO effects (n) VALUES ($1)", 1)
    try:
        async with rt.transaction() as ctx:
            ctx.write_at_commit("INSERT INTO effects (n) VALUES ($1)", 2)
            raise ZeroDivisionError
    except ZeroDivisionError:
        pass
    async with rt.pool.acquire() as conn:
        assert [r["n"] for r in await conn.fetch("SELECT n FROM effects")] == [1]
