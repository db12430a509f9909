"""The `palisade` command against the real RabbitMQ: publish, parked messages, audit tail, run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any, ClassVar

import aio_pika
import asyncpg
import pytest
from pydantic import Field
from rich.console import Console
from typer.testing import CliRunner, Result

from palisade_events import audit_stream, workers
from palisade_events.amqp import PublishError, connect
from palisade_events.audit import AuditRecord
from palisade_events.audit_stream import AuditFilter, AuditTail
from palisade_events.cli import main as cli
from palisade_events.cli.publish import CliError, publish_command
from palisade_events.cli.supervisor import Supervisor
from palisade_events.contract import CONTRACT
from palisade_events.db import schema_name
from palisade_events.messages import SYSTEM, Command, Registry
from palisade_events.topology import (
    AUDIT_EXCHANGE,
    AUDIT_LOG,
    EVENTS_EXCHANGE,
    dead_queue,
    declare_exchanges,
    declare_worker,
    work_queue,
)
from tests.backbone.probe import probe_spec
from tests.fixtures import AMQP_URL, DATABASE_URL, TEST_RETRY_DELAYS, drop_worker_state, unique, wait_until

REPO = Path(__file__).resolve().parents[2]

SERVICE_PROVISIONED: dict[str, Any] = {
    "service_id": "svc-cli-1",
    "name": "redis-cli1",
    "software": "redis",
    "account_id": "acc-1",
    "hostname": "redis-cli1.vm.example.net",
    "ipv4": "23.88.47.208",
    "private_ip": "10.0.0.5",
    "ssh": {
        "host": "10.0.0.5",
        "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3W3XqvGSHjZOLA1c5m6pY9bW2sF0H7n1d8oZk5y1Q",
    },
}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, ["--amqp-url", AMQP_URL, *args])


async def ainvoke(*args: str) -> Result:
    """The CLI runs its own event loop (asyncio.run), so in-process it needs its own thread."""
    return await asyncio.to_thread(invoke, *args)


# --------------------------------------------------------------------- publish


def test_publish_rejects_an_invalid_payload_in_one_line_without_its_values() -> None:
    payload = {**SERVICE_PROVISIONED, "name": "Not A Valid Name", "ssh": {"host": "10.0.0.5"}}
    result = invoke("publish", "ServiceProvisioned", "--json", json.dumps(payload))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: invalid ServiceProvisioned payload:")
    assert "name: String should match pattern" in lines[0]
    assert "ssh.host_key: Field required" in lines[0]
    assert "Not A Valid Name" not in result.output
    assert result.stdout == ""


def test_a_command_loads_every_plugin_but_nothing_only_workers_need() -> None:
    # Each `palisade` call loads every command plugin to know its commands. The worker runtime
    # (asyncpg), SSH (asyncssh) and the metrics server (aiohttp) load when used: together they
    # were about a quarter of the command's start-up CPU, paid by every publish and audit tail.
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from palisade_events.cli.main import app\n"
        "result = CliRunner().invoke(app, ['publish', 'ServiceDeprovisioned', '--json', '{}'])\n"
        "print(result.exit_code)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('asyncpg', 'asyncssh', 'aiohttp') or m in ('palisade_events.runtime', 'palisade_hostctl.host'))))\n"
        "print(' '.join(sorted(m for m in sys.modules if m.endswith('.cli') and m.startswith('palisade_'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    exit_code, heavy, plugins = done.stdout.split("\n")[:3]
    assert exit_code == "1"  # the payload is refused locally: no broker involved
    assert heavy == ""
    assert set(plugins.split()) >= {"palisade_firewall.cli", "palisade_hostctl.testvm.cli", "palisade_tls.cli"}


def test_publish_rejects_an_unknown_type_and_suggests_the_near_ones() -> None:
    result = invoke("publish", "ServiceProvisiond", "--json", "{}")
    assert result.exit_code == 1, result.output
    assert "unknown message type 'ServiceProvisiond'" in result.stderr
    assert "ServiceProvisioned" in result.stderr


def test_publish_needs_a_payload_and_valid_envelope_fields() -> None:
    assert "no payload" in invoke("publish", "ServiceProvisioned").stderr
    bad_actor = invoke("publish", "ServiceDeprovisioned", "--json", '{"service_id": "s1"}', "--actor", "robot:x")
    assert bad_actor.exit_code == 1
    assert "--actor 'robot:x'" in bad_actor.stderr
    bad_service = invoke("publish", "ServiceDeprovisioned", "--json", '{"service_id": "s1"}', "--service-id", "a b")
    assert bad_service.exit_code == 1
    assert "invalid envelope: service_id" in bad_service.stderr


async def test_publish_sends_a_confirmed_envelope_and_prints_its_id(collect, tmp_path: Path) -> None:
    seen = await collect(EVENTS_EXCHANGE, "platform.ServiceProvisioned")
    payload_file = tmp_path / "payload.json"
    payload_file.write_text(json.dumps({**SERVICE_PROVISIONED, "name": "placeholder"}))

    result = await ainvoke(
        "publish", "ServiceProvisioned", "--file", str(payload_file), "--set", "name=redis-cli1",
        "--actor", "support:alice",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    message_id = uuid.UUID(result.stdout.strip())
    (received,) = [m for m in await seen.wait_for(1) if m.message_id == str(message_id)]
    body = received.json()
    assert body["type"] == "ServiceProvisioned"
    assert body["payload"] == {**SERVICE_PROVISIONED, "ipv6": None, "ssh": {**SERVICE_PROVISIONED["ssh"], "port": 22}}
    assert body["actor"] == {"kind": "support", "id": "alice"}
    assert body["service_id"] == "svc-cli-1"  # taken from the payload
    assert body["account_id"] == "acc-1"
    assert CONTRACT.decode(received.body).message_id == message_id


def owned_by(owner_name: str) -> type[Command]:
    class Knock(Command):
        """A command nobody consumes."""

        owner: ClassVar[str] = owner_name
        times: int = Field(ge=1, le=3)

    return Knock


async def test_publish_of_an_unroutable_command_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry([owned_by(unique("nobody"))])
    with pytest.raises(PublishError, match="unroutable"):
        await publish_command(registry, "Knock", '{"times": 2}', amqp_url=AMQP_URL, actor=SYSTEM)
    with pytest.raises(CliError, match="times: Input should be less than or equal to 3"):
        await publish_command(registry, "Knock", '{"times": 9}', amqp_url=AMQP_URL, actor=SYSTEM)

    monkeypatch.setattr(cli, "CONTRACT", registry)
    result = await ainvoke("publish", "Knock", "--json", '{"times": 1}')
    assert result.exit_code == 1, result.output
    assert "unroutable" in result.stderr
    assert "Knock" in result.stderr


# --------------------------------------------------------------- parked messages


@pytest.fixture
async def parked_worker(amqp):
    """A worker's queue pair with three parked messages; deleted afterwards."""
    name = f"clitest-{uuid.uuid4().hex[:8]}"
    channel = await amqp.channel(publisher_confirms=True)
    await declare_worker(channel, name, [], [0.1])
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for n, mid in enumerate(ids):
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({"n": n}).encode(),
                message_id=mid,
                type="ProbeCommand",
                correlation_id=mid,
                headers={
                    "x-palisade-error": f"TransientError: backend down ({n})",
                    "x-palisade-attempts": 4,
                    "x-palisade-original-routing-key": f"{name}.ProbeCommand",
                    "x-palisade-original-exchange": "palisade.commands",
                    "x-death": [{"queue": f"palisade.{name}.retry.100ms", "count": 3, "reason": "expired"}],
                    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                },
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=dead_queue(name),
        )
    yield name, ids
    for queue in (work_queue(name), dead_queue(name), f"palisade.{name}.retry.100ms"):
        await channel.queue_delete(queue)
    await channel.close()


