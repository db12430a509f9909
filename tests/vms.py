"""Test VMs for pytest (a plugin loaded by the root conftest): real network
namespaces with their own sshd, nginx and nftables, from `palisade_hostctl.testvm`.

    async def test_x(make_vms, testvms):
        [a, b] = await make_vms(2)          # brought up in parallel, removed after the test
        pool = HostPool([load_private_key(testvms.automation_key)], layouts=testvms.layouts)

Every VM of a session is named `t<pid>-<random>` and owned by `pytest-<pid>`, so
parallel sessions never collide; whatever a failed test left is removed at the
end of the session, and VMs of a session that died are removed at the start of
the next one.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from palisade_hostctl.testvm import NamespaceVm, NamespaceVmLayouts, default_root, down, reap_orphans, up

MakeVms = Callable[..., Awaitable[list[NamespaceVm]]]


@dataclass
class VmSession:
    owner: str
    root: Path
    automation_key: Path  # private key authorized on every VM of the session (Palisade's own key)
    names: set[str] = field(default_factory=set)

    @property
    def layouts(self) -> NamespaceVmLayouts:
        return NamespaceVmLayouts(self.root)

    def new_name(self) -> str:
        return f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"

    async def up(self, *, track: list[str] | None = None, **options: Any) -> NamespaceVm:
        name = self.new_name()
        self.names.add(name)
        if track is not None:
            track.append(name)
        return await up(
            name, root=self.root, automation_key=self.automation_key, owner=self.owner, foreground=True, **options
        )

    async def down(self, *names: str) -> None:
        await asyncio.gather(*(down(name, root=self.root) for name in names))
        self.names.difference_update(names)


async def http_get(address: str, port: int = 80, path: str = "/", host: str | None = None) -> tuple[int, bytes]:
    """A plain HTTP/1.0 GET to a test VM (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 5)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host or address}\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def known_hosts_line(vm: NamespaceVm) -> str:
    """A known_hosts line for OpenSSH's `ssh` (UserKnownHostsFile)."""
    return f"{vm.address} {vm.host_key}\n"


@pytest.fixture(scope="session")
async def testvms(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VmSession]:
    root = default_root()
    await reap_orphans(root)
    key_dir = tmp_path_factory.mktemp("automation-key")
    key_path = key_dir / "id_ed25519"
    key = asyncssh.generate_private_key("ssh-ed25519", comment="palisade-automation")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    session = VmSession(owner=f"pytest-{os.getpid()}", root=root, automation_key=key_path)
    yield session
    await session.down(*sorted(session.names))


@pytest.fixture
async def make_vms(testvms: VmSession) -> AsyncIterator[MakeVms]:
    """`await make_vms(n, session_probe=False)`: n VMs brought up in parallel; all removed after the test."""
    mine: list[str] = []

    async def make(count: int = 1, **options: Any) -> list[NamespaceVm]:
        results = await asyncio.gather(
            *(testvms.up(track=mine, **options) for _ in range(count)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, NamespaceVm)]

    yield make
    await testvms.down(*mine)


@pytest.fixture
async def vm(make_vms: MakeVms) -> NamespaceVm:
    [one] = await make_vms(1)
    return one
