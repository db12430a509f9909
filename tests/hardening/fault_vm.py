"""The three workers that write to VMs (firewall, sshkeys, ratelimit), run in this
process against the session's broker and database, and what the fault tests ask of
them and read back from the test VMs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncssh

from palisade_events import ManualClock, Payload, WorkerRuntime, WorkerSpec
from palisade_events.client import PalisadeClient
from palisade_events.contract import firewall as fw
from palisade_events.contract import platform
from palisade_events.contract import ratelimit as rl
from palisade_events.contract import sshkeys as sk
from palisade_events.contract.platform import SshEndpoint
from palisade_events.topology import dead_queue
from palisade_firewall.settings import FirewallSettings
from palisade_firewall.worker import spec as firewall_spec
from palisade_hostctl import HostctlSettings
from palisade_hostctl.testvm import NETWORK, NETWORK6, NamespaceVm
from palisade_ratelimit.settings import RateLimitWorkerSettings
from palisade_ratelimit.worker import spec as ratelimit_spec
from palisade_sshkeys.settings import SshKeysSettings
from palisade_sshkeys.worker import spec as sshkeys_spec
from tests.fixtures import AMQP_URL, Collector, unique, wait_until
from tests.vms import VmSession

VM_WORKERS = ("firewall", "sshkeys", "ratelimit")
APPLIED = {"firewall": "FirewallApplied", "sshkeys": "SshKeysApplied", "ratelimit": "WebPolicyApplied"}
APPLY_TYPES = {
    "firewall": "FirewallApplyRequested",
    "sshkeys": "SshKeysApplyRequested",
    "ratelimit": "WebPolicyApplyRequested",
}
START_CLOCK = ManualClock().now()


def hostctl(testvms: VmSession, **overrides: Any) -> HostctlSettings:
    options: dict[str, Any] = {
        "key_file": testvms.automation_key,
        "testvm_root": testvms.root,
        "connect_attempts": 2,
        "retry_backoff_seconds": 0.05,
        "connect_timeout": 2,
        "command_timeout": 5,
    }
    options.update(overrides)
    return HostctlSettings(**options)


@dataclass
class Change:
    """The three commands of one round of changes, and what each must leave on the VM."""

    service_id: str
    envs: dict[str, Any]
    port: int
    key: str  # the public key line's base64 part
    rate: str  # nginx rate, e.g. "37r/m"


class VmWorkers:
    def __init__(
        self, rts: dict[str, WorkerRuntime[Any]], client: PalisadeClient, events: Collector, audit: Collector
    ) -> None:
        self.rts, self.client, self.events, self.audit = rts, client, events, audit

    @classmethod
    async def start(
        cls, run_worker: Any, client: PalisadeClient, collect: Any, hostctl_settings: HostctlSettings, **runtime: Any
    ) -> VmWorkers:
        events = await collect("palisade.events", *(f"{w}.#" for w in VM_WORKERS))
        audit = await collect("palisade.audit", *(f"{w}.#" for w in VM_WORKERS))
        specs: list[WorkerSpec[Any]] = [
            firewall_spec(FirewallSettings(automation_sources=[str(NETWORK), str(NETWORK6)]), hostctl_settings),
            sshkeys_spec(SshKeysSettings(), hostctl_settings),
            ratelimit_spec(RateLimitWorkerSettings(upstream="127.0.0.1:8080"), hostctl_settings),
        ]
        rts = {}
        for spec in specs:
            rts[spec.name] = await run_worker(spec, clock=ManualClock(START_CLOCK), **runtime)
        return cls(rts, client, events, audit)

    # ------------------------------------------------------------------ as the platform and the dashboard

    async def provision(self, vm: NamespaceVm) -> str:
        """A service on `vm`; returns once the firewall and ratelimit defaults are applied."""
        service_id = unique("svc")
        name = unique("wp").lower()[:30]
        env = await self.client.publish(
            platform.ServiceProvisioned(
                service_id=service_id,
                name=name,
                software="wordpress",
                account_id="acc-1",
                hostname=f"{name}.vm.example.net",
                ipv4=vm.address,
                private_ip=vm.address,
                ssh=SshEndpoint(host=vm.address, port=vm.port, host_key=vm.host_key),
            ),
            service_id=service_id,
        )
        for worker in ("firewall", "ratelimit"):
            await self.outcome(worker, env, timeout=30)

        async def sshkeys_knows() -> bool:
            async with self.rts["sshkeys"].pool.acquire() as conn:
                return bool(await conn.fetchval("SELECT count(*) FROM services WHERE service_id = $1", service_id))

        await wait_until(sshkeys_knows, what="sshkeys projected the service")
        return service_id

    async def firewall_version(self, service_id: str) -> int:
        reply: fw.FirewallState = await self.client.request(fw.GetFirewall(service_id=service_id), timeout=10)
        return reply.version

    async def change(self, service_id: str, port: int, requests: int) -> Change:
        """One change per worker: a new open port, a new SSH key, a new rate."""
        key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        rules = [
            fw.FirewallRule(protocol="tcp", ports="22"),
            fw.FirewallRule(protocol="tcp", ports="80"),
            fw.FirewallRule(protocol="tcp", ports="443"),
            fw.FirewallRule(protocol="tcp", ports=str(port)),
        ]
        version = await self.firewall_version(service_id)
        payloads: dict[str, Payload] = {
            "firewall": fw.FirewallRulesReplaceRequested(rules=rules, expected_version=version),
            "sshkeys": sk.SshKeyAdded(title=f"fault-{port}", public_key=key),
            "ratelimit": rl.RateLimitConfigured(requests=requests, per="minute"),
        }
        envs = {w: await self.client.publish(p, service_id=service_id) for w, p in payloads.items()}
        return Change(service_id, envs, port, key.split()[1], f"{requests}r/m")

    # ------------------------------------------------------------------ what the workers said

    def of(self, **match: Any) -> list[dict[str, Any]]:
        out = []
        for m in list(self.events.messages):
            body = m.json()
            if all(body.get(k) == v for k, v in match.items()):
                out.append(body)
        return out

    async def outcome(self, worker: str, env: Any, timeout: float = 20) -> dict[str, Any]:
        """The apply's outcome (applied or failed) for the command `env`."""
        kinds = {APPLIED[worker], APPLIED[worker].replace("Applied", "ApplyFailed")}

        def found() -> list[dict[str, Any]]:
            return [e for e in self.of(correlation_id=str(env.correlation_id)) if e["type"] in kinds]

        await wait_until(lambda: bool(found()), timeout=timeout, what=f"{worker} apply outcome")
        return found()[0]

    def failed_audits(self, worker: str, env: Any) -> list[dict[str, Any]]:
        records = [m.json() for m in list(self.audit.messages)]
        return [
            r
            for r in records
            if r["worker"] == worker
            and r["action"] == APPLY_TYPES[worker]
            and r["outcome"] == "failed"
            and r["correlation_id"] == str(env.correlation_id)
        ]