async def queue_length(amqp, name: str) -> int:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def test_dead_list_shows_parked_messages_and_keeps_them(amqp, parked_worker) -> None:
    name, ids = parked_worker
    assert await queue_length(amqp, dead_queue(name)) == 3

    first = await ainvoke("dead", "list", name, "--json")
    second = await ainvoke("dead", "list", name, "--json")

    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert [r["message_id"] for r in rows] == ids
    assert rows[0]["type"] == "ProbeCommand"
    assert rows[0]["error"] == "TransientError: backend down (0)"
    assert rows[0]["attempts"] == 4
    assert rows[0]["routing_key"] == f"{name}.ProbeCommand"
    assert sorted(json.loads(line)["message_id"] for line in second.stdout.splitlines()) == sorted(ids)
    assert await queue_length(amqp, dead_queue(name)) == 3

    table = await ainvoke("dead", "list", name)
    assert table.exit_code == 0, table.output
    assert f"palisade.{name}.dead: 3 parked" in table.stdout
    assert "backend down (2)" in table.stdout


async def test_dead_replay_by_id_moves_exactly_that_message_with_a_fresh_ladder(amqp, parked_worker) -> None:
    name, ids = parked_worker
    result = await ainvoke("dead", "replay", name, "--id", ids[1])
    assert result.exit_code == 0, result.output
    assert ids[1] in result.stdout

    channel = await amqp.channel()
    work = await channel.declare_queue(work_queue(name), passive=True)
    moved = await work.get(no_ack=True)
    assert moved.message_id == ids[1]
    assert json.loads(moved.body) == {"n": 1}
    assert moved.type == "ProbeCommand"
    headers = moved.headers or {}
    assert not [h for h in headers if h.startswith(("x-palisade-", "x-death"))], headers
    assert headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c")
    assert await work.get(no_ack=True, fail=False) is None
    await channel.close()

    left = await ainvoke("dead", "list", name, "--json")
    assert sorted(json.loads(line)["message_id"] for line in left.stdout.splitlines()) == sorted([ids[0], ids[2]])

    missing = await ainvoke("dead", "replay", name, "--id", str(uuid.uuid4()))
    assert missing.exit_code == 1
    assert "is parked" in missing.stderr
    assert await queue_length(amqp, dead_queue(name)) == 2

    everything = await ainvoke("dead", "replay", name)
    assert everything.exit_code == 0, everything.output
    assert await queue_length(amqp, dead_queue(name)) == 0
    assert await queue_length(amqp, work_queue(name)) == 2


