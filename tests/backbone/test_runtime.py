"""The runtime against the real broker and database, through the probe worker."""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import pytest

from palisade_events.amqp import PublishError
from palisade_events.client import QueryTimeout
from palisade_events.messages import encode
from palisade_events.topology import AUDIT_EXCHANGE, COMMANDS_EXCHANGE, EVENTS_EXCHANGE, dead_queue
from tests.backbone.probe import probe_spec
from tests.fixtures import TEST_RETRY_DELAYS, unique, wait_until


async def effects(rt, message_id=None) -> int:
    async with rt.pool.acquire() as conn:
        if message_id is None:
            return await conn.fetchval("SELECT count(*) FROM effects")
        return await conn.fetchval("SELECT count(*) FROM effects WHERE message_id = $1", message_id)


async def get_parked(amqp, name: str, timeout: float = 10.0):
    channel = await amqp.channel()
    queue = await channel.declare_queue(dead_queue(name), passive=True)
    box: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def one() -> bool:
        msg = await queue.get(no_ack=True, fail=False)
        if msg is not None:
            box.append(msg)
        return bool(box)

    await wait_until(one, timeout, what=f"a message in {dead_queue(name)}")
    await channel.close()
    return box[0]


async def test_command_handled_once_even_when_delivered_twice(run_worker, client, collect):
    spec, t = probe_spec(unique("probe"))
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    audit = await collect(AUDIT_EXCHANGE, f"{spec.name}.#")
    rt = await run_worker(spec)

    env = client.envelope(t.ProbeCommand(n=7), service_id="svc-a")
    await client.publisher.publish(env)
    await client.publisher.publish(env)  # the same message id again: a redelivery
    # A later command of the same service is handled after both copies (per-service order).
    marker = await client.publish(t.ProbeCommand(n=8), service_id="svc-a")

    done = await events.wait_for(2)
    await audit.wait_for(2)
    assert [d.json()["payload"]["n"] for d in done] == [7, 8]
    assert await effects(rt, env.message_id) == 1
    assert await effects(rt, marker.message_id) == 1
    assert done[0].json()["causation_id"] == str(env.message_id)
    assert done[0].json()["correlation_id"] == str(env.correlation_id)
    records = [m.json() for m in audit.messages]
    assert [(r["action"], r["outcome"]) for r in records] == [("ProbeCommand", "accepted")] * 2


async def test_garbage_body_is_parked_with_reason_and_audited(run_worker, amqp, collect):
    spec, _ = probe_spec(unique("probe"))
    audit = await collect(AUDIT_EXCHANGE, f"{spec.name}.#")
    await run_worker(spec)

    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(COMMANDS_EXCHANGE)
    await exchange.publish(
        aio_pika.Message(b"\x00not json{", message_id=str(uuid.uuid4()), type="ProbeCommand"),
        routing_key=f"{spec.name}.ProbeCommand",
    )
    parked = await get_parked(amqp, spec.name)
    assert parked.body == b"\x00not json{"
    assert "not a Palisade envelope" in parked.headers["x-palisade-error"]
    assert parked.headers["x-palisade-attempts"] == 0
    [record] = await audit.wait_for(1)
    assert record.json()["outcome"] == "rejected"
    assert "not a Palisade envelope" in record.json()["reason"]
    await channel.close()


async def test_invalid_payload_is_parked_with_the_validation_error(run_worker, client, amqp, collect):
    spec, t = probe_spec(unique("probe"))
    audit = await collect(AUDIT_EXCHANGE, f"{spec.name}.#")
    rt = await run_worker(spec)

    env = client.envelope(t.ProbeCommand(n=1), service_id="svc-a")
    body = json.loads(encode(env))
    body["payload"] = {"n": "seven", "extra": 1}
    await client.publisher.publish_raw(
        COMMANDS_EXCHANGE, f"{spec.name}.ProbeCommand", json.dumps(body).encode(), message_id=str(env.message_id)
    )
    parked = await get_parked(amqp, spec.name)
    error = parked.headers["x-palisade-error"]
    assert "payload.n" in error
    assert "payload.extra" in error
    [record] = await audit.wait_for(1)
    assert record.json()["outcome"] == "rejected"
    assert await effects(rt) == 0


async def test_unknown_type_is_parked(run_worker, client, amqp):
    spec, t = probe_spec(unique("probe"))
    await run_worker(spec)
    env = client.envelope(t.ProbeCommand(n=1))
    body = json.loads(encode(env))
    body["type"] = "NoSuchThing"
    await client.publisher.publish_raw(
        COMMANDS_EXCHANGE, f"{spec.name}.ProbeCommand", json.dumps(body).encode(), message_id=str(env.message_id)
    )
    parked = await get_parked(amqp, spec.name)
    assert "unknown message type 'NoSuchThing'" in parked.headers["x-palisade-error"]


