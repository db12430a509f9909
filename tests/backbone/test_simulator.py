"""The platform simulator answers lifecycle the way the orchestrator and backup system would."""

from __future__ import annotations

import asyncio
import uuid

from palisade_events.contract import lifecycle as lc
from palisade_events.simulator import PlatformSimulator, simulated_services
from palisade_events.topology import EVENTS_EXCHANGE
from palisade_lifecycle.worker import spec
from tests.fixtures import unique, wait_until


async def test_simulator_drives_a_delete_to_termination_and_purge(run_worker, client, collect, amqp):
    events = await collect(EVENTS_EXCHANGE, "#")
    rt = await run_worker(spec())
    prefix = unique("sim")
    [ok, failing] = simulated_services(2, prefix)
    sim = PlatformSimulator(
        client, services=[ok, failing], backup_delay=0.05, fail_backups={failing.service_id}, queue_name=unique("sim")
    )
    await sim.start()
    await sim.provision_all()

    async def known(service_id: str) -> bool:
        async with rt.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM services WHERE service_id = $1", service_id))

    await wait_until(lambda: known(ok.service_id))
    await wait_until(lambda: known(failing.service_id))

    def types_for(service_id: str) -> list[str]:
        return [m.json()["type"] for m in events.messages if m.json().get("service_id") == service_id]

    delete = await client.publish(lc.ServiceDeleteRequested(confirm_name=ok.name), service_id=ok.service_id)
    await client.publish(lc.ServiceDeleteRequested(confirm_name=failing.name), service_id=failing.service_id)
    await wait_until(lambda: "ServiceDeprovisioned" in types_for(ok.service_id), what="simulated deprovisioning")
    await wait_until(lambda: "ServiceDeletionHalted" in types_for(failing.service_id), what="halted deletion")
    seen = types_for(ok.service_id)
    order = [
        "BackupRequested",
        "BackupCompleted",
        "ServiceTerminationApproved",
        "ServiceTerminated",
        "ServiceDeprovisioned",
    ]
    assert [seen.index(t) for t in order] == sorted(seen.index(t) for t in order), seen
    assert "BackupRetained" in seen
    assert "ServiceTerminationApproved" not in types_for(failing.service_id)
    # The whole chain is one user action: one correlation id from the delete to the deprovisioning.
    chain = [m.json() for m in events.messages if m.json().get("service_id") == ok.service_id][-6:]
    assert {c["correlation_id"] for c in chain} == {str(delete.correlation_id)}
    await asyncio.gather(*sim._tasks)
    channel = await amqp.channel()
    await channel.queue_delete(sim.queue_name)
    await channel.close()


async def test_simulator_answers_continue_the_trace_of_the_message_they_answer(client, collect, amqp):
    """The orchestrator's and backup system's answers stay in the user action's trace, so a
    delete is one trace from the click through the backup to the deprovisioning."""
    from opentelemetry.sdk.trace import TracerProvider

    events = await collect(EVENTS_EXCHANGE, "backup.BackupCompleted")
    [svc] = simulated_services(1, unique("sim"))
    sim = PlatformSimulator(client, services=[svc], backup_delay=0.01, queue_name=unique("sim"))
    await sim.start()
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("user deletes") as root:
        await client.publish(lc.BackupRequested(request_id=uuid.uuid4()), service_id=svc.service_id)
    [answer] = await events.wait_for(1)
    assert answer.headers["traceparent"].split("-")[1] == f"{root.get_span_context().trace_id:032x}"
    await asyncio.gather(*sim._tasks)
    channel = await amqp.channel()
    await channel.queue_delete(sim.queue_name)
    await channel.close()