def test_dead_commands_name_a_missing_queue() -> None:
    result = invoke("dead", "list", unique("noworker"))
    assert result.exit_code == 1
    assert "does not exist" in result.stderr


# ------------------------------------------------------------------ audit tail


def audit_record(worker: str, action: str, outcome: str, service_id: str, reason: str | None = None) -> AuditRecord:
    return AuditRecord(
        audit_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        worker=worker,
        action=action,
        outcome=outcome,  # type: ignore[arg-type]
        reason=reason,
        service_id=service_id,
    )


async def publish_audit(amqp, *records: AuditRecord) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    await declare_exchanges(channel)
    exchange = await channel.get_exchange(AUDIT_EXCHANGE)
    for record in records:
        await exchange.publish(
            aio_pika.Message(record.model_dump_json().encode(), message_id=str(record.audit_id)),
            routing_key=record.routing_key(),
            mandatory=True,
        )
    await channel.close()


async def test_audit_tail_prints_the_history_of_one_worker(amqp) -> None:
    worker, other = unique("auditcli"), unique("auditcli")
    mine = [
        audit_record(worker, "ServiceDeleteRequested", "rejected", "svc-a", "termination_protection_enabled"),
        audit_record(worker, "DomainAdded", "accepted", "svc-b"),
    ]
    await publish_audit(amqp, mine[0], audit_record(other, "DomainAdded", "accepted", "svc-a"), mine[1])

    result = await ainvoke("audit", "tail", "--worker", worker, "--limit", "5", "--json", "--timeout", "3")

    assert result.exit_code == 0, result.output
    shown = [AuditRecord.model_validate_json(line) for line in result.stdout.splitlines()]
    assert shown == mine

    only_a = await ainvoke("audit", "tail", "-w", worker, "--service-id", "svc-a", "--timeout", "3")
    assert only_a.exit_code == 0, only_a.output
    (line,) = only_a.stdout.splitlines()
    assert worker in line
    assert "ServiceDeleteRequested" in line
    assert "rejected" in line
    assert "termination_protection_enabled" in line

    last_one = await ainvoke("audit", "tail", "-w", worker, "-n", "1", "--json", "--since", "10m", "--timeout", "3")
    assert [AuditRecord.model_validate_json(x) for x in last_one.stdout.splitlines()] == mine[1:]


