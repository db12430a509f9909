"""The platform simulator: plays the systems around Palisade for `make run` and
end-to-end tests. It is not a Palisade worker and owns no Palisade state.

- provisions N services (`platform.ServiceProvisioned`), with stable ids so a
  restart re-announces the same services;
- answers `lifecycle.BackupRequested` with `backup.BackupCompleted` after a delay
  (or `backup.BackupFailed` for services flagged to fail);
- answers `lifecycle.ServiceTerminationApproved` with `platform.ServiceTerminated`
  and then `platform.ServiceDeprovisioned`;
- answers `lifecycle.BackupPurgeRequested` with `backup.BackupPurged`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opentelemetry import context as otel_context

from .client import PalisadeClient
from .contract import CONTRACT, backup, platform
from .contract import lifecycle as lc
from .messages import Actor, DecodeError, Envelope, Payload
from .observability import extract_context
from .topology import EVENTS_EXCHANGE, declare_exchanges

log = logging.getLogger("palisade.simulator")

QUEUE = "palisade.simulator"
SOFTWARE = ("redis", "wordpress", "postgresql", "n8n")
ANSWERS: tuple[type[Payload], ...] = (lc.BackupRequested, lc.ServiceTerminationApproved, lc.BackupPurgeRequested)


@dataclass(frozen=True)
class SimulatedService:
    service_id: str
    name: str
    software: str
    private_ip: str
    ssh_host: str
    ssh_port: int = 22
    host_key: str = ""

    def provisioned(self, hostname_domain: str) -> platform.ServiceProvisioned:
        return platform.ServiceProvisioned(
            service_id=self.service_id,
            name=self.name,
            software=self.software,
            account_id="acc-sim",
            hostname=f"{self.name}-u76.{hostname_domain}",
            ipv4=self.ssh_host if ":" not in self.ssh_host else None,
            private_ip=self.private_ip,
            ssh=platform.SshEndpoint(
                host=self.ssh_host, port=self.ssh_port, host_key=self.host_key or _fake_host_key()
            ),
        )


def _fake_host_key() -> str:
    """A real ed25519 public key (nobody holds its private half): services without a VM."""
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def simulated_services(count: int, prefix: str = "sim") -> list[SimulatedService]:
    out = []
    for i in range(1, count + 1):
        software = SOFTWARE[(i - 1) % len(SOFTWARE)]
        out.append(
            SimulatedService(
                service_id=f"{prefix}-{software}-{i}",
                name=f"{software}-{prefix}{i}",
                software=software,
                private_ip=f"10.77.0.{10 + i}",
                ssh_host=f"10.77.0.{10 + i}",
            )
        )
    return out


@dataclass
class PlatformSimulator:
    client: PalisadeClient
    services: Sequence[SimulatedService] = ()
    backup_delay: float = 1.0
    fail_backups: set[str] = field(default_factory=set)
    hostname_domain: str = "vm.palisade.test"
    queue_name: str = QUEUE
    answered: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def provision_all(self) -> None:
        for svc in self.services:
            await self.client.publish(svc.provisioned(self.hostname_domain), service_id=svc.service_id)
            log.info("provisioned %s (%s)", svc.service_id, svc.software)

    async def start(self) -> None:
        channel = await self.client.connection.channel()
        await channel.set_qos(prefetch_count=50)
        await declare_exchanges(channel)
        queue = await channel.declare_queue(self.queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        for cls in ANSWERS:
            await queue.bind(EVENTS_EXCHANGE, cls.routing_key())
        await queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            env = CONTRACT.decode(message.body)
        except DecodeError as exc:
            log.warning("simulator ignores an undecodable message: %s", exc)
            await message.ack()
            return
        # Answer later without holding the delivery: the backup "takes" backup_delay. The
        # answer continues the trace of the message it answers (its traceparent header), as
        # the real orchestrator and backup system would, so one user action is one trace.
        token = otel_context.attach(extract_context(message.headers))
        try:
            task = asyncio.create_task(self._answer(env))
        finally:
            otel_context.detach(token)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await message.ack()

    async def _answer(self, env: Envelope[Any]) -> None:
        p = env.payload
        service_id = env.service_id or ""
        replies: list[Payload] = []
        if isinstance(p, lc.BackupRequested):
            await asyncio.sleep(self.backup_delay)
            if service_id in self.fail_backups:
                replies.append(
                    backup.BackupFailed(service_id=service_id, request_id=p.request_id, reason="simulated failure")
                )
            else:
                replies.append(
                    backup.BackupCompleted(
                        service_id=service_id,
                        backup_id=f"bk-{uuid.uuid4().hex[:12]}",
                        purpose="pre_deletion",
                        request_id=p.request_id,
                    )
                )
        elif isinstance(p, lc.ServiceTerminationApproved):
            replies += [
                platform.ServiceTerminated(service_id=service_id),
                platform.ServiceDeprovisioned(service_id=service_id),
            ]
        elif isinstance(p, lc.BackupPurgeRequested):
            replies.append(backup.BackupPurged(service_id=service_id, backup_id=p.backup_id))
        for reply in replies:
            # The same user action: keep the correlation, name the cause.
            await self.client.publish(
                reply,
                service_id=service_id,
                account_id=env.account_id,
                correlation_id=env.correlation_id,
                causation_id=env.message_id,
                actor=Actor(kind="system", id="platform-simulator"),
            )
            log.info("answered %s with %s for %s", env.type, reply.type_name(), service_id)
        self.answered += 1


async def run_simulator(
    amqp_url: str,
    *,
    count: int,
    backup_delay: float,
    fail_backups: Sequence[str] = (),
    prefix: str = "sim",
    services: Sequence[SimulatedService] | None = None,
    stop: asyncio.Event | None = None,
    vms: bool = False,
) -> None:
    """With `vms` (root only), every simulated service gets a test VM of its own
    (`palisade_hostctl.testvm`: a network namespace with sshd, nginx and nftables) as its
    host, taken down again when the simulator stops."""
    wanted = list(services if services is not None else simulated_services(count, prefix))
    client = await PalisadeClient.connect(amqp_url, actor=Actor(kind="system", id="platform-simulator"))
    hosts: list[str] = []
    try:
        if vms:
            wanted = await _on_test_vms(wanted, hosts)
        sim = PlatformSimulator(client, services=wanted, backup_delay=backup_delay, fail_backups=set(fail_backups))
        await sim.start()
        await sim.provision_all()
        await (stop or asyncio.Event()).wait()
    finally:
        await client.close()
        if hosts:
            from palisade_hostctl.testvm import down

            await asyncio.gather(*(down(name) for name in hosts), return_exceptions=True)
            log.info("test VMs %s removed", ", ".join(hosts))


async def _on_test_vms(services: list[SimulatedService], names: list[str]) -> list[SimulatedService]:
    """A test VM per service (names recorded in `names` as they come up, for the cleanup)
    authorizing the workers' automation key (`PALISADE_HOSTCTL_KEY_FILE`)."""
    import dataclasses

    from palisade_hostctl import HostctlSettings
    from palisade_hostctl.testvm import down, up

    key_file = HostctlSettings().key_file
    HostctlSettings().automation_key()  # made first when a generated development key is allowed
    out: list[SimulatedService] = []
    for index, svc in enumerate(services, start=1):
        name = f"palisade-run{index}"
        await down(name)  # what a killed earlier run left
        names.append(name)
        vm = await up(name, automation_key=key_file, owner="make-run", foreground=True)
        log.info("test VM %s at %s is the host of %s", name, vm.address, svc.service_id)
        out.append(
            dataclasses.replace(svc, private_ip=vm.address, ssh_host=vm.address, ssh_port=vm.port, host_key=vm.host_key)
        )
    return out