async def parked_messages(worker: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The parked messages of `worker`, looked at and given back (the queue is left as it was)."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(dead_queue(worker), passive=True)
        held = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            held.append(message)
        for message in held:
            await message.nack(requeue=True)
        return held
    finally:
        await connection.close()


async def palisade_cli(*args: str) -> str:
    """The real `palisade` CLI against the test session's vhost."""
    env = {**os.environ, "PALISADE_AMQP_URL": AMQP_URL, "COLUMNS": "200"}
    palisade = str(Path(sys.executable).parent / "palisade")
    proc = await asyncio.create_subprocess_exec(
        palisade, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    return text


# ------------------------------------------------------------------ what the VM holds


async def vm_state(vm: NamespaceVm, change: Change) -> dict[str, bool]:
    """Whether each worker's change is in force on the VM: the kernel's ruleset, the
    authorized_keys file, the nginx http-level file."""
    _, out, _ = await vm.exec("nft", "-j", "list", "table", "inet", "palisade", check=False)
    ports: set[int] = set()
    for item in json.loads(out or b'{"nftables": []}')["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            right = expr.get("match", {}).get("right")
            if isinstance(right, int):
                ports.add(right)
    keys = vm.path("/root/.ssh/authorized_keys").read_text()
    http_conf = vm.path(rl.NGINX_HTTP_CONF).read_text() if vm.path(rl.NGINX_HTTP_CONF).exists() else ""
    return {
        "firewall": change.port in ports,
        "sshkeys": change.key in keys,
        "ratelimit": f"rate={change.rate}" in http_conf,
    }


async def set_link(vm: NamespaceVm, up: bool) -> None:
    """The host's end of the VM's veth pair: down, the VM is cut off (no route to it)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "link", "set", vm.host_veth, "up" if up else "down", stderr=subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