async def test_audit_tail_reads_backwards_in_growing_windows(amqp, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, other = unique("auditback"), unique("auditback")
    mine = [audit_record(worker, f"Step{n}", "accepted", "svc-w") for n in range(5)]
    noise = [audit_record(other, "Noise", "accepted", "svc-o") for _ in range(6)]
    channel = await amqp.channel()
    await declare_exchanges(channel)
    await channel.close()
    before = await stream_count(amqp)
    await publish_audit(amqp, mine[0], noise[0], mine[1], noise[1], mine[2], noise[2], mine[3], mine[4], *noise[3:])
    # The broker refreshes the count it reports every few seconds; wait until it covers
    # our records, so the newest window really starts after them.
    await wait_until(lambda: _reported_past(amqp, before + 11), timeout=15, what="the stream's count to refresh")
    monkeypatch.setattr(audit_stream, "FIRST_WINDOW", 2)

    connection = await connect(AMQP_URL)
    try:
        async with AuditTail(connection, AuditFilter.of([worker])) as tail:
            shown = await tail.catch_up(limit=4, timeout=3)
            assert tail.read < 11 + 2 * 16, "read far more than the windows hold"
    finally:
        await connection.close()
    assert shown == mine[1:]


async def stream_count(amqp) -> int:
    return await queue_length(amqp, AUDIT_LOG)


async def _reported_past(amqp, count: int) -> bool:
    return await stream_count(amqp) >= count


async def test_audit_tail_follow_prints_new_records_until_interrupted(amqp) -> None:
    worker = unique("auditfollow")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "palisade_events.cli.main", "--amqp-url", AMQP_URL,
        "audit", "tail", "--follow", "--limit", "0", "--json", "--worker", worker,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        ready = await asyncio.wait_for(proc.stderr.readline(), 10)
        assert b"following palisade.audit.log" in ready
        record = audit_record(worker, "KeyAdded", "accepted", "svc-f")
        await publish_audit(amqp, record)
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert AuditRecord.model_validate_json(line) == record
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ------------------------------------------------------------ run, migrate, schema


async def test_supervisor_prefixes_output_forwards_signals_and_reports_failure() -> None:
    waits_for_term = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('stopping', flush=True), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "while True: signal.pause()\n"
    )
    out = StringIO()
    supervisor = Supervisor(
        {
            "calm": [sys.executable, "-c", waits_for_term],
            "crashy": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
        },
        Console(file=out, width=200, color_system=None),
        env=os.environ.copy(),
    )
    running = asyncio.ensure_future(supervisor.run(handle_signals=False))
    await wait_until(lambda: "[calm]   ready" in out.getvalue(), what="the calm child to start")
    await wait_until(lambda: "crashy" in supervisor.exit_codes, what="the crashy child to exit")
    supervisor.forward(signal.SIGTERM)

    assert await asyncio.wait_for(running, 10) == 1
    lines = out.getvalue().splitlines()
    assert "[calm]   ready" in lines
    assert "[calm]   stopping" in lines
    assert "[crashy] boom" in lines
    assert "[crashy] exited with code 3" in lines
    assert supervisor.exit_codes == {"calm": 0, "crashy": 3}


async def test_migrate_applies_migrations_and_declares_the_topology(amqp, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, probe = probe_spec(unique("climigrate"))
    monkeypatch.setattr(workers, "installed_workers", lambda: {spec.name: None})
    monkeypatch.setattr(workers, "load_worker", lambda name: spec)
    monkeypatch.setenv("PALISADE_DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("PALISADE_RETRY_DELAYS", json.dumps(TEST_RETRY_DELAYS))
    try:
        first = await ainvoke("migrate")
        assert first.exit_code == 0, first.output
        applied = "applied runtime-001, runtime-002, runtime-003, 001"
        assert f"{spec.name}: schema {schema_name(spec.name)}: {applied}" in first.stdout
        again = await ainvoke("migrate", spec.name)
        assert f"{spec.name}: schema {schema_name(spec.name)}: migrations up to date" in again.stdout

        conn = await asyncpg.connect(DATABASE_URL)
        try:
            tables = await conn.fetchval(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1", schema_name(spec.name)
            )
        finally:
            await conn.close()
        assert tables >= 3  # inbox, outbox and the probe's own
        # The command is routable before the worker ever ran.
        result = await publish_command(
            Registry([probe.ProbeCommand]), "ProbeCommand", '{"n": 1}', amqp_url=AMQP_URL, actor=SYSTEM
        )
        assert await queue_length(amqp, work_queue(spec.name)) == 1
        assert result.type == "ProbeCommand"
    finally:
        await drop_worker_state(spec.name, amqp)


def test_run_and_migrate_refuse_unknown_workers() -> None:
    for args in (["run", "no-such-worker"], ["migrate", "no-such-worker"]):
        result = invoke(*args)
        assert result.exit_code == 1, args
        assert "unknown worker 'no-such-worker'" in result.stderr
    assert invoke("run").exit_code == 2


def test_schema_export_writes_the_contract(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["schema", "export", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "asyncapi.yaml").is_file()
    assert {p.stem for p in (tmp_path / "schemas").iterdir()} == {c.type_name() for c in CONTRACT} | {"AuditRecord"}
