"""A service's whole life across every worker (issue 10, "End-to-end story").

The test drives Palisade the way the dashboard and the orchestrator would, only through
RabbitMQ, against all seven workers running as separate processes (`palisade run <worker>`,
configured by environment variables like in production), two test VMs (network namespaces
with their own sshd, nginx and nftables), Pebble with its DNS, the relay in front of an
upstream SMTP sink, and the platform simulator provisioning the two services and playing
the backup system and the orchestrator. Every outcome is checked on the real thing: TCP
connections into the VMs, HTTPS verified against Pebble's root, SSH logins, SMTP sessions
from a VM's own address, nginx's answers to request bursts.

1. provisioning: every default in force on both VMs with no further command, within
   STEP1_BOUND seconds (measured and printed);
2. a custom domain, port 80 guarded, an SSH key, 10 requests/second, mail through the relay;
3. TOTP set up by request/reply, a login with the code, five wrong codes lock the account;
4. termination protection, a delete with backup through the simulator, every worker
   forgetting the service, the lifecycle clock moved 7 days: the backup purged once;
5. throughout: nothing parked, no worker restarted, one trace per user action across the
   workers (their spans exported over OTLP to a receiver here), the counts in /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import asyncssh
import fw_traffic as traffic
import pyotp
import pytest
import rl_webclient
from acme_ca import AcmeCa
from aio_pika.abc import AbstractRobustConnection
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer
from rl_webclient import Batch, Request, Response, get, pipelined
from smtp_harness import Sink
from tls_harness import served

from palisade_events.client import PalisadeClient, QueryRejectedError, QueryTimeout
from palisade_events.clock import OffsetFileClock
from palisade_events.contract import accounts, firewall, lifecycle, mfa, ratelimit, smtp, sshkeys, tls
from palisade_events.db import schema_name
from palisade_events.messages import Actor, Payload, Query
from palisade_events.secrets import generate_key as generate_tls_key
from palisade_events.simulator import PlatformSimulator, SimulatedService
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE, dead_queue
from palisade_hostctl.testvm import NETWORK, NamespaceVm
from palisade_mfa.crypto import generate_key as generate_mfa_key
from tests.e2e.e2e_platform import SERVICE_WORKERS, WORKERS, OtlpReceiver, Workers, free_port, sample
from tests.fixtures import AMQP_URL, DATABASE_URL, TEST_RETRY_DELAYS, Collector, drop_worker_state, wait_until
from tests.vms import MakeVms, VmSession

pytestmark = pytest.mark.root

# Step 1's bound: from the provisioning event to the firewall, the rate limit, the
# certificate and the automation key in force on both VMs, checked by real connections.
# Measured on the 2-core test machine: 2.5-3.0 s alone, 3.6 s with a second session running
# the story at the same time (the last worker's event arrives after ~1-1.5 s; the rest is
# the checks themselves, e.g. 0.5 s per VM for a dropped port to show as dropped). The bound
# leaves four times that for a machine shared with other test sessions.
STEP1_BOUND = 15.0
PLATFORM_DOMAIN = "vm.e2e.test"  # the service hostnames' zone (the TLS worker refuses it as a custom domain)
SENDER_DOMAIN = "vm.e2e-mail.test"
UNLISTED_PORT = 5001  # a port no catalog opens: a listener in each VM proves the firewall drops it
DASHBOARD = Actor(kind="user", id="e2e-user")
RATE_LIMIT_REFILL = 60 / 150  # the default 150/minute: one more request every 0.4 s
TRAFFIC = str(Path(traffic.__file__).resolve())
RL_WEBCLIENT = str(Path(rl_webclient.__file__).resolve())


# ---------------------------------------------------------------- the story's world


@dataclass
class Action:
    """One user action: its root span (the dashboard's click) and the correlation ids of
    what it published."""

    name: str
    trace_id: str
    expected_workers: set[str]
    correlations: list[str] = field(default_factory=list)


@dataclass
class Story:
    client: PalisadeClient
    events: Collector
    audit: Collector
    workers: Workers
    otlp: OtlpReceiver
    ca: AcmeCa
    sink: Sink
    sim: PlatformSimulator
    vms: dict[str, NamespaceVm]  # service id -> its VM
    automation_key: Path
    relay_port: int
    lifecycle_clock: OffsetFileClock
    mfa_clock: OffsetFileClock
    tracer: Tracer
    actions: list[Action] = field(default_factory=list)

    # ---- as the dashboard

    @contextlib.contextmanager
    def action(self, name: str, *workers: str) -> Iterator[Action]:
        """A user action: everything published inside is one trace, which must reach `workers`."""
        with self.tracer.start_as_current_span(name) as span:
            act = Action(name, format(span.get_span_context().trace_id, "032x"), set(workers))
            self.actions.append(act)
            yield act

    async def send(self, act: Action, payload: Payload, **ids: str) -> Any:
        env = await self.client.publish(payload, actor=DASHBOARD, **ids)
        act.correlations.append(str(env.correlation_id))
        return env

    async def ask(self, query: Query, **ids: str) -> Any:
        return await self.client.request(query, timeout=10, **ids)

    # ---- what the workers said

    def found(self, type_: str, *, service_id: str | None = None, **match: Any) -> list[dict[str, Any]]:
        out = []
        for message in list(self.events.messages):
            env = message.json()
            if env["type"] != type_ or (service_id is not None and env.get("service_id") != service_id):
                continue
            if all((env.get(k) if k in ("correlation_id", "causation_id") else env["payload"].get(k)) == v
                   for k, v in match.items()):  # fmt: skip
                out.append(env)
        return out

    async def event(
        self, type_: str, *, service_id: str | None = None, timeout: float = 20, **match: Any
    ) -> dict[str, Any]:
        """The first event of this type (and payload/correlation values); waits for it."""
        await wait_until(
            lambda: bool(self.found(type_, service_id=service_id, **match)),
            timeout=timeout,
            what=f"{type_} {match} for {service_id}",
        )
        return self.found(type_, service_id=service_id, **match)[0]

    def arrival(self, type_: str, **match: Any) -> float:
        """When the first matching event reached the test (the event loop's clock)."""
        for message in list(self.events.messages):
            env = message.json()
            if env["type"] == type_ and all(
                (env.get(k) if k in ("service_id", "correlation_id") else env["payload"].get(k)) == v
                for k, v in match.items()
            ):
                return message.received_at
        raise AssertionError(f"no {type_} {match}")

    def audits(self, **match: Any) -> list[dict[str, Any]]:
        records = [m.json() for m in list(self.audit.messages)]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    async def audited(self, **match: Any) -> dict[str, Any]:
        await wait_until(lambda: bool(self.audits(**match)), timeout=20, what=f"audit record {match}")
        return self.audits(**match)[0]


def hostname_of(svc: SimulatedService) -> str:
    return f"{svc.name}-u76.{PLATFORM_DOMAIN}"  # as the simulator names it


def sender_of(svc: SimulatedService) -> str:
    return f"{hostname_of(svc).split('.')[0]}@{SENDER_DOMAIN}"  # the relay's rule: <slug>@<sender domain>


def worker_env(
    name: str, *, common: dict[str, str], ca: AcmeCa, sink: Sink, relay_port: int, clocks: dict[str, Path]
) -> dict[str, str]:
    """The environment `palisade run <name>` gets, as a deployment would set it."""
    env = dict(common)
    if name in clocks:
        env["PALISADE_CLOCK_OFFSET_FILE"] = str(clocks[name])
    if name == "mfa":
        env["PALISADE_MFA_KEY"] = generate_mfa_key("e2e")
        env["PALISADE_PLATFORM_SMTP"] = f"smtp://127.0.0.1:{sink.port}"
    elif name == "smtp-relay":
        # Every address: each VM reaches the host only through its own veth (its gateway).
        env["PALISADE_SMTP_LISTEN"] = f"0.0.0.0:{relay_port}"
        env["PALISADE_PRIVATE_NETWORK"] = str(NETWORK)
        env["PALISADE_SENDER_DOMAIN"] = SENDER_DOMAIN
        env["PALISADE_SMARTHOST"] = f"127.0.0.1:{sink.port}"
        env["PALISADE_SMTP_HOSTNAME"] = "relay.e2e.test"
    elif name == "tls":
        env["PALISADE_ACME_DIRECTORY"] = ca.directory
        env["PALISADE_TLS_ACME_CA_BUNDLE"] = str(ca.listener_certificate)
        env["PALISADE_TLS_KEY"] = generate_tls_key("e2e")
        env["PALISADE_TLS_PLATFORM_DOMAINS"] = json.dumps([PLATFORM_DOMAIN])
        env["PALISADE_TLS_DNS_SERVERS"] = json.dumps(["127.0.0.1"])
        env["PALISADE_TLS_DNS_PORT"] = str(ca.dns.worker.dns_port)
        env["PALISADE_TLS_ACME_POLL_TIMEOUT_SECONDS"] = "30"
    return env


@pytest.fixture
async def story(
    amqp: AbstractRobustConnection,
    collect: Any,
    make_vms: MakeVms,
    testvms: VmSession,
    e2e_ca: AcmeCa,
    tmp_path: Path,
) -> AsyncIterator[Story]:
    for name in WORKERS:  # whatever an earlier test left under these names
        await drop_worker_state(name, amqp)
    sink = await Sink().start()
    otlp = await OtlpReceiver().start()
    vm_a, vm_b = await make_vms(2)
    listeners = [await listen_on(vm, UNLISTED_PORT) for vm in (vm_a, vm_b)]
    relay_port = free_port()
    clocks = {"lifecycle": tmp_path / "lifecycle-clock", "mfa": tmp_path / "mfa-clock"}
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PALISADE_")}
    common = {
        **inherited,
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "PALISADE_AMQP_URL": AMQP_URL,
        "PALISADE_DATABASE_URL": DATABASE_URL,
        "PALISADE_METRICS_PORT": "0",  # any free port; each worker logs the one it got
        "PALISADE_RETRY_DELAYS": json.dumps(TEST_RETRY_DELAYS),
        "PALISADE_OUTBOX_POLL_SECONDS": "0.2",
        "PALISADE_OUTBOX_GRACE_SECONDS": "1.0",
        "PALISADE_LOG_LEVEL": "INFO",
        "PALISADE_OTEL_EXPORTER": "otlp",
        "PALISADE_OTEL_ENDPOINT": otlp.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: spans reach the receiver while the story runs
        "PALISADE_HOSTCTL_KEY_FILE": str(testvms.automation_key),
        "PALISADE_HOSTCTL_TESTVM_ROOT": str(testvms.root),
        "PALISADE_HOSTCTL_CONNECT_ATTEMPTS": "2",
        "PALISADE_HOSTCTL_RETRY_BACKOFF_SECONDS": "0.05",
        "PALISADE_HOSTCTL_COMMAND_TIMEOUT": "10",
    }
    workers = Workers(tmp_path)
    sim_client = await PalisadeClient.connect(AMQP_URL, actor=Actor(kind="system", id="platform-simulator"))
    client = await PalisadeClient.connect(AMQP_URL, actor=DASHBOARD)
    sim: PlatformSimulator | None = None
    try:
        for name in WORKERS:
            env = worker_env(name, common=common, ca=e2e_ca, sink=sink, relay_port=relay_port, clocks=clocks)
            await workers.start(name, env)
        events = await collect(EVENTS_EXCHANGE, "#")
        audit = await collect(AUDIT_EXCHANGE, "#")
        tag = uuid.uuid4().hex[:8]  # never a six-digit token the secrets scan could take for a code
        services = [
            SimulatedService(f"e2e-wp-{tag}", f"wp-{tag}", "wordpress", vm_a.address, vm_a.address, vm_a.port,
                             vm_a.host_key),
            SimulatedService(f"e2e-n8n-{tag}", f"n8n-{tag}", "n8n", vm_b.address, vm_b.address, vm_b.port,
                             vm_b.host_key),
        ]  # fmt: skip
        sim = PlatformSimulator(
            sim_client,
            services=services,
            backup_delay=0.2,
            hostname_domain=PLATFORM_DOMAIN,
            queue_name=f"palisade.simulator.e2e-{tag}",
        )
        await sim.start()
        await workers.ready()
        yield Story(
            client=client,
            events=events,
            audit=audit,
            workers=workers,
            otlp=otlp,
            ca=e2e_ca,
            sink=sink,
            sim=sim,
            vms={services[0].service_id: vm_a, services[1].service_id: vm_b},
            automation_key=testvms.automation_key,
            relay_port=relay_port,
            lifecycle_clock=OffsetFileClock(clocks["lifecycle"]),
            mfa_clock=OffsetFileClock(clocks["mfa"]),
            # The dashboard's root spans. Its own provider, not the global one: the test needs only
            # the ids, and the client's publish carries the current span's context either way.
            tracer=TracerProvider().get_tracer("e2e-dashboard"),
        )
    finally:
        exit_codes = await workers.stop()
        await client.close()
        await sim_client.close()
        if sim is not None:
            channel = await amqp.channel()
            await channel.queue_delete(sim.queue_name)
            await channel.close()
        for name in WORKERS:
            await drop_worker_state(name, amqp)
        for proc in listeners:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await otlp.stop()
        await sink.stop()
    # SIGTERM is a graceful shutdown (finish in-flight messages, flush the outbox): exit 0.
    assert exit_codes == dict.fromkeys(WORKERS, 0), {n: workers.procs[n].tail() for n, c in exit_codes.items() if c}


async def listen_on(vm: NamespaceVm, port: int) -> asyncio.subprocess.Process:
    """A TCP listener inside the VM (services/firewall/tests/fw_traffic.py), so that a
    `blocked` probe is the firewall's doing, not a closed port."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", vm.namespace, sys.executable, TRAFFIC, "serve", "--tcp", str(port),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
    return proc


# ---------------------------------------------------------------- real connections


async def probes(vm: NamespaceVm, *ports: int) -> dict[int, str]:
    """open / blocked / refused for TCP connections from the host to the VM."""
    results = await traffic.probe_all([{"proto": "tcp", "host": vm.address, "port": p} for p in ports])
    return dict(zip(ports, results, strict=True))


async def ssh_run(vm: NamespaceVm, key: asyncssh.SSHKey, command: str) -> str:
    """Log in as root with `key` (the VM's host key verified) and run `command`."""
    known = asyncssh.import_known_hosts(f"{vm.address} {vm.host_key}\n")
    async with asyncssh.connect(
        vm.address, port=vm.port, username="root", client_keys=[key], known_hosts=known, connect_timeout=10
    ) as conn:
        result = await conn.run(command, check=True, timeout=10)
    return str(result.stdout)


async def serves_certificate(story: Story, vm: NamespaceVm, server_name: str, serial: str) -> tuple[str, ...]:
    """Polls until nginx presents certificate `serial` for `server_name`, verified against
    Pebble's root (right after a reload an old nginx worker may answer once more)."""
    seen: list[Any] = []

    async def check() -> bool:
        try:
            got = await served(vm.address, server_name, story.ca.root_pem)
        except OSError as exc:  # ssl.SSLError is an OSError
            seen.append(exc)
            return False
        seen.append(got)
        return got.serial == serial

    await wait_until(check, timeout=10, what=f"certificate {serial} for {server_name} (last: {seen[-1:]})")
    return tuple(seen[-1].names)


def nginx_workers(vm: NamespaceVm) -> set[int]:
    """PIDs of the VM's nginx workers that accept connections (not those shutting down)."""
    active = set()
    for pid, comm in vm.processes():
        if comm != "nginx":
            continue
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            if title.startswith("nginx: worker process") and "shutting down" not in title:
                active.add(pid)
    return active


async def from_vm(vm: NamespaceVm, count: int) -> Batch:
    """`count` pipelined requests from inside the VM's namespace (the VM's own address as
    the client: a client of its own for the rate limit)."""
    argv = [sys.executable, RL_WEBCLIENT, f"http://{vm.address}/", str(count)]
    _, out, _ = await vm.exec(*argv)
    data = json.loads(out)
    return Batch([Response(**r) for r in data["responses"]], data["elapsed"])


def assert_allowance(batch: Batch, allowed: int, refill_seconds: float) -> None:
    """The first `allowed` rapid requests pass, the next is refused 429, give or take the
    refills that fit in the time the burst took (none on an idle machine: ~10 ms)."""
    refills = int(batch.elapsed / refill_seconds)
    statuses = batch.statuses()
    assert statuses[:allowed] == [200] * allowed, statuses
    assert batch.count(200) <= allowed + refills, (batch.count(200), batch.elapsed)
    assert batch.count(200) + batch.count(429) == len(statuses), statuses
    if refills == 0:
        assert statuses[allowed] == 429, statuses
    assert batch.count(429) >= len(statuses) - allowed - refills > 0


async def swaks(vm: NamespaceVm, relay_port: int, sender: str) -> tuple[int, str]:
    """One mail from inside the VM (its own address as the source) through the relay, which
    the VM reaches at its gateway: swaks' exit code and transcript."""
    code, out, err = await vm.exec(
        "swaks", "--server", f"{vm.gateway}:{relay_port}", "--helo", "app.example", "--timeout", "15",
        "--from", sender, "--to", "customer@example.com",
        "--header", "Subject: Your password reset code", "--body", "Your code is 482913.",
        check=False,
    )  # fmt: skip
    return code, (out + err).decode("utf-8", "replace")


# ---------------------------------------------------------------- the story


async def test_a_services_whole_life_across_every_worker(story: Story) -> None:
    started = time.monotonic()
    pids = {name: p.pid for name, p in story.workers.procs.items()}
    first_scrape = {name: await story.workers.metrics(name) for name in WORKERS}
    a, b = story.sim.services

    bounds = await step1_provisioning(story)
    await step2_user_layers(story, a)
    await step3_mfa(story)
    await step4_termination(story, b)
    await step5_throughout(story, pids, first_scrape)
    print(
        f"\n[e2e] step 1, provisioning -> every default in force: {bounds['all']:.2f} s for both services"
        f" (events: {', '.join(f'{k} {v:.2f} s' for k, v in bounds.items() if k != 'all')});"
        f" bound {STEP1_BOUND:.0f} s. Story {time.monotonic() - started:.1f} s."
    )


async def step1_provisioning(story: Story) -> dict[str, float]:
    """The simulator provisions both services; with no further command every default is in force."""
    loop = asyncio.get_running_loop()
    for svc in story.sim.services:
        vm = story.vms[svc.service_id]
        await story.ca.dns.add_a(hostname_of(svc), vm.address)  # the platform's DNS for its hostnames
        # Before: the unlisted port answers (nothing filters yet).
        assert await probes(vm, 22, UNLISTED_PORT) == {22: "open", UNLISTED_PORT: "open"}

    provisioned_at = loop.time()
    for svc in story.sim.services:
        # The orchestrator's provisioning, one trace per service, published by the simulator.
        with story.action(f"provision {svc.service_id}", *SERVICE_WORKERS) as act:
            env = await story.sim.client.publish(svc.provisioned(PLATFORM_DOMAIN), service_id=svc.service_id)
            act.correlations.append(str(env.correlation_id))

    bounds: dict[str, float] = {}
    serials: dict[str, str] = {}
    for svc in story.sim.services:
        sid = svc.service_id
        await story.event("FirewallApplied", service_id=sid)
        await story.event("WebPolicyApplied", service_id=sid)
        issued = await story.event("CertificateIssued", service_id=sid, domains=[hostname_of(svc)])
        serials[sid] = issued["payload"]["serial"]
        await story.event("TlsConfigApplied", service_id=sid, serial=serials[sid])
        for type_ in ("FirewallApplied", "WebPolicyApplied", "TlsConfigApplied"):
            bounds[f"{svc.software} {type_}"] = story.arrival(type_, service_id=sid) - provisioned_at
    assert not story.found("CertificateIssuanceFailed")
    assert not story.found("FirewallApplyFailed")
    assert not story.found("WebPolicyApplyFailed")

    automation = asyncssh.read_private_key(str(story.automation_key))
    [a, b] = story.sim.services
    vm_a, vm_b = story.vms[a.service_id], story.vms[b.service_id]
    for svc in story.sim.services:
        vm = story.vms[svc.service_id]
        # The firewall defaults are in the VM's kernel: SSH and the web open, anything else dropped.
        assert await probes(vm, 22, 80, 443, UNLISTED_PORT) == {
            22: "open",
            80: "open",
            443: "open",
            UNLISTED_PORT: "blocked",
        }
        # The service's own hostname is served over HTTPS with a certificate Pebble issued.
        assert hostname_of(svc) in await serves_certificate(story, vm, hostname_of(svc), serials[svc.service_id])
        # The automation key still logs in (the firewall kept 22 open to the automation network).
        assert (await ssh_run(vm, automation, "echo automation-ok")).strip() == "automation-ok"
    # The default rate limit (150/minute per client IP) is in each VM's nginx: 151 rapid
    # requests, the 151st refused. B from the host; A from inside its VM, so that the host
    # stays a fresh client of A for step 2's new limit.
    assert_allowance(await pipelined(f"http://{vm_b.address}", [Request("/")] * 160), 150, RATE_LIMIT_REFILL)
    assert_allowance(await from_vm(vm_a, 160), 150, RATE_LIMIT_REFILL)
    bounds["all"] = loop.time() - provisioned_at
    assert bounds["all"] < STEP1_BOUND, bounds

    # The audit stream shows each step, for each service: the firewall's, the web policy's and
    # the certificate's, all accepted.
    for svc in story.sim.services:
        sid = svc.service_id
        for worker, action in (
            ("firewall", "ServiceProvisioned"),
            ("firewall", "FirewallApplyRequested"),
            ("ratelimit", "WebPolicyApplyRequested"),
            ("tls", "CertificateIssueRequested"),
            ("tls", "TlsConfigApplyRequested"),
        ):
            await story.audited(worker=worker, action=action, outcome="accepted", service_id=sid)
        assert {r["outcome"] for r in story.audits(service_id=sid)} == {"accepted"}, story.audits(service_id=sid)
    return bounds


async def step2_user_layers(story: Story, svc: SimulatedService) -> None:
    """A custom domain, port 80 guarded, an SSH key, 10 requests/second, mail through the relay."""
    sid, vm = svc.service_id, story.vms[svc.service_id]
    hostname = hostname_of(svc)

    # A custom domain whose DNS points at the VM: a certificate covering it is served.
    domain = f"shop-{uuid.uuid4().hex[:8]}.example.com"
    await story.ca.dns.add_a(domain, vm.address)
    with story.action("add a custom domain", "tls", "firewall") as act:
        added = await story.send(act, tls.DomainAdded(domain=domain), service_id=sid)
    await story.event("DomainAccepted", service_id=sid, domain=domain, correlation_id=str(added.correlation_id))
    issued = await story.event("CertificateIssued", service_id=sid, domains=[hostname, domain])
    await story.event("TlsConfigApplied", service_id=sid, serial=issued["payload"]["serial"])
    names = await serves_certificate(story, vm, domain, issued["payload"]["serial"])
    assert {domain, hostname} <= set(names)

    # Closing port 80 while the service has TLS domains: rejected, and 80 stays open.
    async def firewall_knows_domains() -> bool:
        state: firewall.FirewallState = await story.ask(firewall.GetFirewall(service_id=sid))
        return state.tls_domains >= 2

    await wait_until(firewall_knows_domains, timeout=20, what="the firewall learned both TLS domains")
    state: firewall.FirewallState = await story.ask(firewall.GetFirewall(service_id=sid))
    without_80 = [
        firewall.FirewallRule(protocol=r.protocol, ports=r.ports, icmp_type=r.icmp_type, sources=r.sources)
        for r in state.rules
        if not (r.protocol == "tcp" and r.ports == "80")
    ]
    assert len(without_80) == len(state.rules) - 1
    with story.action("close port 80", "firewall") as act:
        replace = firewall.FirewallRulesReplaceRequested(rules=without_80, expected_version=state.version)
        close = await story.send(act, replace, service_id=sid)
    rejected = await story.event("FirewallChangeRejected", service_id=sid, causation_id=str(close.message_id))
    assert rejected["payload"]["reason"] == "port_80_required_for_tls"
    await story.audited(worker="firewall", action="FirewallRulesReplaceRequested", outcome="rejected", service_id=sid)
    assert await probes(vm, 80) == {80: "open"}

    # An SSH key: written to the VM, and its holder logs in.
    key = asyncssh.generate_private_key("ssh-ed25519", comment="e2e@laptop")
    with story.action("add an SSH key", "sshkeys") as act:
        added_key = await story.send(
            act,
            sshkeys.SshKeyAdded(title="laptop", public_key=key.export_public_key().decode().strip()),
            service_id=sid,
        )
    await story.event("SshKeysApplied", service_id=sid, correlation_id=str(added_key.correlation_id))
    assert (await ssh_run(vm, key, "echo user-ok")).strip() == "user-ok"

    # 10 requests per second per client IP: 10 rapid requests pass, the 11th is refused, then
    # one more every 0.1 s. The host has not used its allowance on this VM yet.
    before = nginx_workers(vm)
    with story.action("set the rate limit to 10/second", "ratelimit") as act:
        configured = await story.send(act, ratelimit.RateLimitConfigured(requests=10, per="second"), service_id=sid)
    corr = str(configured.correlation_id)
    await story.event("WebPolicyUpdated", service_id=sid, correlation_id=corr)
    applied = await story.event("WebPolicyApplied", service_id=sid, correlation_id=corr)
    if applied["payload"]["changed"]:
        # nginx runs the new limit once none of the workers from before the reload accepts.
        await wait_until(
            lambda: bool(nginx_workers(vm)) and not nginx_workers(vm) & before, timeout=10, what="nginx reloaded"
        )
    url = f"http://{vm.address}"
    burst_started = time.monotonic()
    burst = await pipelined(url, [Request("/")] * 20)
    assert_allowance(burst, 10, 0.1)
    refill = await first_admitted(url, burst_started)
    assert refill >= 0.05, refill  # not before the interval (half of it: a request's own travel time)

    # Mail from the VM's private address through the relay: delivered; a wrong sender refused.
    sender = sender_of(svc)
    code, transcript = await swaks(vm, story.relay_port, sender)
    assert code == 0, transcript
    await wait_until(lambda: bool(story.sink.sent_by(sender)), what=f"mail from {sender} upstream")
    [delivered] = story.sink.sent_by(sender)
    assert delivered.rcpt_tos == ["customer@example.com"]
    await story.event("EmailRelayed", service_id=sid)
    code, transcript = await swaks(vm, story.relay_port, f"someone-else@{SENDER_DOMAIN}")
    assert code != 0
    assert "550 5.7.1" in transcript, transcript
    assert not story.sink.sent_by(f"someone-else@{SENDER_DOMAIN}")
    await story.event("EmailRejected", service_id=sid)


async def first_admitted(url: str, burst_started: float, deadline: float = 5.0) -> float:
    """Seconds from the burst to the first request admitted again (polled; refused requests
    use up nothing)."""
    while True:
        sent = time.monotonic()
        response = await get(url)
        if response.status == 200:
            return sent - burst_started
        assert response.status == 429, response
        assert sent - burst_started < deadline, "no request admitted after the refill interval"
        await asyncio.sleep(0.01)


async def step3_mfa(story: Story) -> None:
    """TOTP set up by request/reply, a login with the code, five wrong codes lock the account."""
    account = f"acc-e2e-{uuid.uuid4().hex[:8]}"
    await story.client.publish(accounts.AccountRegistered(account_id=account, email=f"{account}@example.com"),
                               account_id=account)  # fmt: skip

    async def known() -> bool:
        with contextlib.suppress(QueryRejectedError, QueryTimeout):
            status: mfa.MfaStatusReply = await story.ask(mfa.MfaStatus(), account_id=account)
            return status.email_known
        return False

    await wait_until(known, timeout=20, what=f"the MFA worker knows {account}")

    def code_now(totp: pyotp.TOTP) -> str:
        # The authenticator app and the MFA worker read the same clock (the worker's is moved).
        return totp.at(time.time() + story.mfa_clock.offset().total_seconds())

    with story.action("enable TOTP", "mfa"):
        setup: mfa.MfaTotpSetupReply = await story.ask(mfa.MfaTotpSetupRequested(), account_id=account)
        assert setup.accepted, setup.reason
        assert setup.secret is not None
        totp = pyotp.TOTP(setup.secret)
        confirm: mfa.MfaTotpConfirmReply = await story.ask(
            mfa.MfaTotpConfirmRequested(code=code_now(totp)), account_id=account
        )
    assert confirm.enabled, confirm.reason
    await story.event("MfaTotpEnabled")
    # The confirmation spent this step's code and a step is never accepted twice: the
    # authenticator's next code, 30 s later on the worker's clock.
    story.mfa_clock.advance(timedelta(seconds=30))

    with story.action("log in with the authenticator's code", "mfa") as act:
        login = f"login-{uuid.uuid4().hex[:8]}"
        challenge = await story.send(act, mfa.LoginChallengeRequested(login_id=login), account_id=account)
        issued = await story.event("LoginChallengeIssued", causation_id=str(challenge.message_id))
        assert issued["payload"]["delivery"] == "authenticator"
        verdict: mfa.VerifyLoginCodeReply = await story.ask(
            mfa.VerifyLoginCode(login_id=login, code=code_now(totp)), account_id=account
        )
    assert (verdict.valid, verdict.reason) == (True, None)

    with story.action("five wrong codes", "mfa") as act:
        login = f"login-{uuid.uuid4().hex[:8]}"
        challenge = await story.send(act, mfa.LoginChallengeRequested(login_id=login), account_id=account)
        await story.event("LoginChallengeIssued", causation_id=str(challenge.message_id))
        right = code_now(totp)
        for attempt in range(5):
            # Far from the current code and its neighbours, so never valid by chance.
            wrong = f"{(int(right) + 500_000 + attempt) % 1_000_000:06d}"
            verdict = await story.ask(mfa.VerifyLoginCode(login_id=login, code=wrong), account_id=account)
            assert (verdict.valid, verdict.reason) == (False, "invalid_code"), attempt
    locked = await story.event("MfaLocked")
    assert locked["account_id"] == account
    assert locked["payload"]["failures"] == 5
    await story.audited(worker="mfa", action="MfaLocked", account_id=account)
    # Locked: even the right code is refused now.
    verdict = await story.ask(mfa.VerifyLoginCode(login_id=login, code=code_now(totp)), account_id=account)
    assert (verdict.valid, verdict.reason) == (False, "locked")


async def step4_termination(story: Story, svc: SimulatedService) -> None:
    """Protection, a delete with backup through the simulator, every worker forgets the
    service, and the backup is purged once after the grace period."""
    sid, vm = svc.service_id, story.vms[svc.service_id]

    async def decided(act_name: str, payload: Payload, outcome: str) -> dict[str, Any]:
        with story.action(act_name, "lifecycle") as act:
            env = await story.send(act, payload, service_id=sid)
        return await story.event(outcome, service_id=sid, causation_id=str(env.message_id))

    await decided("protection on", lifecycle.TerminationProtectionEnableRequested(), "TerminationProtectionEnabled")
    for name, payload, refused in (
        ("delete (protected)", lifecycle.ServiceDeleteRequested(confirm_name=svc.name), "ServiceDeleteRejected"),
        ("reboot (protected)", lifecycle.ServiceRebootRequested(), "ServiceRebootRejected"),
        (
            "version change (protected)",
            lifecycle.SoftwareVersionChangeRequested(target_version="2.0.0"),
            "SoftwareVersionChangeRejected",
        ),
    ):
        rejection = await decided(name, payload, refused)
        assert rejection["payload"]["reason"] == "termination_protection_enabled", rejection
    assert not story.found("BackupRequested", service_id=sid)
    await decided("protection off", lifecycle.TerminationProtectionDisableRequested(), "TerminationProtectionDisabled")

    # The delete, keeping a backup: the simulator backs up, lifecycle approves, the
    # simulator deprovisions, and every worker that knew the service forgets it.
    with story.action("delete with backup", *SERVICE_WORKERS) as act:
        delete = await story.send(act, lifecycle.ServiceDeleteRequested(confirm_name=svc.name), service_id=sid)
    corr = str(delete.correlation_id)
    for type_ in ("BackupRequested", "BackupCompleted", "ServiceTerminationApproved", "BackupRetained",
                  "ServiceTerminated", "ServiceDeprovisioned"):  # fmt: skip
        await story.event(type_, service_id=sid, correlation_id=corr)
    backup_id = story.found("BackupCompleted", service_id=sid)[0]["payload"]["backup_id"]

    forgotten: dict[str, Query] = {
        "firewall": firewall.GetFirewall(service_id=sid),
        "ratelimit": ratelimit.GetWebPolicy(service_id=sid),
        "tls": tls.GetDomains(service_id=sid),
        "sshkeys": sshkeys.ListSshKeys(service_id=sid),
        "smtp-relay": smtp.RelayStatus(service_id=sid),
    }
    for worker, query in forgotten.items():

        async def refuses(query: Query = query) -> bool:
            reasons: list[str] = []
            try:
                await story.ask(query, service_id=sid)
            except QueryRejectedError as exc:
                reasons.append(exc.reason)
            assert reasons in ([], ["unknown_service"]), reasons
            return bool(reasons)

        await wait_until(refuses, timeout=20, what=f"{worker} forgot {sid}")
    # ... and nothing of it is left in their schemas (bookkeeping tables aside).
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        for worker in forgotten:
            left = await rows_about(conn, worker, sid)
            assert not left, (worker, left)
    finally:
        await conn.close()
    # The relay refuses the deleted service's address.
    code, transcript = await swaks(vm, story.relay_port, sender_of(svc))
    assert code != 0
    assert "554 5.7.1" in transcript, transcript

    status: lifecycle.LifecycleStatusReply = await story.ask(lifecycle.LifecycleStatus(service_id=sid))
    assert (status.state, status.deletion) == ("deprovisioned", "approved")
    assert [(bk.backup_id, bk.state) for bk in status.backups] == [(backup_id, "retained")]

    # Seven days later on the lifecycle worker's clock: the backup is purged, once.
    story.lifecycle_clock.advance(timedelta(days=7, minutes=1))
    await story.event("BackupPurgeRequested", service_id=sid, backup_id=backup_id)
    await story.event("BackupPurged", service_id=sid, backup_id=backup_id)

    async def purged() -> bool:
        reply: lifecycle.LifecycleStatusReply = await story.ask(lifecycle.LifecycleStatus(service_id=sid))
        return [(bk.backup_id, bk.state) for bk in reply.backups] == [(backup_id, "purged")]

    await wait_until(purged, timeout=10, what="the backup recorded as purged")
    # The scheduled purge is done: no later run of the job can ask again.
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        done = await conn.fetch(
            f'SELECT done_at FROM "{schema_name("lifecycle")}".scheduled_actions WHERE backup_id = $1', backup_id
        )
    finally:
        await conn.close()
    assert len(done) == 1, done
    assert done[0]["done_at"] is not None
    assert len(story.found("BackupPurgeRequested", service_id=sid)) == 1
    await story.audited(worker="lifecycle", action="GracePeriodEnded", service_id=sid)


async def rows_about(conn: asyncpg.Connection, worker: str, service_id: str) -> dict[str, int]:
    """Rows naming the service in each of the worker's tables with a service_id column,
    except the runtime's own (inbox, outbox) and the migration record."""
    schema = schema_name(worker)
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = $1 AND column_name = 'service_id'",
        schema,
    )
    out: dict[str, int] = {}
    for row in tables:
        table = row["table_name"]
        if table in ("inbox", "outbox"):
            continue
        count = await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{table}" WHERE service_id = $1', service_id)
        if count:
            out[table] = count
    return out


async def step5_throughout(
    story: Story, pids: dict[str, int], first_scrape: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]
) -> None:
    """Nothing parked, no worker restarted, one trace per user action, /metrics counts."""
    # Nothing parked: every parking queue is empty and no worker counted a dead letter.
    channel = await story.client.connection.channel()
    try:
        for name in WORKERS:
            queue = await channel.declare_queue(dead_queue(name), passive=True)
            assert queue.declaration_result.message_count == 0, name
    finally:
        await channel.close()

    # No worker restarted: the same processes, started once.
    story.workers.check_alive()
    assert {name: p.pid for name, p in story.workers.procs.items()} == pids
    scrapes = {name: await story.workers.metrics(name) for name in WORKERS}
    for name in WORKERS:
        started = sample(first_scrape[name], "process_start_time_seconds")
        assert started > 0, name
        assert sample(scrapes[name], "process_start_time_seconds") == started, name
        assert sample(scrapes[name], "palisade_dead_letters_total", worker=name) == 0, name
        assert sample(scrapes[name], "palisade_worker_ready", worker=name) == 1, name
        parked = [k for k, v in scrapes[name].items() if k[0] == "palisade_messages_total" and
                  ("outcome", "parked") in k[1] and v]  # fmt: skip
        assert not parked, parked

    # One trace per user action, across every worker it reached (their spans, exported over OTLP).
    for act in story.actions:
        await wait_until(
            lambda act=act: act.expected_workers <= story.otlp.workers_in(act.trace_id),
            timeout=20,
            what=f"spans of {act.name!r} from {sorted(act.expected_workers)}"
            f" (got {sorted(story.otlp.workers_in(act.trace_id))})",
        )
        for corr in act.correlations:
            assert story.otlp.traces_of(corr) == {act.trace_id}, (act.name, corr)
    delete = next(act for act in story.actions if act.name == "delete with backup")
    # The deletion's trace went through the simulator's backup and deprovisioning and back.
    in_delete = {(s.worker, s.attributes.get("messaging.rabbitmq.destination.routing_key")) for s in
                 story.otlp.processed() if s.trace_id == delete.trace_id}  # fmt: skip
    assert ("lifecycle", "backup.BackupCompleted") in in_delete, in_delete
    for worker in SERVICE_WORKERS:
        assert (worker, "platform.ServiceDeprovisioned") in in_delete, (worker, in_delete)

    # The counts the story implies.
    def handled(worker: str, type_: str, outcome: str = "handled") -> float:
        return sample(scrapes[worker], "palisade_messages_total", worker=worker, type=type_, outcome=outcome)

    for worker in SERVICE_WORKERS:
        assert handled(worker, "ServiceProvisioned") == 2, worker
        assert handled(worker, "ServiceDeprovisioned") == 1, worker
    lc_counts = {
        ("TerminationProtectionEnableRequested", "handled"): 1,
        ("TerminationProtectionDisableRequested", "handled"): 1,
        ("ServiceDeleteRequested", "rejected"): 1,
        ("ServiceDeleteRequested", "handled"): 1,
        ("ServiceRebootRequested", "rejected"): 1,
        ("SoftwareVersionChangeRequested", "rejected"): 1,
        ("BackupCompleted", "handled"): 1,
        ("BackupPurged", "handled"): 1,
    }
    for (type_, outcome), count in lc_counts.items():
        assert handled("lifecycle", type_, outcome) == count, (type_, outcome)
    lc = scrapes["lifecycle"]
    assert sample(lc, "palisade_lifecycle_purges_total", reason="grace_period_ended") == 1
    assert sample(lc, "palisade_lifecycle_rejections_total", reason="termination_protection_enabled") == 3
    assert handled("firewall", "FirewallRulesReplaceRequested", "rejected") == 1
    assert handled("tls", "DomainAdded") == 1
    assert handled("sshkeys", "SshKeyAdded") == 1
    assert handled("ratelimit", "RateLimitConfigured") == 1
    assert handled("mfa", "AccountRegistered") == 1
    assert handled("mfa", "LoginChallengeRequested") == 2
    assert handled("mfa", "VerifyLoginCode") == 7  # one right, five wrong, one while locked
    assert sample(scrapes["mfa"], "palisade_mfa_lockouts_total") == 1
    assert sample(scrapes["mfa"], "palisade_mfa_verifications_total", mode="totp", result="valid") == 2
    assert sample(scrapes["mfa"], "palisade_mfa_verifications_total", mode="totp", result="invalid_code") == 5
    assert sample(scrapes["mfa"], "palisade_mfa_verifications_total", mode="totp", result="locked") == 1
    # Applied to the VMs: each VM's firewall and web policy once at provisioning, A's web
    # policy again for 10/second, A's one SSH key; three certificates (two hostnames, then
    # A's hostname with its custom domain). The refused port-80 change applied nothing.
    assert sample(scrapes["firewall"], "palisade_firewall_applies_total", outcome="applied") == 2
    assert sample(scrapes["firewall"], "palisade_firewall_rejections_total", reason="port_80_required_for_tls") == 1
    assert sample(scrapes["ratelimit"], "palisade_webpolicy_applies_total", outcome="applied") == 3
    assert sample(scrapes["sshkeys"], "palisade_ssh_applies_total", outcome="applied") == 1
    assert sample(scrapes["tls"], "palisade_tls_issuances_total", outcome="issued") == 3
    assert sample(scrapes["tls"], "palisade_tls_config_applies_total", outcome="applied") >= 3
    # The relay: one mail relayed; refused, the wrong sender and the deleted service's address.
    relay = scrapes["smtp-relay"]
    assert sample(relay, "palisade_smtp_emails_total", outcome="relayed") == 1
    assert sample(relay, "palisade_smtp_emails_total", outcome="rejected") == 2
    assert sample(relay, "palisade_smtp_rejections_total", reason="sender_not_allowed") == 1
    assert sample(relay, "palisade_smtp_rejections_total", reason="unknown_service") == 1
