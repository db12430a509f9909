"""`palisade lifecycle ...` as a user runs it: a real process against the running worker."""

from __future__ import annotations

import asyncio
import os
import sys

from palisade_lifecycle.worker import spec
from tests.fixtures import AMQP_URL, unique, wait_until
from tests.provisioning import service_provisioned


async def palisade(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "palisade_events.cli.main",
        *args,
        env={**os.environ, "PALISADE_AMQP_URL": AMQP_URL, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_protect_then_delete_is_refused_and_status_says_why(run_worker, client):
    rt = await run_worker(spec())
    service_id, name = unique("svc"), "redis-cli1"
    await client.publish(
        service_provisioned(service_id, name, private_ip="10.0.0.9"),
        service_id=service_id,
    )

    async def known() -> bool:
        async with rt.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM services WHERE service_id = $1", service_id))

    await wait_until(known)
    code, out = await palisade("lifecycle", "protect", service_id, "--on")
    assert (code, "TerminationProtectionEnabled" in out) == (0, True), out
    code, out = await palisade("lifecycle", "delete", service_id, "--confirm", name)
    assert code == 1, out
    assert "ServiceDeleteRejected: termination_protection_enabled" in out
    code, out = await palisade("lifecycle", "status", service_id)
    assert code == 0, out
    assert f"{name} ({service_id}): state active, protection on, deletion none" in out
    code, out = await palisade("lifecycle", "status", "svc-nobody")
    assert (code, "rejected: unknown_service" in out) == (1, True), out