async def test_transient_failure_goes_round_the_ladder_then_parks(run_worker, client, amqp, collect):
    spec, t = probe_spec(unique("probe"))
    audit = await collect(AUDIT_EXCHANGE, f"{spec.name}.#")
    rt = await run_worker(spec)
    async with rt.pool.acquire() as conn:
        await conn.execute("UPDATE switch SET failing = true")

    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    env = await client.publish(t.ProbeCommand(n=3), service_id="svc-a")
    parked = await get_parked(amqp, spec.name, timeout=15)
    elapsed = loop.time() - sent_at

    # One first try plus one try per rung of the ladder, the delays really waited.
    assert parked.headers["x-palisade-attempts"] == len(TEST_RETRY_DELAYS) + 1
    assert "TransientError: probe switch says the backend is down" in parked.headers["x-palisade-error"]
    assert elapsed >= sum(TEST_RETRY_DELAYS)
    assert parked.message_id == str(env.message_id)
    [record] = await audit.wait_for(1)
    assert (record.json()["outcome"], record.json()["detail"]["attempts"]) == ("failed", 4)
    assert await effects(rt) == 0


async def test_dead_replay_brings_a_parked_command_back_and_it_succeeds(run_worker, client, amqp, collect):
    from palisade_events.dead import list_parked, replay_parked

    spec, t = probe_spec(unique("probe"))
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    rt = await run_worker(spec)
    async with rt.pool.acquire() as conn:
        await conn.execute("UPDATE switch SET failing = true")
    env = await client.publish(t.ProbeCommand(n=11), service_id="svc-a")

    async def parked() -> bool:
        return len(await list_parked(amqp, spec.name)) == 1

    await wait_until(parked, timeout=15, what="the command parked")
    [entry] = await list_parked(amqp, spec.name)
    assert entry.message_id == str(env.message_id)
    async with rt.pool.acquire() as conn:
        await conn.execute("UPDATE switch SET failing = false")  # the backend is back

    moved = await replay_parked(amqp, spec.name)
    assert [m.message_id for m in moved] == [str(env.message_id)]
    [done] = await events.wait_for(1)
    assert done.json()["causation_id"] == str(env.message_id)
    assert await effects(rt, env.message_id) == 1
    assert await list_parked(amqp, spec.name) == []


async def test_rejection_is_an_event_and_an_audit_record_not_a_failure(run_worker, client, collect, amqp):
    spec, t = probe_spec(unique("probe"))
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    audit = await collect(AUDIT_EXCHANGE, f"{spec.name}.#")
    rt = await run_worker(spec)

    await client.publish(t.ProbeCommand(n=5, reject=True), service_id="svc-a")
    [event] = await events.wait_for(1)
    [record] = await audit.wait_for(1)
    assert event.json()["payload"] == {"n": -1}
    assert record.routing_key == f"{spec.name}.ProbeCommand.rejected"
    assert record.json()["reason"] == "probe_rejected"
    assert await effects(rt) == 0
    channel = await amqp.channel()
    dead = await channel.declare_queue(dead_queue(spec.name), passive=True)
    assert dead.declaration_result.message_count == 0
    await channel.close()


async def test_query_is_answered_by_request_reply(run_worker, client):
    spec, t = probe_spec(unique("probe"))
    await run_worker(spec)
    for n in range(3):
        await client.publish(t.ProbeCommand(n=n), service_id=f"svc-{n}")

    async def three() -> bool:
        return (await client.request(t.ProbeCount(), timeout=5)).effects == 3

    await wait_until(three, what="three effects reported by the query")


async def test_query_times_out_on_the_callers_side(client, amqp, run_worker):
    spec, t = probe_spec(unique("probe"))
    rt = await run_worker(spec)
    await rt.pause()  # the queue exists, nobody answers
    with pytest.raises(QueryTimeout):
        await client.request(t.ProbeCount(), timeout=0.3)


async def test_unroutable_command_raises(client):
    _, t = probe_spec(unique("nobody"))
    with pytest.raises(PublishError, match="unroutable"):
        await client.publish(t.ProbeCommand(n=1))


