"""The sshkeys worker end to end: the real broker and database, real test VMs with
their own sshd, the asyncssh and OpenSSH clients logging in."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from prometheus_client import REGISTRY

from palisade_events import ManualClock, Payload, WorkerRuntime
from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import platform
from palisade_events.contract import sshkeys as sk
from palisade_events.contract.platform import SshEndpoint
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from palisade_hostctl import HostctlSettings
from palisade_hostctl.testvm import NamespaceVm, restart_sshd, start_sshd, stop_sshd
from palisade_sshkeys.settings import SshKeysSettings
from palisade_sshkeys.worker import spec
from tests.fixtures import AMQP_URL, Collector, unique, wait_until
from tests.vms import MakeVms, VmSession, known_hosts_line

pytestmark = pytest.mark.root

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _retried() -> float:
    return _metric("palisade_messages_total", worker="sshkeys", type="SshKeysApplyRequested", outcome="retried")


class Harness:
    """Talks to the worker as the dashboard and the orchestrator would."""

    def __init__(
        self,
        rt: WorkerRuntime[Any],
        client: PalisadeClient,
        events: Collector,
        audit: Collector,
        clock: ManualClock,
        tmp: Path,
    ) -> None:
        self.rt, self.client, self.events, self.audit, self.clock, self.tmp = rt, client, events, audit, clock, tmp

    async def provision(self, vm: NamespaceVm, service_id: str | None = None) -> str:
        service_id = service_id or unique("svc")
        name = unique("redis").lower()[:30]
        await self.client.publish(
            platform.ServiceProvisioned(
                service_id=service_id,
                name=name,
                software="redis",
                account_id="acc-1",
                hostname=f"{name}.vm.example.net",
                ipv4="203.0.113.10",
                private_ip=vm.address,
                ssh=SshEndpoint(host=vm.address, port=vm.port, host_key=vm.host_key),
            ),
            service_id=service_id,
        )
        await wait_until(lambda: self._known(service_id, vm.host_key), what=f"{service_id} projected")
        return service_id

    async def _known(self, service_id: str, host_key: str) -> bool:
        try:
            await self.list(service_id)
        except QueryRejectedError:
            return False
        async with self.rt.pool.acquire() as conn:
            known = await conn.fetchval("SELECT host_key FROM services WHERE service_id = $1", service_id)
        return bool(known == host_key)

    async def list(self, service_id: str) -> sk.SshKeyList:
        reply: sk.SshKeyList = await self.client.request(sk.ListSshKeys(service_id=service_id), timeout=5)
        return reply

    async def send(self, payload: Payload, service_id: str) -> Any:
        return await self.client.publish(payload, service_id=service_id)

    async def add(self, service_id: str, title: str, key: asyncssh.SSHKey | str) -> Any:
        public = key if isinstance(key, str) else key.export_public_key().decode()
        return await self.send(sk.SshKeyAdded(title=title, public_key=public), service_id)

    def _events(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.events.messages]

    async def decision(self, env: Any) -> dict[str, Any]:
        """The event that answers a command (caused by it)."""

        def found() -> list[dict[str, Any]]:
            return [e for e in self._events() if e["causation_id"] == str(env.message_id)]

        await wait_until(lambda: bool(found()), what=f"decision on {env.type}")
        return found()[0]

    async def written(self, env: Any, timeout: float = 15) -> dict[str, Any]:
        """SshKeysApplied or SshKeysApplyFailed of the write a command asked for."""
        kinds = ("SshKeysApplied", "SshKeysApplyFailed")

        def found() -> list[dict[str, Any]]:
            return [e for e in self._events() if e["correlation_id"] == str(env.correlation_id) and e["type"] in kinds]

        await wait_until(lambda: bool(found()), timeout=timeout, what=f"VM written after {env.type}")
        return found()[0]

    def of_correlation(self, env: Any) -> list[str]:
        return [e["type"] for e in self._events() if e["correlation_id"] == str(env.correlation_id)]

    def audits(self, **match: Any) -> list[dict[str, Any]]:
        records = [m.json() for m in self.audit.messages]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    async def audit_of(self, **match: Any) -> dict[str, Any]:
        """The one audit record that matches (it may arrive after the event)."""
        await wait_until(lambda: bool(self.audits(**match)), what=f"audit record {match}")
        [record] = self.audits(**match)
        return record

    def user_key(self, name: str = "user") -> tuple[asyncssh.SSHKey, Path]:
        key = asyncssh.generate_private_key("ssh-ed25519", comment=name)
        path = self.tmp / f"{name}-{unique('k')}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        return key, path


@pytest.fixture
async def h(run_worker, client, collect, testvms: VmSession, tmp_path: Path) -> Harness:
    clock = ManualClock(START)
    events = await collect(EVENTS_EXCHANGE, "sshkeys.#")
    audit = await collect(AUDIT_EXCHANGE, "sshkeys.#")
    rt = await run_worker(
        spec(SshKeysSettings(), _hostctl(testvms)),
        clock=clock,
        db_pool_size=30,
    )
    return Harness(rt, client, events, audit, clock, tmp_path)


def _hostctl(testvms: VmSession, **overrides: Any) -> HostctlSettings:
    options: dict[str, Any] = {
        "key_file": testvms.automation_key,
        "testvm_root": testvms.root,
        "connect_attempts": 2,
        "retry_backoff_seconds": 0.05,
        "command_timeout": 10,
    }
    options.update(overrides)
    return HostctlSettings(**options)


# ---------------------------------------------------------------- logging in


async def asyncssh_login(vm: NamespaceVm, key: asyncssh.SSHKey) -> str:
    async with asyncssh.connect(
        vm.address,
        vm.port,
        username="root",
        client_keys=[key],
        known_hosts=([vm.identity.key], [], []),
        config=None,
        agent_path=None,
    ) as conn:
        result = await conn.run("echo logged-in as $(id -un)", check=True)
        return str(result.stdout).strip()


async def openssh_login(vm: NamespaceVm, key_file: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    known_hosts = tmp / f"known_hosts-{vm.name}"
    known_hosts.write_text(known_hosts_line(vm))
    argv = [
        "ssh", "-F", "/dev/null", "-i", str(key_file), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=10", f"root@{vm.address}", "echo", "openssh", "ok",
    ]  # fmt: skip
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=30)


async def refused(vm: NamespaceVm, key: asyncssh.SSHKey) -> bool:
    try:
        await asyncssh_login(vm, key)
    except asyncssh.PermissionDenied:
        return True
    return False


# ---------------------------------------------------------------- tests


async def test_an_added_key_logs_in_and_a_removed_key_is_refused(
    h: Harness, vm: NamespaceVm, testvms: VmSession
) -> None:
    service_id = await h.provision(vm)
    automation = asyncssh.read_private_key(str(testvms.automation_key))
    user, user_file = h.user_key("laptop")
    assert await refused(vm, user)

    added = await h.add(service_id, "my laptop", user)
    decision = await h.decision(added)
    assert decision["type"] == "SshKeyAccepted"
    assert decision["payload"]["fingerprint"] == user.get_fingerprint("sha256")
    applied = await h.written(added)
    assert applied["type"] == "SshKeysApplied"
    assert (applied["payload"]["count"], applied["payload"]["changed"]) == (1, True)

    assert await asyncssh_login(vm, user) == "logged-in as root"
    ssh = await openssh_login(vm, user_file, h.tmp)
    assert (ssh.returncode, ssh.stdout) == (0, "openssh ok\n"), ssh.stderr
    assert await asyncssh_login(vm, automation) == "logged-in as root"

    text = vm.path("/root/.ssh/authorized_keys").read_text()
    assert text.splitlines()[1].endswith(" palisade-automation")
    assert text.splitlines()[2].endswith(" my laptop")
    assert oct(vm.path("/root/.ssh/authorized_keys").stat().st_mode & 0o777) == oct(0o600)
    listed = await h.list(service_id)
    assert [(k.title, k.fingerprint) for k in listed.keys] == [("my laptop", user.get_fingerprint("sha256"))]
    assert (listed.state, listed.applied_checksum) == ("applied", applied["payload"]["checksum"])
    assert await h.audit_of(message_id=str(added.message_id), outcome="accepted")

    removed = await h.send(sk.SshKeyRemoved(fingerprint=user.get_fingerprint("sha256")), service_id)
    assert (await h.decision(removed))["type"] == "SshKeyRemovalAccepted"
    assert (await h.written(removed))["payload"]["count"] == 0
    assert await refused(vm, user)
    ssh = await openssh_login(vm, user_file, h.tmp)
    assert ssh.returncode == 255
    assert "Permission denied" in ssh.stderr
    assert await asyncssh_login(vm, automation) == "logged-in as root"

    again = await h.send(sk.SshKeyRemoved(fingerprint=user.get_fingerprint("sha256")), service_id)
    rejection = await h.decision(again)
    assert (rejection["type"], rejection["payload"]["reason"]) == ("SshKeyRemovalRejected", "unknown_fingerprint")


async def test_a_vm_whose_host_key_changed_is_refused_and_its_file_left_untouched(h: Harness, vm: NamespaceVm) -> None:
    service_id = await h.provision(vm)
    first, _ = h.user_key("first")
    await h.written(await h.add(service_id, "first", first))
    keys_file = vm.path("/root/.ssh/authorized_keys")
    before = (keys_file.read_bytes(), keys_file.stat().st_ino, keys_file.stat().st_mtime_ns)

    vm = await restart_sshd(vm, new_host_key=True)  # same address, another machine
    retried = _retried()
    second, _ = h.user_key("second")
    added = await h.add(service_id, "second", second)
    assert (await h.decision(added))["type"] == "SshKeyAccepted"  # recorded
    failed = await h.written(added)
    assert (failed["type"], failed["payload"]["reason"]) == ("SshKeysApplyFailed", "host_key_mismatch")
    assert vm.host_key_fingerprint in failed["payload"]["detail"]

    audit = await h.audit_of(action="SshKeysApplyRequested", outcome="failed", correlation_id=str(added.correlation_id))
    assert audit["reason"] == "host_key_mismatch"
    assert audit["detail"]["presented"] == vm.host_key_fingerprint
    assert (keys_file.read_bytes(), keys_file.stat().st_ino, keys_file.stat().st_mtime_ns) == before
    assert _retried() == retried  # not retried
    listed = await h.list(service_id)
    assert listed.state == "failed"
    assert "host_key_mismatch" in (listed.last_error or "")

    # The platform announces the reinstalled VM with its new key: the keys go there.
    await h.provision(vm, service_id)
    await wait_until(lambda: b"second" in keys_file.read_bytes(), what="keys written to the reinstalled VM")
    assert await asyncssh_login(vm, second) == "logged-in as root"
    await wait_until(lambda: _state(h, service_id, "applied"), what="state applied")


async def test_an_unreadable_host_key_fails_the_write_without_connecting(h: Harness, vm: NamespaceVm) -> None:
    bogus = dataclasses.replace(vm, host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAbroken")
    service_id = await h.provision(bogus)
    user, _ = h.user_key("user")
    added = await h.add(service_id, "user", user)
    failed = await h.written(added)
    assert (failed["type"], failed["payload"]["reason"]) == ("SshKeysApplyFailed", "invalid_host_key")
    assert h.rt.deps.hosts.stats(vm.identity).connect_attempts == 0


async def _state(h: Harness, service_id: str, state: str) -> bool:
    return (await h.list(service_id)).state == state


async def test_invalid_keys_are_rejected_with_their_reason_and_nothing_is_pushed(
    h: Harness, vm: NamespaceVm, testvms: VmSession
) -> None:
    service_id = await h.provision(vm)
    good, _ = h.user_key("good")
    await h.written(await h.add(service_id, "good", good))
    keys_file = vm.path("/root/.ssh/authorized_keys")
    before = (keys_file.read_bytes(), keys_file.stat().st_ino, keys_file.stat().st_mtime_ns)
    sessions = h.rt.deps.hosts.stats(vm.identity).sessions

    ed = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    automation = asyncssh.read_private_key(str(testvms.automation_key)).export_public_key().decode()
    cert_key = asyncssh.generate_private_key("ssh-ed25519")
    cases: list[tuple[str, str, str]] = [
        ("dsa", asyncssh.generate_private_key("ssh-dss").export_public_key().decode(), "dsa_key_refused"),
        (
            "short rsa",
            asyncssh.generate_private_key("ssh-rsa", key_size=1024).export_public_key().decode(),
            "rsa_key_too_short",
        ),
        ("options", f'command="/bin/sh -c id",no-pty {ed}', "key_options_not_allowed"),
        ("newline", f"{ed}\n{ed}", "key_contains_newline"),
        ("nul", f"{ed}\x00", "key_contains_nul"),
        ("x" * 101, ed, "title_too_long"),
        ("again", good.export_public_key().decode(), "duplicate_fingerprint"),
        ("automation", automation, "automation_key_reserved"),
        (
            "certificate",
            cert_key.generate_user_certificate(cert_key, "root").export_certificate("openssh").decode(),
            "key_certificate_not_supported",
        ),
        ("garbage", "ssh-ed25519 AAAAgarbage", "key_invalid"),
    ]
    sent = [(await h.add(service_id, title, text), reason) for title, text, reason in cases]
    for env, reason in sent:
        decision = await h.decision(env)
        assert (decision["type"], decision["payload"]["reason"]) == ("SshKeyRejected", reason)
        audit = await h.audit_of(message_id=str(env.message_id))
        assert (audit["outcome"], audit["reason"]) == ("rejected", reason)
    unknown = await h.add("svc-nobody", "x", ed)
    assert (await h.decision(unknown))["payload"]["reason"] == "unknown_service"
    # A removal by what is no fingerprint at all, a NUL included (which PostgreSQL's text cannot
    # hold: looked up, it failed every attempt and was parked with a database error).
    good_fingerprint = good.get_fingerprint("sha256")
    removals = [
        await h.send(sk.SshKeyRemoved(fingerprint=text), service_id)
        for text in (f"{good_fingerprint}\x00", "SHA256:\x00", "my laptop")
    ]
    for env in removals:
        decision = await h.decision(env)
        assert (decision["type"], decision["payload"]["reason"]) == ("SshKeyRemovalRejected", "unknown_fingerprint")
        assert (await h.audit_of(message_id=str(env.message_id)))["outcome"] == "rejected"

    # Let any (wrong) write happen before looking: one more valid change is written after them.
    probe, _ = h.user_key("probe")
    last = await h.add(service_id, "probe", probe)
    await h.written(last)
    for env, _ in sent:
        assert h.of_correlation(env) == ["SshKeyRejected"]  # no write was asked for
    for env in removals:
        assert h.of_correlation(env) == ["SshKeyRemovalRejected"]
    assert h.rt.deps.hosts.stats(vm.identity).sessions - sessions == 4  # only the probe's write
    after = keys_file.read_bytes()
    assert after.startswith(before[0])
    assert after[len(before[0]) :].decode().endswith(" probe\n")
    assert [k.title for k in (await h.list(service_id)).keys] == ["good", "probe"]
    with pytest.raises(QueryRejectedError):
        await h.list("svc-nobody")


async def test_two_keys_added_concurrently_both_end_up_in_the_file(h: Harness, vm: NamespaceVm) -> None:
    service_id = await h.provision(vm)
    (a, _), (b, _) = h.user_key("a"), h.user_key("b")
    envs = await asyncio.gather(h.add(service_id, "key a", a), h.add(service_id, "key b", b))
    for env in envs:
        assert (await h.decision(env))["type"] == "SshKeyAccepted"
    await asyncio.gather(*(h.written(env) for env in envs))
    await wait_until(lambda: _state(h, service_id, "applied"), what="both written")
    fingerprints = await asyncio.to_thread(_openssh_fingerprints, vm.path("/root/.ssh/authorized_keys"))
    assert sorted(fingerprints[1:]) == sorted([a.get_fingerprint("sha256"), b.get_fingerprint("sha256")])
    assert await asyncssh_login(vm, a) == "logged-in as root"
    assert await asyncssh_login(vm, b) == "logged-in as root"


def _openssh_fingerprints(path: Path) -> list[str]:
    """The fingerprints OpenSSH reads from an authorized_keys file, in order."""
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True)
    return [line.split()[1] for line in listed.stdout.splitlines()]


async def test_an_unreachable_vm_goes_round_the_retry_ladder_and_converges(h: Harness, vm: NamespaceVm) -> None:
    service_id = await h.provision(vm)
    keys_file = vm.path("/root/.ssh/authorized_keys")

    # sshd down for a moment: the write is retried and lands once it is back.
    await stop_sshd(vm)
    retried = _retried()
    first, _ = h.user_key("first")
    added = await h.add(service_id, "first", first)
    assert (await h.decision(added))["type"] == "SshKeyAccepted"  # recorded while the VM is down
    await wait_until(lambda: _retried() > retried, what="the write retried")
    assert (await h.list(service_id)).state == "pending"
    await start_sshd(vm)
    assert (await h.written(added))["type"] == "SshKeysApplied"
    assert await asyncssh_login(vm, first) == "logged-in as root"

    # Down for longer than the ladder: parked, then the reconcile job asks again.
    await stop_sshd(vm)
    second, _ = h.user_key("second")
    added = await h.add(service_id, "second", second)
    parked = {"action": "SshKeysApplyRequested", "outcome": "failed", "correlation_id": str(added.correlation_id)}
    await wait_until(lambda: bool(h.audits(**parked)), what="the write parked after the ladder")
    assert b"second" not in keys_file.read_bytes()
    assert (await h.list(service_id)).state == "pending"
    await start_sshd(vm)
    assert await h.rt.run_job("reconcile-pending-applies") == 0
    assert b"second" not in keys_file.read_bytes()  # not due yet
    h.clock.advance(timedelta(seconds=SshKeysSettings().reconcile_after_seconds + 1))
    await h.rt.run_job("reconcile-pending-applies")
    await wait_until(lambda: b"second" in keys_file.read_bytes(), what="the reconciled write")
    await wait_until(lambda: _state(h, service_id, "applied"), what="state applied")
    assert await asyncssh_login(vm, second) == "logged-in as root"


async def test_twenty_vms_updated_concurrently_stay_within_the_per_host_bound(
    run_worker, client, collect, testvms: VmSession, make_vms: MakeVms, tmp_path: Path
) -> None:
    bound = 2
    vms = await make_vms(20, session_probe=True)
    events = await collect(EVENTS_EXCHANGE, "sshkeys.#")
    audit = await collect(AUDIT_EXCHANGE, "sshkeys.#")
    rt = await run_worker(
        spec(SshKeysSettings(), _hostctl(testvms, max_sessions_per_host=bound)),
        clock=ManualClock(START),
        db_pool_size=30,
    )
    h = Harness(rt, client, events, audit, ManualClock(START), tmp_path)
    services = await asyncio.gather(*(h.provision(vm) for vm in vms))
    user_keys = [h.user_key(f"k{i}")[0] for i in range(len(vms))]
    added = await asyncio.gather(
        *(h.add(sid, f"key {i}", key) for i, (sid, key) in enumerate(zip(services, user_keys, strict=True)))
    )
    results = await asyncio.gather(*(h.written(env, timeout=60) for env in added))
    assert {r["type"] for r in results} == {"SshKeysApplied"}

    per_host = [vm.sessions_max() for vm in vms]
    pool = rt.deps.hosts
    overlap = _max_overlap([span for vm in vms for span in vm.session_intervals()])
    print(f"max concurrent sessions per host (VM-side): {per_host}; pool peak total {pool.peak_in_flight_total};")
    print(f"max concurrent sessions across VMs (VM-side): {overlap}")
    assert max(per_host) <= bound
    assert all(pool.stats(vm.identity).peak_in_flight <= bound for vm in vms)
    assert overlap > bound  # the VMs were written concurrently, not one after another
    for vm, key in zip(vms, user_keys, strict=True):
        assert key.get_fingerprint("sha256")
        assert key.export_public_key().decode().split()[1] in vm.path("/root/.ssh/authorized_keys").read_text()


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


async def test_the_cli_adds_lists_and_removes_a_key(h: Harness, vm: NamespaceVm) -> None:
    service_id = await h.provision(vm)
    user, user_file = h.user_key("cli")
    public_file = h.tmp / "cli.pub"
    public_file.write_bytes(user.export_public_key())
    env = {**os.environ, "PALISADE_AMQP_URL": AMQP_URL}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        code = "from palisade_sshkeys.cli import app; app(prog_name='palisade sshkeys')"
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)

    added = await asyncio.to_thread(cli, "add", service_id, "--title", "from the cli", "--key-file", str(public_file))
    assert added.returncode == 0, added.stdout + added.stderr
    assert "SshKeysApplied" in added.stdout
    ssh = await openssh_login(vm, user_file, h.tmp)
    assert ssh.returncode == 0, ssh.stderr
    listed = await asyncio.to_thread(cli, "list", service_id)
    assert user.get_fingerprint("sha256") in listed.stdout
    assert "from the cli" in listed.stdout
    removed = await asyncio.to_thread(cli, "remove", service_id, user.get_fingerprint("sha256"))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert await refused(vm, user)
    refused_add = await asyncio.to_thread(cli, "add", service_id, "--title", "x" * 101, "--key-file", str(public_file))
    assert refused_add.returncode == 1
    assert "title_too_long" in refused_add.stdout
