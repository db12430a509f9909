"""A worker killed (SIGKILL) in the middle of an SSH apply: the VM's file is then either
the old one or the new one, never half of one, and the next delivery converges.

Two levels:
- hostctl itself: the client's connection dies after the install command started on
  the VM but before the file's content left the client. The VM-side command then sees
  its stdin end early; the file it was replacing must stay as it was (it used to become
  empty: an authorized_keys without the automation key, which locks Palisade out).
- the sshkeys worker as a real process, killed while its write is held on the VM (a
  ForceCommand wrapper on the test VM holds the install step until the test lets it
  go, or drops it): once with the VM finishing the write after the worker died, once
  with the write never happening. The restarted worker gets the unacked apply again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import asyncssh
import pytest
from aio_pika.abc import AbstractRobustConnection

from palisade_events.client import PalisadeClient
from palisade_events.contract import platform
from palisade_events.contract import sshkeys as sk
from palisade_events.contract.platform import SshEndpoint
from palisade_events.topology import EVENTS_EXCHANGE, work_queue
from palisade_hostctl import HostPool, HostUnreachable, load_private_key
from palisade_hostctl.testvm import NamespaceVm, restart_sshd
from tests.fixtures import AMQP_URL, DATABASE_URL, Collector, drop_worker_state, unique, wait_until
from tests.vms import MakeVms, VmSession

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
TMP_SUFFIX = ".palisade-tmp"

# Holds the install step of a file replace (the command naming the temp file) while
# `run/hold` exists: writes `run/held`, then waits for `run/go` (run the write) or
# `run/drop` (never run it), and records how it ended in `run/finished`. Every other
# command runs as sshd would run it.
_HOLD_WRAPPER = """#!/bin/sh
run='{run}'
case "$SSH_ORIGINAL_COMMAND" in
  *{tmp}*)
    if [ -e "$run/hold" ]; then
      rm -f "$run/hold" "$run/finished"
      : > "$run/held"
      i=0
      while [ ! -e "$run/go" ] && [ ! -e "$run/drop" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
      rm -f "$run/held" "$run/go"
      if [ -e "$run/drop" ]; then rm -f "$run/drop"; echo dropped > "$run/finished"; exit 1; fi
      /bin/sh -c "$SSH_ORIGINAL_COMMAND"
      rc=$?
      echo "exit $rc" > "$run/finished"
      exit $rc
    fi
    ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""


async def holding_vm(make_vms: MakeVms) -> NamespaceVm:
    [vm] = await make_vms(1)
    wrapper = vm.dir / "bin" / "hold-install"
    wrapper.write_text(_HOLD_WRAPPER.format(run=vm.dir / "run", tmp=TMP_SUFFIX))
    wrapper.chmod(0o755)
    config = vm.dir / "etc/ssh/sshd_config"
    config.write_text(config.read_text() + f"ForceCommand {wrapper}\n")
    return await restart_sshd(vm)


def authorized_keys(vm: NamespaceVm) -> Path:
    return vm.path("/root/.ssh/authorized_keys")


def leftovers(vm: NamespaceVm) -> list[str]:
    return sorted(p.name for p in authorized_keys(vm).parent.iterdir() if ".palisade-" in p.name)


# ---------------------------------------------------------------------------- hostctl


async def test_a_connection_lost_before_the_content_arrived_leaves_the_file_as_it_was(
    make_vms: MakeVms, testvms: VmSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    [vm] = await make_vms(1)
    path = authorized_keys(vm)
    before = path.read_bytes()
    real = asyncssh.SSHClientConnection.create_process

    async def dies_after_starting_the_install(
        self: asyncssh.SSHClientConnection, *args: Any, **kwargs: Any
    ) -> asyncssh.SSHClientProcess[Any]:
        process = await real(self, *args, **kwargs)
        command = str(args[0] if args else kwargs.get("command", ""))
        if TMP_SUFFIX in command:
            self.abort()  # the worker is gone: the command runs on the VM, its content never left
        return process

    monkeypatch.setattr(asyncssh.SSHClientConnection, "create_process", dies_after_starting_the_install)
    new = before + b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3W3XqvGSHjZOLA1c5m6pY9bW2sF0H7n1d8oZk5y1Q late\n"
    async with HostPool([load_private_key(testvms.automation_key)], layouts=testvms.layouts) as pool:
        host = pool.host(vm.identity)
        with pytest.raises(HostUnreachable):
            await host.replace_file(str(path), new, mode=0o600)
        # The VM-side command ran on (sshd does not stop it): give it time to finish its
        # work, whatever that is, before judging the file.
        await wait_until(lambda: not leftovers(vm), timeout=10, what="the temp file gone")
        assert path.read_bytes() == before, "a half-sent file replaced authorized_keys"
        monkeypatch.undo()
        result = await host.replace_file(str(path), new, mode=0o600)
    assert result.changed
    assert path.read_bytes() == new


# ---------------------------------------------------------------------------- the sshkeys worker


class WorkerProcess:
    """`python -m palisade_sshkeys` against the session's broker and database."""

    def __init__(self, testvms: VmSession, log: Path) -> None:
        self.log = log
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PALISADE_AMQP_URL": AMQP_URL,
            "PALISADE_DATABASE_URL": DATABASE_URL,
            "PALISADE_METRICS_PORT": "0",
            "PALISADE_RETRY_DELAYS": "[0.2, 0.4, 0.8]",
            "PALISADE_OUTBOX_POLL_SECONDS": "0.2",
            "PALISADE_OUTBOX_GRACE_SECONDS": "1.0",
            "PALISADE_LOG_LEVEL": "WARNING",
            "PALISADE_HOSTCTL_KEY_FILE": str(testvms.automation_key),
            "PALISADE_HOSTCTL_TESTVM_ROOT": str(testvms.root),
            "PALISADE_HOSTCTL_CONNECT_ATTEMPTS": "2",
            "PALISADE_HOSTCTL_RETRY_BACKOFF_SECONDS": "0.05",
            "PALISADE_HOSTCTL_COMMAND_TIMEOUT": "20",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "palisade_sshkeys"], cwd=REPO, env=self.env, stdout=out, stderr=out
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def consuming(amqp: AbstractRobustConnection) -> bool:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(work_queue("sshkeys"), passive=True)
        return (queue.declaration_result.consumer_count or 0) > 0
    except aio_pika.exceptions.ChannelClosed:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


@pytest.fixture
async def worker(amqp: AbstractRobustConnection, testvms: VmSession, tmp_path: Path) -> AsyncIterator[WorkerProcess]:
    await drop_worker_state("sshkeys", amqp)
    proc = WorkerProcess(testvms, tmp_path / "sshkeys.log")
    try:
        proc.start()
        await wait_until(lambda: consuming(amqp), timeout=30, what="the sshkeys worker consuming")
        yield proc
    finally:
        proc.stop()
        await drop_worker_state("sshkeys", amqp)


async def _applied(events: Collector, env: Any, after: int = 0) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        out = [m.json() for m in events.messages]
        return [e for e in out if e["correlation_id"] == str(env.correlation_id) and e["type"] == "SshKeysApplied"]

    await wait_until(lambda: len(found()) > after, timeout=30, what="SshKeysApplied")
    return found()[after]


async def _provision(client: PalisadeClient, vm: NamespaceVm) -> str:
    service_id = unique("svc")
    await client.publish(
        platform.ServiceProvisioned(
            service_id=service_id,
            name=service_id[:30],
            software="redis",
            account_id="acc-1",
            hostname=f"{service_id}.vm.example.net",
            ipv4=vm.address,
            private_ip=vm.address,
            ssh=SshEndpoint(host=vm.address, port=vm.port, host_key=vm.host_key),
        ),
        service_id=service_id,
    )

    async def known() -> bool:
        conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": "palisade_sshkeys"})
        try:
            return bool(await conn.fetchval("SELECT count(*) FROM services WHERE service_id = $1", service_id))
        finally:
            await conn.close()

    await wait_until(known, what="the service projected by sshkeys")
    return service_id


def _public(name: str) -> str:
    return asyncssh.generate_private_key("ssh-ed25519", comment=name).export_public_key().decode().strip()


@pytest.mark.timeout(120)
async def test_a_worker_killed_while_its_write_is_on_the_vm_leaves_old_or_new_and_converges(
    worker: WorkerProcess,
    make_vms: MakeVms,
    client: PalisadeClient,
    collect: Any,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vm = await holding_vm(make_vms)
    run = vm.dir / "run"
    events = await collect(EVENTS_EXCHANGE, "sshkeys.#")
    service_id = await _provision(client, vm)
    first = await client.publish(sk.SshKeyAdded(title="first", public_key=_public("first")), service_id=service_id)
    await _applied(events, first)
    automation_line = authorized_keys(vm).read_text().splitlines()[1]
    lines = []

    for finish in ("go", "drop"):
        old = authorized_keys(vm).read_bytes()
        key = _public(f"key-{finish}")
        (run / "hold").touch()
        env = await client.publish(sk.SshKeyAdded(title=f"key-{finish}", public_key=key), service_id=service_id)
        await wait_until(lambda: (run / "held").exists(), timeout=20, what="the install held on the VM")
        worker.kill()
        killed_at = time.perf_counter()
        # The VM side carries on without the worker: it writes what it received, or nothing.
        (run / finish).touch()
        await wait_until(lambda: (run / "finished").exists(), timeout=15, what="the held install over")
        vm_side = (run / "finished").read_text().strip()
        assert not leftovers(vm)
        after_kill = authorized_keys(vm).read_bytes()

        worker.start()
        applied = await _applied(events, env)
        converged = time.perf_counter() - killed_at
        final = authorized_keys(vm).read_bytes()
        assert after_kill in (old, final), f"half-written authorized_keys after the kill: {after_kill!r}"
        assert final.decode().count(key.split()[1]) == 1
        assert final.decode().splitlines()[1] == automation_line  # Palisade can still log in
        assert authorized_keys(vm).stat().st_mode & 0o777 == 0o600
        assert applied["payload"]["changed"] == (after_kill == old)
        state = "old" if after_kill == old else "new"
        lines.append(
            f"[fault] sshkeys SIGKILLed during the VM write (VM side {'finished' if finish == 'go' else 'dropped'}):"
            f" 1 apply in flight, VM-side install {vm_side!r}, file after the kill = {state} (never partial),"
            f" lost=0, duplicated=0,"
            f" converged {converged:.2f}s after the kill (restart included)"
        )

    record_property("fault_figures", " | ".join(lines))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
