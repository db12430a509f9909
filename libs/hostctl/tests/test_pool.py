"""The connection pool against real sshds: host keys, retries, the per-host bound, idle close."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncssh
import pytest

from palisade_hostctl import (
    AuthenticationFailed,
    HostIdentity,
    HostKeyMismatch,
    HostPool,
    HostUnreachable,
    load_private_key,
)
from palisade_hostctl.testvm import NamespaceVm, restart_sshd, start_sshd, stop_sshd
from tests.fixtures import wait_until
from tests.vms import MakeVms, VmSession

pytestmark = pytest.mark.root


def _sshd_log(vm: NamespaceVm) -> str:
    return (vm.dir / "var/log/sshd.log").read_text()


def _exists(path: Path) -> bool:
    return path.exists()


def _sshd_processes(vm: NamespaceVm) -> int:
    return sum(1 for _, comm in vm.processes() if comm == "sshd")


async def test_a_host_key_mismatch_fails_at_once_and_never_logs_in(pool: HostPool, vm: NamespaceVm) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    impostor = HostIdentity(vm.address, vm.port, other)
    with pytest.raises(HostKeyMismatch) as refused:
        await pool.host(impostor).run(["touch", str(vm.dir / "should-not-exist")])
    error = refused.value
    assert not error.transient
    assert (error.expected_fingerprint, error.presented_fingerprint) == (impostor.fingerprint, vm.host_key_fingerprint)
    assert impostor.fingerprint in str(error)
    assert vm.host_key_fingerprint in str(error)
    assert pool.stats(impostor).connect_attempts == 1  # no retry
    assert not _exists(vm.dir / "should-not-exist")
    assert "Accepted publickey" not in _sshd_log(vm)

    await pool.host(vm.identity).run(["true"])
    await wait_until(lambda: "Accepted publickey for root" in _sshd_log(vm), what="the real key's login logged")


async def test_a_vm_whose_host_key_changed_is_refused_even_after_a_pooled_login(
    pool: HostPool, vm: NamespaceVm
) -> None:
    host = pool.host(vm.identity)
    await host.run(["true"])
    await restart_sshd(vm, new_host_key=True)  # same address, another machine
    with pytest.raises(HostKeyMismatch):
        await host.run(["true"])


async def test_a_refused_automation_key_fails_without_retrying(testvms: VmSession, vm: NamespaceVm) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    async with HostPool([stranger], connect_attempts=3, retry_backoff_seconds=0.05) as pool:
        with pytest.raises(AuthenticationFailed) as refused:
            await pool.host(vm.identity).run(["true"])
        assert not refused.value.transient
        assert pool.stats(vm.identity).connect_attempts == 1


async def test_connection_errors_are_retried_with_back_off_then_reported_transient(
    testvms: VmSession, vm: NamespaceVm
) -> None:
    key = load_private_key(testvms.automation_key)
    await stop_sshd(vm)
    async with HostPool([key], connect_attempts=3, retry_backoff_seconds=0.05) as pool:
        started = time.monotonic()
        with pytest.raises(HostUnreachable) as unreachable:
            await pool.host(vm.identity).run(["true"])
        assert unreachable.value.transient
        assert pool.stats(vm.identity).connect_attempts == 3
        assert time.monotonic() - started >= 0.05 + 0.15  # backed off between attempts

    # sshd comes back while the pool is backing off: the command then runs.
    async with HostPool([key], connect_attempts=6, retry_backoff_seconds=0.1) as pool:
        command = asyncio.create_task(pool.host(vm.identity).run(["echo", "ok"]))
        await wait_until(lambda: pool.stats(vm.identity).connect_attempts >= 1, what="a first failed attempt")
        await start_sshd(vm)
        assert (await command).text == "ok\n"
        assert pool.stats(vm.identity).connect_attempts >= 2


async def test_the_pool_reconnects_after_sshd_restarts(pool: HostPool, vm: NamespaceVm) -> None:
    host = pool.host(vm.identity)
    await host.run(["true"])
    await restart_sshd(vm)
    assert (await host.run(["echo", "back"])).text == "back\n"
    assert pool.stats(vm.identity).connects == 2


async def test_a_connection_lost_during_a_command_is_transient_and_not_replayed(
    pool: HostPool, vm: NamespaceVm
) -> None:
    host = pool.host(vm.identity)
    marker = vm.dir / "ran"
    # Append a line, then kill the sshd process serving this connection.
    script = (
        f'echo x >> "{marker}"; p=$$; '
        'while [ "$(cat /proc/$p/comm)" != sshd ]; do p=$(cut -d" " -f4 /proc/$p/stat); done; kill -9 $p; sleep 5'
    )
    with pytest.raises(HostUnreachable) as lost:
        await host.run(["sh", "-c", script])
    assert lost.value.transient
    assert marker.read_text() == "x\n"
    assert (await host.run(["echo", "fresh"])).text == "fresh\n"
    assert pool.stats(vm.identity).connects == 2


async def test_sessions_per_host_stay_within_the_bound(testvms: VmSession, make_vms: MakeVms) -> None:
    a, b = await make_vms(2, session_probe=True)
    key = load_private_key(testvms.automation_key)
    async with HostPool([key], max_sessions_per_host=3) as pool:

        async def burst(vm: NamespaceVm) -> None:
            await asyncio.gather(*(pool.host(vm.identity).run(["sleep", "0.05"]) for _ in range(24)))

        await asyncio.gather(burst(a), burst(b))
        for vm in (a, b):
            stats = pool.stats(vm.identity)
            assert vm.sessions_max() == 3, "measured on the VM by its session probe"
            assert (stats.peak_in_flight, stats.sessions, stats.connects) == (3, 24, 1)
            assert vm.sessions_now() == 0
        assert pool.peak_in_flight_total == 6  # the bound is per host, not for the pool


async def test_an_idle_connection_is_closed_and_reopened_on_demand(testvms: VmSession, vm: NamespaceVm) -> None:
    async with HostPool([load_private_key(testvms.automation_key)], idle_close_seconds=0.2) as pool:
        host = pool.host(vm.identity)
        await host.run(["true"])
        assert pool.stats(vm.identity).connected
        assert _sshd_processes(vm) > 1
        await wait_until(lambda: not pool.stats(vm.identity).connected, what="the idle connection closed")
        await wait_until(lambda: _sshd_processes(vm) == 1, what="the VM's session processes gone")
        await host.run(["true"])
        assert pool.stats(vm.identity).connects == 2