async def test_two_replicas_never_double_an_effect_or_an_event(run_worker, client, collect):
    spec, t = probe_spec(unique("probe"))
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    a = await run_worker(spec, prefetch=16)
    b = await run_worker(spec, prefetch=16)
    count = 600
    sent = await asyncio.gather(
        *(client.publish(t.ProbeCommand(n=i), service_id=f"svc-{i % 37}") for i in range(count))
    )
    await events.wait_for(count, timeout=60)
    async with a.pool.acquire() as conn:
        rows = await conn.fetch("SELECT message_id, count(*) AS c FROM effects GROUP BY message_id")
    assert len(rows) == count
    assert all(r["c"] == 1 for r in rows)
    assert {r["message_id"] for r in rows} == {e.message_id for e in sent}
    # Without crashes each event leaves exactly once, though two relays share the outbox.
    # Stop both (flushing), then send a sentinel: everything confirmed before it is ahead of it.
    await a.stop()
    await b.stop()
    sentinel = await client.publish(t.ProbeDone(n=-99))
    await wait_until(lambda: any(m.message_id == str(sentinel.message_id) for m in events.messages))
    ids = [m.message_id for m in events.messages if m.message_id != str(sentinel.message_id)]
    assert len(ids) == len(set(ids)) == count
    assert a.handled > 0, "replica a did nothing"
    assert b.handled > 0, "replica b did nothing"
    assert a.handled + b.handled == count


async def test_messages_of_one_service_are_handled_in_order(run_worker, client, collect):
    spec, t = probe_spec(unique("probe"))
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    rt = await run_worker(spec, prefetch=64)
    for i in range(200):
        await client.publish(t.ProbeCommand(n=i), service_id=f"svc-{i % 2}")
    await events.wait_for(200, timeout=30)
    async with rt.pool.acquire() as conn:
        rows = await conn.fetch("SELECT n FROM effects ORDER BY id")
    for parity in (0, 1):
        seq = [r["n"] for r in rows if r["n"] % 2 == parity]
        assert seq == sorted(seq)


async def test_graceful_stop_finishes_in_flight_work_and_flushes_the_outbox(client, collect, amqp):
    from palisade_events import WorkerRuntime
    from tests.fixtures import drop_worker_state, settings_for_test

    spec, t = probe_spec(unique("probe"))
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    rt = WorkerRuntime(spec, settings_for_test())
    await rt.start()
    try:
        await asyncio.gather(*(client.publish(t.ProbeCommand(n=i), service_id=f"s{i}") for i in range(300)))
        await wait_until(lambda: bool(events.messages), what="first events")
        await rt.stop()
        handled = await _count_in_schema(spec.name, "SELECT count(*) FROM effects")
        unpublished = await _count_in_schema(spec.name, "SELECT count(*) FROM outbox WHERE published_at IS NULL")
        assert unpublished == 0
        await events.wait_for(handled, timeout=10)
    finally:
        await rt.stop()
        await drop_worker_state(spec.name, amqp)


async def _count_in_schema(name: str, sql: str) -> int:
    import asyncpg

    from palisade_events.db import schema_name
    from tests.fixtures import DATABASE_URL

    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": schema_name(name)})
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_metrics_and_health_are_served(run_worker, client):
    import httpx

    spec, t = probe_spec(unique("probe"))
    rt = await run_worker(spec)
    await client.publish(t.ProbeCommand(n=1), service_id="svc-a")
    base = f"http://127.0.0.1:{rt.metrics_port}"

    async def counted() -> bool:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{base}/metrics")).text
        return f'palisade_messages_total{{outcome="handled",type="ProbeCommand",worker="{spec.name}"}} 1.0' in text

    await wait_until(counted, what="the handled message in /metrics")
    async with httpx.AsyncClient() as http:
        health = await http.get(f"{base}/healthz")
    assert health.status_code == 200
    assert health.json() == {"ready": True}


async def test_a_handler_is_not_cut_when_its_channel_closes_under_it(run_worker, client, collect):
    """aiormq throws into every consumer task of a channel that closes (the broker went away).
    The handling must finish anyway: a handler cut after its COMMIT left an effect that was
    never counted, and one cut before ran a second time on the redelivery."""
    from importlib.resources import files

    from prometheus_client import REGISTRY

    from palisade_events import WorkerSpec
    from tests.backbone.probe import probe_types

    name = unique("probe")
    t = probe_types(name)
    entered = 0
    inside, release = asyncio.Event(), asyncio.Event()

    async def on_command(cmd, ctx) -> None:
        nonlocal entered
        entered += 1
        await ctx.db.execute("INSERT INTO effects (message_id, n) VALUES ($1, $2)", ctx.envelope.message_id, cmd.n)
        inside.set()
        await release.wait()  # the channel closes here
        await ctx.emit(t.ProbeDone(n=cmd.n))

    spec = WorkerSpec(
        name=name, handlers={t.ProbeCommand: on_command}, migrations=files("tests.backbone") / "probe_migrations"
    )
    events = await collect(EVENTS_EXCHANGE, f"{name}.ProbeDone")
    rt = await run_worker(spec)

    def duplicates() -> float:
        labels = {"worker": name, "type": "ProbeCommand", "outcome": "duplicate"}
        return REGISTRY.get_sample_value("palisade_messages_total", labels) or 0.0

    env = await client.publish(t.ProbeCommand(n=5), service_id="svc-a")
    await wait_until(inside.is_set, what="the handler running")
    # A channel error makes the broker close the consumer's channel, as a broker leaving does.
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await rt._queue.channel.declare_queue(unique("absent"), passive=True)
    release.set()

    await events.wait_for(1)
    await wait_until(lambda: duplicates() >= 1, what="the redelivery recognised by the inbox")
    assert entered == 1, "the handler ran again: its first run was cut"
    assert rt.handled == 1
    assert await effects(rt, env.message_id) == 1


