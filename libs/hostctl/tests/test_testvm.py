"""The test VMs themselves: what `up` builds and that `down` leaves nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from palisade_hostctl.testvm import NamespaceVm, VmError, add_client, down, is_alive, list_vms, traces, up
from tests.vms import VmSession, http_get, known_hosts_line

pytestmark = pytest.mark.root


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _host_nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


async def test_a_vm_has_its_own_sshd_nginx_and_nftables_and_down_leaves_nothing(testvms: VmSession) -> None:
    name = testvms.new_name()
    testvms.names.add(name)
    vm = await up(name, root=testvms.root, automation_key=testvms.automation_key, owner=testvms.owner, foreground=True)
    processes = vm.processes()
    assert {"sshd", "nginx"} <= {comm for _, comm in processes}
    assert is_alive(vm)
    assert name in [v.name for v in list_vms(testvms.root)]
    assert sorted(traces(name, testvms.root)) == sorted(
        [str(vm.dir), f"/run/netns/{vm.namespace}", f"/etc/netns/{vm.namespace}", f"/sys/class/net/{vm.host_veth}"]
    )

    # Its network: one /30 to the host, nothing else.
    _, addresses, _ = await vm.exec("ip", "-4", "-o", "addr", "show")
    assert sorted(line.split()[3] for line in addresses.decode().splitlines()) == sorted(
        ["127.0.0.1/8", f"{vm.address}/30"]
    )
    _, routes, _ = await vm.exec("ip", "-4", "route", "show")
    assert "default" not in routes.decode()

    # Its nginx answers on the VM's address, in front of the "application".
    assert await http_get(vm.address) == (200, f"app {vm.name} /\n".encode())
    # Its nftables tables are the namespace's own.
    await vm.exec("nft", "add", "table", "inet", "only_in_vm")
    assert "only_in_vm" not in _host_nft_tables()
    # Its files have a real VM's shape.
    for vm_path in ("/etc/ssh/sshd_config", "/etc/nginx/nginx.conf", "/root/.ssh/authorized_keys"):
        assert vm.path(vm_path).is_file()
    assert vm.path("/etc/nftables.d").is_dir()

    assert await down(name, root=testvms.root) is True
    testvms.names.discard(name)
    assert traces(name, testvms.root, vm.index) == []
    for pid, comm in processes:
        assert not _exists(pid), f"{comm} ({pid}) left behind"
    assert await down(name, root=testvms.root) is False


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palisade_hostctl.testvm", *args], capture_output=True, text=True, timeout=60
    )


async def test_the_cli_brings_a_vm_up_lists_it_and_takes_it_down(testvms: VmSession, tmp_path: Path) -> None:
    name = testvms.new_name()
    testvms.names.add(name)
    root = str(testvms.root)
    made = await asyncio.to_thread(_cli, "up", name, "--json", "--owner", testvms.owner, "--root", root)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    vm = NamespaceVm.from_json(testvms.root, info)
    assert info["address"] == vm.address
    assert info["host_key"].startswith("ssh-ed25519 ")

    listed = await asyncio.to_thread(_cli, "list", "--json", "--root", root)
    [row] = [json.loads(line) for line in listed.stdout.splitlines() if json.loads(line)["name"] == name]
    assert row["alive"] is True
    assert row["address"] == vm.address

    # The OpenSSH client logs in with the VM's automation key, checking the reported host key.
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(known_hosts_line(vm))
    ssh = await asyncio.to_thread(
        subprocess.run,
        [
            "ssh", "-F", "/dev/null", "-i", info["automation_key"], "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            f"root@{vm.address}", "hostname", "-I",
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ssh.returncode == 0, ssh.stderr
    assert ssh.stdout.split() == [vm.address]
    pids = [pid for pid, _ in vm.processes()]

    removed = await asyncio.to_thread(_cli, "down", name, "--root", root)
    assert removed.returncode == 0, removed.stderr
    testvms.names.discard(name)
    assert traces(name, testvms.root, vm.index) == []
    # Daemons the CLI started outlive it, so they are not its children: where PID 1
    # does not reap orphans they remain as zombie entries, but nothing runs.
    assert all(_gone(pid) for pid in pids)


async def test_ipv6_and_a_client_namespace_are_reachable_and_removed_with_the_vm(testvms: VmSession) -> None:
    name = testvms.new_name()
    testvms.names.add(name)
    vm = await up(
        name, root=testvms.root, automation_key=testvms.automation_key, owner=testvms.owner, foreground=True, ipv6=True
    )
    client = await add_client(vm, ["192.0.2.10", "2001:db8:c::10"])
    # The VM answers the host over IPv6 (nothing listens on 1: refused, which needs an answer).
    for address in (vm.address6, vm.address):
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection(address, 1), 5)
    # The client reaches the VM's nginx over the client link (and nothing else: no default route).
    get = "import socket,sys; s=socket.create_connection((sys.argv[1],80),5); print(s.getsockname()[0])"
    _, out, _ = await client.exec(sys.executable, "-c", get, client.vm_address)
    assert out.decode().strip() == "192.0.2.10"
    _, routes, _ = await client.exec("ip", "route", "show")
    assert "default" not in routes.decode()
    with pytest.raises(VmError):
        await add_client(vm, ["198.51.100.1"])

    assert f"/run/netns/{client.namespace}" in traces(name, testvms.root)
    assert await down(name, root=testvms.root) is True
    testvms.names.discard(name)
    assert traces(name, testvms.root, vm.index) == []
