"""examples/: the Node.js publisher and audit subscriber against a real worker.

Proof that the contract needs no Python: the schemas are exported to a directory, the Node scripts
validate with ajv against them, route by the AsyncAPI document and talk AMQP with amqplib to the
lifecycle worker running here (in this session's vhost)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from palisade_events.schema_export import export
from palisade_events.topology import AUDIT_EXCHANGE, COMMANDS_EXCHANGE
from palisade_lifecycle.worker import spec
from tests.fixtures import AMQP_URL, Collector, unique, wait_until
from tests.provisioning import service_provisioned

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NPM_CACHE = EXAMPLES / ".npm-cache"  # gitignored, like node_modules: warm after the first run
COMMAND = "TerminationProtectionEnableRequested"  # lifecycle's: the worker this test runs
PROCESS_TIMEOUT = 20.0


@dataclass
class Done:
    code: int
    out: str
    err: str


def node_env() -> dict[str, str]:
    return {**os.environ, "PALISADE_AMQP_URL": AMQP_URL, "NO_COLOR": "1"}


async def run(*args: str, cwd: Path = EXAMPLES, timeout: float = PROCESS_TIMEOUT) -> Done:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=node_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(args)} did not finish within {timeout}s") from None
    return Done(proc.returncode or 0, out.decode(), err.decode())


@pytest.fixture(scope="module")
async def node_modules() -> Path:
    """`npm ci` from package-lock.json, the npm cache kept in examples/.npm-cache."""
    npm = shutil.which("npm")
    assert npm, "npm (Node.js 20) is needed for the examples"
    done = await run(npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", "--cache", str(NPM_CACHE), timeout=120)
    assert done.code == 0, done.err
    return EXAMPLES / "node_modules"


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `palisade schema export --out DIR` writes."""
    out = tmp_path_factory.mktemp("contract")
    export(out)
    assert (out / "schemas" / f"{COMMAND}.json").is_file()
    return out


class Subscriber:
    """`node audit.mjs ...`, running until it has printed what it was asked for."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: list[str] = []

    @classmethod
    async def start(cls, *args: str) -> Subscriber:
        node = shutil.which("node")
        assert node, "node (Node.js 20) is needed for the examples"
        proc = await asyncio.create_subprocess_exec(
            node, "audit.mjs", *args, cwd=EXAMPLES, env=node_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        sub = cls(proc)
        # bound once it says so: nothing published after this can be missed
        async with asyncio.timeout(PROCESS_TIMEOUT):
            while not any(line.startswith("listening on palisade.audit") for line in sub.stderr):
                assert proc.stderr is not None
                line = await proc.stderr.readline()
                assert line, f"audit.mjs exited before listening: {''.join(sub.stderr)}"
                sub.stderr.append(line.decode())
        return sub

    async def finish(self) -> Done:
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), PROCESS_TIMEOUT)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"audit.mjs still running after {PROCESS_TIMEOUT}s") from None
        return Done(self.proc.returncode or 0, out.decode(), "".join(self.stderr) + err.decode())

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def provision(rt: Any, client: Any, service_id: str) -> None:
    name = "redis-node1"
    await client.publish(
        service_provisioned(service_id, name, account_id="acc-node", private_ip="10.0.0.21"),
        service_id=service_id,
    )

    async def known() -> bool:
        async with rt.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM services WHERE service_id = $1", service_id))

    await wait_until(known, what=f"lifecycle knows {service_id}")


async def test_node_publishes_a_command_and_prints_its_audit_record(
    node_modules: Path,
    contract: Path,
    run_worker: Callable[..., Awaitable[Any]],
    client: Any,
    collect: Callable[..., Awaitable[Collector]],
) -> None:
    rt = await run_worker(spec())
    service_id = unique("svc-node")
    await provision(rt, client, service_id)
    commands = await collect(COMMANDS_EXCHANGE, f"lifecycle.{COMMAND}")
    audit = await Subscriber.start(
        "--contract", str(contract), "--bind", f"lifecycle.{COMMAND}.*", "--count", "1", "--timeout", "15"
    )
    try:
        node = shutil.which("node")
        assert node
        # refused by ajv before anything is published: the payload of this command has no fields
        refused = await run(
            node, "publish.mjs", "--contract", str(contract), "--type", COMMAND,
            "--service-id", service_id, "--payload", '{"unexpected": true}',
        )  # fmt: skip
        assert refused.code == 2, refused
        assert refused.out == ""
        assert "does not match its schema; nothing published" in refused.err
        assert "/payload must NOT have additional properties" in refused.err

        published = await run(
            node, "publish.mjs", "--contract", str(contract), "--type", COMMAND,
            "--service-id", service_id, "--payload", "{}", "--actor", "u-node",
        )  # fmt: skip
        assert published.code == 0, published
        message_id = published.out.strip()

        done = await audit.finish()
    finally:
        await audit.stop()
    assert done.code == 0, done.err
    [line] = done.out.splitlines()
    record = json.loads(line)
    assert record["routing_key"] == f"lifecycle.{COMMAND}.accepted"
    assert (record["message_id"], record["worker"], record["action"], record["outcome"], record["service_id"]) == (
        message_id,
        "lifecycle",
        COMMAND,
        "accepted",
        service_id,
    )
    assert record["actor"] == {"kind": "user", "id": "u-node"}

    # What crossed the broker on the command's routing key: the valid command only, as Node built it.
    [received] = await commands.wait_for(1)
    assert received.message_id == message_id
    envelope = received.json()
    assert (envelope["type"], envelope["service_id"], envelope["payload"]) == (COMMAND, service_id, {})
    assert len(commands.messages) == 1


async def test_node_subscriber_refuses_a_record_that_breaks_the_contract(
    node_modules: Path, contract: Path, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    key = f"node-test.{unique('Probe')}.accepted"
    audit = await Subscriber.start("--contract", str(contract), "--bind", key, "--count", "1", "--timeout", "15")
    try:
        channel = await amqp.channel()
        exchange = await channel.get_exchange(AUDIT_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(json.dumps({"audit_id": "not-a-uuid", "worker": "node-test"}).encode()), key
        )
        await channel.close()
        done = await audit.finish()
    finally:
        await audit.stop()
    assert done.code == 5, done
    assert done.out == ""
    assert "does not match the schema" in done.err
    assert "/audit_id must match format" in done.err