async def test_retry_queues_from_before_the_ladder_exchange_are_kept_and_still_retry(amqp, client, caplog):
    """A broker upgraded from a Palisade whose retry queues dead-lettered through the default
    exchange: redeclaring them with other arguments is refused (PRECONDITION_FAILED), and
    deleting them could drop waiting retries. The worker starts anyway and uses them."""
    import logging

    from palisade_events import WorkerRuntime
    from palisade_events.topology import retry_queue, retry_queue_arguments
    from tests.fixtures import drop_worker_state, settings_for_test

    spec, t = probe_spec(unique("probe"))
    channel = await amqp.channel()
    for delay in TEST_RETRY_DELAYS:
        legacy = {**retry_queue_arguments(spec.name, delay), "x-dead-letter-exchange": ""}
        await channel.declare_queue(retry_queue(spec.name, delay), durable=True, arguments=legacy)
    await channel.close()
    rt = WorkerRuntime(spec, settings_for_test())
    try:
        with caplog.at_level(logging.WARNING, logger="palisade_events.topology"):
            await rt.start()
        kept = [r.getMessage() for r in caplog.records if "predates palisade.ladder" in r.getMessage()]
        assert len(kept) == len(TEST_RETRY_DELAYS), kept
        async with rt.pool.acquire() as conn:
            await conn.execute("UPDATE switch SET failing = true")
        env = await client.publish(t.ProbeCommand(n=3), service_id="svc-a")
        parked = await get_parked(amqp, spec.name, timeout=15)
        # Every rung was taken: published to the old queues through palisade.ladder, back
        # through the default exchange, counted from x-death as before.
        assert parked.message_id == str(env.message_id)
        assert parked.headers["x-palisade-attempts"] == len(TEST_RETRY_DELAYS) + 1
    finally:
        await rt.stop()
        await drop_worker_state(spec.name, amqp)


async def test_a_slow_handling_holds_back_no_other_ack_and_every_message_is_acked(run_worker, client, collect):
    """Acks leave in runs (acks.py); one behind a handling still in progress goes alone at once.
    With a prefetch of 2, one slow message and an ack held back behind it would stall the
    consumer after the next message. At the end nothing is left unacked: a second worker on the
    queue finds no redelivery before a message sent last."""
    from importlib.resources import files

    from prometheus_client import REGISTRY

    from palisade_events import WorkerSpec
    from tests.backbone.probe import probe_types

    name = unique("probe")
    t = probe_types(name)
    release = asyncio.Event()

    async def on_command(cmd, ctx) -> None:
        if cmd.n == 0:
            await release.wait()
        await ctx.db.execute("INSERT INTO effects (message_id, n) VALUES ($1, $2)", ctx.envelope.message_id, cmd.n)
        await ctx.emit(t.ProbeDone(n=cmd.n))

    spec = WorkerSpec(
        name=name, handlers={t.ProbeCommand: on_command}, migrations=files("tests.backbone") / "probe_migrations"
    )
    events = await collect(EVENTS_EXCHANGE, f"{name}.ProbeDone")
    rt = await run_worker(spec, prefetch=2)
    await client.publish(t.ProbeCommand(n=0), service_id="svc-slow")
    for i in range(1, 21):
        await client.publish(t.ProbeCommand(n=i), service_id=f"svc-{i}")
    done = await events.wait_for(20, timeout=20)
    assert sorted(d.json()["payload"]["n"] for d in done) == list(range(1, 21))
    release.set()
    await events.wait_for(21, timeout=10)
    await rt.stop()  # closes its channel: the broker would requeue anything left unacked

    def duplicates() -> float:
        labels = {"worker": name, "type": "ProbeCommand", "outcome": "duplicate"}
        return REGISTRY.get_sample_value("palisade_messages_total", labels) or 0.0

    second = await run_worker(spec, prefetch=1)  # one at a time, in queue order
    await client.publish(t.ProbeCommand(n=99), service_id="svc-last")
    await events.wait_for(22, timeout=10)
    assert duplicates() == 0, "a handled message came back: its ack was never sent"
    assert second.handled == 1
