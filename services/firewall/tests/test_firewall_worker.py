"""The firewall worker end to end: the real broker and database, real test VMs whose
kernels enforce the rules, real TCP/UDP traffic over IPv4 and IPv6 from the host and
from a client namespace inside and outside a source CIDR."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fw_traffic as traffic
import pytest
from prometheus_client import REGISTRY

from palisade_events import ManualClock, Payload, WorkerRuntime
from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import firewall as fw
from palisade_events.contract import platform, tls
from palisade_events.contract.platform import SshEndpoint
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from palisade_firewall import domain
from palisade_firewall.handlers import read_table
from palisade_firewall.settings import FirewallSettings
from palisade_firewall.worker import spec
from palisade_hostctl import HostctlSettings
from palisade_hostctl.testvm import (
    NETWORK,
    NETWORK6,
    ClientNamespace,
    NamespaceVm,
    add_client,
    restart_sshd,
    start_sshd,
    stop_sshd,
)
from tests.fixtures import AMQP_URL, Collector, unique, wait_until
from tests.vms import MakeVms, VmSession

pytestmark = pytest.mark.root

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
TRAFFIC = str(Path(traffic.__file__).resolve())
# What the listener in each VM serves (every port a test probes, so "blocked" is the firewall).
TCP_PORTS = (5001, 5002, 23647, 24814)
UDP_PORTS = (4242, 5003, 5004, 6666)
# Palisade reaches the test VMs from the host's end of their veth pairs.
AUTOMATION = [str(NETWORK), str(NETWORK6)]
# A marker for the renderer that hands the kernel a ruleset it refuses.
REFUSED_PORT = 6666


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _applies(outcome: str) -> float:
    return _metric("palisade_firewall_applies_total", outcome=outcome)


def _retried() -> float:
    return _metric("palisade_messages_total", worker="firewall", type="FirewallApplyRequested", outcome="retried")


def refusing_render(enabled: bool, rules: Iterable[domain.Rule]) -> str:
    """domain.render, except that a rule for udp/6666 brings along a rule the kernel
    refuses (a jump to a chain that does not exist): `nft -c` fails on the VM."""
    rules = tuple(rules)
    text = domain.render(enabled, rules)
    if any(r.protocol == "udp" and r.ports == domain.PortRange(REFUSED_PORT, REFUSED_PORT) for r in rules):
        text = text.replace("\t}\n}\n", "\t\ttcp dport 1 jump nowhere\n\t}\n}\n")
    return text


def R(protocol: str, ports: str | None = None, *sources: str, icmp_type: str | None = None) -> fw.FirewallRule:  # noqa: N802
    return fw.FirewallRule(protocol=protocol, ports=ports, icmp_type=icmp_type, sources=list(sources) or None)  # type: ignore[arg-type]


SSH_ANY = R("tcp", "22")


class Harness:
    """Talks to the worker as the dashboard, the orchestrator and the TLS worker would."""

    def __init__(
        self, rt: WorkerRuntime[Any], client: PalisadeClient, events: Collector, audit: Collector, clock: ManualClock
    ) -> None:
        self.rt, self.client, self.events, self.audit, self.clock = rt, client, events, audit, clock

    async def provision(self, vm: NamespaceVm, software: str = "redis", service_id: str | None = None) -> str:
        service_id = service_id or unique("svc")
        name = unique(software).lower()[:30]
        await self.client.publish(
            platform.ServiceProvisioned(
                service_id=service_id,
                name=name,
                software=software,
                account_id="acc-1",
                hostname=f"{name}.vm.example.net",
                ipv4=vm.address,
                ipv6=vm.address6 if vm.ipv6 else None,
                private_ip=vm.address,
                ssh=SshEndpoint(host=vm.address, port=vm.port, host_key=vm.host_key),
            ),
            service_id=service_id,
        )
        return service_id

    async def provisioned(self, vm: NamespaceVm, software: str = "redis") -> tuple[str, dict[str, Any]]:
        """A new service whose defaults are in force on `vm`."""
        service_id = await self.provision(vm, software)
        applied = await self.outcome(lambda e: e["service_id"] == service_id)
        assert applied["type"] == "FirewallApplied", applied
        return service_id, applied

    async def state(self, service_id: str) -> fw.FirewallState:
        reply: fw.FirewallState = await self.client.request(fw.GetFirewall(service_id=service_id), timeout=5)
        return reply

    async def send(self, payload: Payload, service_id: str) -> Any:
        return await self.client.publish(payload, service_id=service_id)

    async def replace(self, service_id: str, *rules: fw.FirewallRule, version: int | None = None, **kw: Any) -> Any:
        if version is None:
            version = (await self.state(service_id)).version
        return await self.send(
            fw.FirewallRulesReplaceRequested(rules=list(rules), expected_version=version, **kw), service_id
        )

    def _events(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.events.messages]

    async def decision(self, env: Any) -> dict[str, Any]:
        """The event that answers a command (caused by it)."""

        def found() -> list[dict[str, Any]]:
            return [e for e in self._events() if e["causation_id"] == str(env.message_id)]

        await wait_until(lambda: bool(found()), what=f"decision on {env.type}")
        return found()[0]

    async def outcome(self, match: Any, timeout: float = 15) -> dict[str, Any]:
        kinds = ("FirewallApplied", "FirewallApplyFailed")

        def found() -> list[dict[str, Any]]:
            return [e for e in self._events() if e["type"] in kinds and match(e)]

        await wait_until(lambda: bool(found()), timeout=timeout, what="FirewallApplied/FirewallApplyFailed")
        return found()[0]

    async def applied(self, env: Any, timeout: float = 15) -> dict[str, Any]:
        """FirewallApplied or FirewallApplyFailed of the apply a command asked for."""
        return await self.outcome(lambda e: e["correlation_id"] == str(env.correlation_id), timeout)

    def of_correlation(self, env: Any) -> list[str]:
        return [e["type"] for e in self._events() if e["correlation_id"] == str(env.correlation_id)]

    def audits(self, **match: Any) -> list[dict[str, Any]]:
        records = [m.json() for m in self.audit.messages]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    async def audited(self, **match: Any) -> list[dict[str, Any]]:
        """The audit records that match, once there is one (they cross the broker
        separately from the events, so they may arrive after them)."""
        await wait_until(lambda: bool(self.audits(**match)), what=f"audit record {match}")
        return self.audits(**match)


def _hostctl(testvms: VmSession) -> HostctlSettings:
    return HostctlSettings(
        key_file=testvms.automation_key,
        testvm_root=testvms.root,
        connect_attempts=2,
        retry_backoff_seconds=0.05,
        command_timeout=10,
    )


async def _harness(run_worker: Any, client: PalisadeClient, collect: Any, testvms: VmSession, **kw: Any) -> Harness:
    clock = ManualClock(START)
    events = await collect(EVENTS_EXCHANGE, "firewall.#")
    audit = await collect(AUDIT_EXCHANGE, "firewall.#")
    settings = FirewallSettings(automation_sources=AUTOMATION)
    rt = await run_worker(spec(settings, _hostctl(testvms), **kw), clock=clock, db_pool_size=20)
    return Harness(rt, client, events, audit, clock)


@pytest.fixture
async def h(run_worker: Any, client: PalisadeClient, collect: Any, testvms: VmSession) -> Harness:
    return await _harness(run_worker, client, collect, testvms, render=refusing_render)


@pytest.fixture
async def vm(make_vms: MakeVms) -> AsyncIterator[NamespaceVm]:
    """A VM with IPv6 and a listener on every port the tests probe."""
    [one] = await make_vms(1, ipv6=True)
    argv = ["ip", "netns", "exec", one.namespace, sys.executable, TRAFFIC, "serve"]
    argv += ["--tcp", ",".join(map(str, TCP_PORTS)), "--udp", ",".join(map(str, UDP_PORTS))]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
        yield one
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# ---------------------------------------------------------------- traffic


async def from_host(vm: NamespaceVm, *probes: tuple[str, int], v6: bool = False) -> dict[tuple[str, int], str]:
    """Probe the VM from the host namespace (IPv4, or IPv6 with `v6`)."""
    host = vm.address6 if v6 else vm.address
    results = await traffic.probe_all([{"proto": p, "host": host, "port": port} for p, port in probes])
    return dict(zip(probes, results, strict=True))


async def from_client(client: ClientNamespace, *probes: tuple[str, int, str]) -> dict[tuple[str, int, str], str]:
    """Probe the VM from the client namespace, from a chosen source address."""
    spec_ = [
        {"proto": p, "host": client.vm_address6 if ":" in src else client.vm_address, "port": port, "source": src}
        for p, port, src in probes
    ]
    _, out, _ = await client.exec(sys.executable, TRAFFIC, "probe", input=json.dumps(spec_).encode())
    return dict(zip(probes, json.loads(out), strict=True))


def TCP(port: int) -> tuple[str, int]:  # noqa: N802
    return ("tcp", port)


def UDP(port: int) -> tuple[str, int]:  # noqa: N802
    return ("udp", port)


async def kernel_listing(vm: NamespaceVm, table: str) -> str:
    _, out, _ = await vm.exec("nft", "list", "table", *table.split(), check=False)
    return out.decode()


# ---------------------------------------------------------------- tests


async def test_defaults_are_in_force_on_provisioning_over_ipv4_and_ipv6_and_no_other_table_is_touched(
    h: Harness, vm: NamespaceVm
) -> None:
    # Someone else's table on the VM (Docker's, fail2ban's ...): Palisade never touches it.
    other = b"table ip other {\n\tset keep {\n\t\ttype ipv4_addr\n\t\telements = { 192.0.2.99 }\n\t}\n}\n"
    await vm.exec("nft", "-f", "-", input=other)
    before_other = await kernel_listing(vm, "ip other")
    assert "192.0.2.99" in before_other
    # Nothing yet: the VM is open.
    assert await from_host(vm, TCP(5002), UDP(5004)) == {TCP(5002): "open", UDP(5004): "open"}
    applied_before = _applies("applied")

    service_id, applied = await h.provisioned(vm, "redis")
    enabled = [e for e in h._events() if e["type"] == "FirewallEnabled" and e["service_id"] == service_id]
    assert [e["payload"] for e in enabled] == [{"version": 1, "rule_count": 8, "software": "redis"}]
    assert applied["payload"]["version"] == 1
    assert applied["payload"]["rule_count"] == 8
    assert applied["payload"]["port_80_open"] is False  # the seed's Redis: no 80/tcp

    allowed = [TCP(22), TCP(23647), TCP(24814), UDP(4242)]
    closed = [TCP(80), TCP(5001), TCP(5002), UDP(5003), UDP(5004)]  # nginx listens on 80: the firewall drops it
    v4 = await from_host(vm, *allowed, *closed)
    assert v4 == {**{p: "open" for p in allowed}, **{p: "blocked" for p in closed}}
    assert await from_host(vm, ("icmp", 0)) == {("icmp", 0): "open"}  # echo is always answered
    v6_allowed = [TCP(23647), UDP(4242), ("icmp", 0)]  # sshd and nginx listen on IPv4 only
    v6_closed = [TCP(5001), TCP(5002), UDP(5003), UDP(5004)]
    v6 = await from_host(vm, *v6_allowed, *v6_closed, v6=True)
    assert v6 == {**{p: "open" for p in v6_allowed}, **{p: "blocked" for p in v6_closed}}

    # The kernel holds exactly the rendered table, from the file the checksum names.
    ruleset = vm.path("/etc/nftables.d/palisade.nft").read_text()
    assert domain.checksum(ruleset) == applied["payload"]["checksum"]
    assert oct(vm.path("/etc/nftables.d/palisade.nft").stat().st_mode & 0o777) == oct(0o600)
    listing = await kernel_listing(vm, "inet palisade")
    assert "policy drop" in listing
    assert "tcp dport 23647 accept" in listing
    assert await kernel_listing(vm, "ip other") == before_other

    state = await h.state(service_id)
    assert (state.enabled, state.version, state.state, state.applied_version) == (True, 1, "applied", 1)
    assert state.applied_checksum == applied["payload"]["checksum"]
    assert [(r.protocol, r.ports) for r in state.rules][:2] == [("tcp", "22"), ("tcp", "18344")]
    [audit] = await h.audited(action="FirewallApplyRequested", outcome="accepted", service_id=service_id)
    assert audit["detail"]["outcome"] == "applied"
    assert await h.audited(action="ServiceProvisioned", outcome="accepted", service_id=service_id)
    assert _applies("applied") == applied_before + 1
    with pytest.raises(QueryRejectedError):
        await h.state("svc-nobody")


async def test_a_source_cidr_admits_clients_inside_it_and_blocks_those_outside_over_ipv4_and_ipv6(
    h: Harness, vm: NamespaceVm
) -> None:
    client = await add_client(vm, ["192.0.2.10", "192.0.2.100", "2001:db8:c::10", "2001:db8:c::1:10"])
    service_id, _ = await h.provisioned(vm, "redis")
    env = await h.replace(
        service_id,
        SSH_ANY,
        R("tcp", "5001", "192.0.2.0/28", "2001:db8:c::/120"),
        R("udp", "5003", "192.0.2.0/28", "2001:DB8:C:0:0:0:0:0/120"),
        R("tcp", "80"),
        R("tcp", "5001", "192.0.2.8/29"),  # inside the /28: merged away
    )
    decision = await h.decision(env)
    assert decision["type"] == "FirewallRulesReplaced"
    assert decision["payload"] == {"version": 2, "rule_count": 4, "merged": 1}
    applied = await h.applied(env)
    assert (applied["type"], applied["payload"]["version"], applied["payload"]["port_80_open"]) == (
        "FirewallApplied",
        2,
        True,
    )

    inside4, outside4, inside6, outside6 = client.addresses
    results = await from_client(
        client,
        ("tcp", 5001, inside4),
        ("tcp", 5001, outside4),
        ("tcp", 5001, inside6),
        ("tcp", 5001, outside6),
        ("udp", 5003, inside4),
        ("udp", 5003, outside4),
        ("udp", 5003, inside6),
        ("udp", 5003, outside6),
        ("tcp", 5002, inside4),
        ("tcp", 5002, inside6),
    )
    assert results == {
        ("tcp", 5001, inside4): "open",
        ("tcp", 5001, outside4): "blocked",
        ("tcp", 5001, inside6): "open",
        ("tcp", 5001, outside6): "blocked",
        ("udp", 5003, inside4): "open",
        ("udp", 5003, outside4): "blocked",
        ("udp", 5003, inside6): "open",
        ("udp", 5003, outside6): "blocked",
        ("tcp", 5002, inside4): "blocked",
        ("tcp", 5002, inside6): "blocked",
    }
    # The host is outside the CIDR; 80 is open to everyone now, 23647 closed again.
    assert await from_host(vm, TCP(5001), TCP(80), TCP(23647), UDP(5003)) == {
        TCP(5001): "blocked",
        TCP(80): "open",
        TCP(23647): "blocked",
        UDP(5003): "blocked",
    }
    state = await h.state(service_id)
    assert [r.sources for r in state.rules if r.ports == "5001"] == [["192.0.2.0/28", "2001:db8:c::/120"]]

    # The dashboard applies changes made to version 1: someone else got there first.
    stale = await h.replace(service_id, SSH_ANY, R("tcp", "5002"), version=1)
    rejection = await h.decision(stale)
    assert (rejection["type"], rejection["payload"]["reason"]) == ("FirewallChangeRejected", "version_conflict")
    assert "version 2" in rejection["payload"]["detail"]
    [audit] = await h.audited(message_id=str(stale.message_id))
    assert (audit["outcome"], audit["reason"]) == ("rejected", "version_conflict")
    assert h.of_correlation(stale) == ["FirewallChangeRejected"]
    assert (await h.state(service_id)).version == 2
    assert await from_host(vm, TCP(5002)) == {TCP(5002): "blocked"}


async def test_every_guard_refuses_with_its_reason_and_nothing_is_applied(h: Harness, vm: NamespaceVm) -> None:
    service_id, _ = await h.provisioned(vm, "redis")
    ruleset = vm.path("/etc/nftables.d/palisade.nft")
    before = (ruleset.read_bytes(), ruleset.stat().st_mtime_ns)
    sessions = h.rt.deps.hosts.stats(vm.identity).sessions
    many = [SSH_ANY, *(R("tcp", str(10000 + 2 * i)) for i in range(500))]
    cases: list[tuple[list[fw.FirewallRule], str]] = [
        ([R("tcp", "443")], "automation_port_required"),
        ([R("tcp", "22", "192.0.2.0/24")], "automation_port_required"),  # not from the automation network
        ([R("tcp", "22", str(NETWORK))], "automation_port_required"),  # its IPv6 half is missing
        ([SSH_ANY, R("tcp", "0")], "port_out_of_range"),
        ([SSH_ANY, R("udp", "65536")], "port_out_of_range"),
        ([SSH_ANY, R("tcp", "9000-8000")], "port_range_reversed"),
        ([SSH_ANY, R("tcp", "https")], "invalid_port"),
        ([SSH_ANY, R("udp")], "ports_required"),
        ([SSH_ANY, R("icmp", "8")], "ports_not_allowed_for_icmp"),
        ([SSH_ANY, R("tcp", "25", icmp_type="echo-request")], "icmp_type_requires_icmp"),
        ([SSH_ANY, R("icmp", icmp_type="ping-of-death")], "invalid_icmp_type"),
        ([SSH_ANY, R("tcp", "5432", "10.0.0.256/8")], "invalid_cidr"),
        ([SSH_ANY, R("tcp", "5432", "10.1.2.3/16")], "invalid_cidr"),
        ([SSH_ANY, R("tcp", "5432", "2001:db8::g/64")], "invalid_cidr"),
        ([SSH_ANY, fw.FirewallRule(protocol="tcp", ports="5432", sources=[])], "no_sources"),
        (many, "too_many_rules"),
    ]
    sent = [(await h.replace(service_id, *rules, version=1), reason) for rules, reason in cases]
    for env, reason in sent:
        decision = await h.decision(env)
        assert (decision["type"], decision["payload"]["reason"]) == ("FirewallChangeRejected", reason), env
        [audit] = await h.audited(message_id=str(env.message_id))
        assert (audit["outcome"], audit["reason"]) == ("rejected", reason)
    assert (await h.decision(sent[4][0]))["payload"]["rule_index"] == 1
    unknown = await h.send(fw.FirewallRulesReplaceRequested(rules=[SSH_ANY], expected_version=0), "svc-nobody")
    assert (await h.decision(unknown))["payload"]["reason"] == "unknown_service"
    assert _metric("palisade_firewall_rejections_total", reason="automation_port_required") >= 3

    # Let any (wrong) apply happen before looking: one valid change is applied after them.
    last = await h.replace(service_id, SSH_ANY, R("tcp", "5001"), version=1)
    assert (await h.applied(last))["payload"]["version"] == 2
    for env, _ in sent:
        assert h.of_correlation(env) == ["FirewallChangeRejected"]  # no apply was asked for
    assert (ruleset.read_bytes(), ruleset.stat().st_mtime_ns) != before
    assert h.rt.deps.hosts.stats(vm.identity).sessions - sessions == 6  # only the last change's apply (6 SSH commands)
    assert await from_host(vm, TCP(5001), TCP(23647)) == {TCP(5001): "open", TCP(23647): "blocked"}


async def test_closing_80_needs_an_acknowledgement_while_the_tls_worker_reports_domains(
    h: Harness, vm: NamespaceVm
) -> None:
    service_id, applied = await h.provisioned(vm, "wordpress")
    assert applied["payload"]["port_80_open"] is True
    assert await from_host(vm, TCP(80)) == {TCP(80): "open"}
    for name in ("shop.example.com", "www.shop.example.com"):
        await h.send(tls.DomainAccepted(domain=name), service_id)

    async def domains(n: int) -> bool:
        return (await h.state(service_id)).tls_domains == n

    await wait_until(lambda: domains(2), what="the TLS worker's domains projected")

    closing = await h.replace(service_id, SSH_ANY, R("tcp", "443"))
    rejection = await h.decision(closing)
    assert (rejection["type"], rejection["payload"]["reason"]) == ("FirewallChangeRejected", "port_80_required_for_tls")
    narrowing = await h.replace(service_id, SSH_ANY, R("tcp", "80", "0.0.0.0/0"), R("tcp", "443"))
    assert (await h.decision(narrowing))["payload"]["reason"] == "port_80_required_for_tls"  # IPv6 closed
    assert await from_host(vm, TCP(80)) == {TCP(80): "open"}

    acknowledged = await h.replace(service_id, SSH_ANY, R("tcp", "443"), acknowledge_tls_impact=True)
    assert (await h.decision(acknowledged))["type"] == "FirewallRulesReplaced"
    applied = await h.applied(acknowledged)
    assert (applied["type"], applied["payload"]["port_80_open"]) == ("FirewallApplied", False)
    [audit] = await h.audited(message_id=str(acknowledged.message_id))
    assert (audit["outcome"], audit["detail"]["tls_impact_acknowledged"]) == ("accepted", True)
    assert await from_host(vm, TCP(80)) == {TCP(80): "blocked"}

    # Port 80 open again; once the domains are gone it may close without a word.
    reopened = await h.replace(service_id, SSH_ANY, R("tcp", "80"), R("tcp", "443"))
    assert (await h.applied(reopened))["payload"]["port_80_open"] is True
    for name in ("shop.example.com", "www.shop.example.com"):
        await h.send(tls.DomainReleased(domain=name), service_id)
    await wait_until(lambda: domains(0), what="domains released")
    closed = await h.replace(service_id, SSH_ANY, R("tcp", "443"))
    assert (await h.decision(closed))["type"] == "FirewallRulesReplaced"


async def test_disable_opens_everything_and_enable_restores_the_defaults(h: Harness, vm: NamespaceVm) -> None:
    service_id, first = await h.provisioned(vm, "redis")
    assert await from_host(vm, TCP(5002), UDP(5004)) == {TCP(5002): "blocked", UDP(5004): "blocked"}
    await h.replace(service_id, SSH_ANY, R("tcp", "5002"))  # the user's own rules ...

    disabled = await h.send(fw.FirewallDisableRequested(), service_id)
    assert (await h.decision(disabled))["type"] == "FirewallDisabled"
    applied = await h.applied(disabled)
    assert applied["payload"] == {
        "version": 3,
        "checksum": domain.checksum(domain.render_disabled()),
        "rule_count": 0,
        "port_80_open": True,
    }
    assert await kernel_listing(vm, "inet palisade") == ""  # the table is gone
    open_ = [TCP(80), TCP(5001), TCP(5002), UDP(5003), UDP(5004)]
    assert await from_host(vm, *open_) == {p: "open" for p in open_}
    assert await from_host(vm, TCP(5001), UDP(5004), v6=True) == {TCP(5001): "open", UDP(5004): "open"}
    state = await h.state(service_id)
    assert (state.enabled, state.rules, state.port_80_open) == (False, [], True)  # ... were deleted
    [audit] = await h.audited(message_id=str(disabled.message_id))
    assert audit["detail"]["rules_deleted"] == 2

    while_off = await h.replace(service_id, SSH_ANY, version=3)
    assert (await h.decision(while_off))["payload"]["reason"] == "firewall_disabled"

    enabled = await h.send(fw.FirewallEnableRequested(), service_id)
    decision = await h.decision(enabled)
    assert (decision["type"], decision["payload"]) == (
        "FirewallEnabled",
        {"version": 4, "rule_count": 8, "software": "redis"},
    )
    applied = await h.applied(enabled)
    assert applied["payload"]["checksum"] == first["payload"]["checksum"]  # the defaults, as provisioned
    assert await from_host(vm, TCP(23647), TCP(5002), UDP(4242), UDP(5004)) == {
        TCP(23647): "open",
        TCP(5002): "blocked",
        UDP(4242): "open",
        UDP(5004): "blocked",
    }
    state = await h.state(service_id)
    assert (state.enabled, len(state.rules), state.state) == (True, 8, "applied")


async def test_a_ruleset_the_kernel_refuses_leaves_the_previous_one_in_force(h: Harness, vm: NamespaceVm) -> None:
    service_id, first = await h.provisioned(vm, "redis")
    ruleset = vm.path("/etc/nftables.d/palisade.nft")
    kernel_before = await kernel_listing(vm, "inet palisade")

    env = await h.replace(service_id, SSH_ANY, R("tcp", "5002"), R("udp", str(REFUSED_PORT)))
    assert (await h.decision(env))["type"] == "FirewallRulesReplaced"  # valid: recorded
    failed = await h.applied(env)
    assert (failed["type"], failed["payload"]["reason"], failed["payload"]["version"]) == (
        "FirewallApplyFailed",
        "ruleset_refused",
        2,
    )
    assert "jump nowhere" in failed["payload"]["detail"]
    [audit] = await h.audited(action="FirewallApplyRequested", outcome="failed", correlation_id=str(env.correlation_id))
    assert audit["reason"] == "ruleset_refused"

    # The previous ruleset is in force: file, kernel and traffic.
    assert domain.checksum(ruleset.read_text()) == first["payload"]["checksum"]
    assert await kernel_listing(vm, "inet palisade") == kernel_before
    assert await from_host(vm, TCP(5002), TCP(23647), UDP(REFUSED_PORT)) == {
        TCP(5002): "blocked",
        TCP(23647): "open",
        UDP(REFUSED_PORT): "blocked",
    }
    state = await h.state(service_id)
    assert (state.version, state.state, state.applied_version) == (2, "failed", 1)
    assert state.applied_checksum == first["payload"]["checksum"]
    assert "ruleset_refused" in (state.last_error or "")

    # Even without `nft -c` first, the file is one transaction: a refused rule at its end
    # leaves the previous table whole (the delete at its start is undone too).
    host = h.rt.deps.hosts.host(vm.identity)
    bad = refusing_render(True, domain.judge_rule_set(
        [{"protocol": "tcp", "ports": "22"}, {"protocol": "udp", "ports": str(REFUSED_PORT)}],
        automation_sources=domain.ANYWHERE, port_80_was_open=True, tls_domains=0, acknowledge_tls_impact=False,
    ).rules)  # fmt: skip
    result = await host.run(["nft", "-f", "-"], input=bad, check=False)
    assert result.exit_status != 0
    assert await kernel_listing(vm, "inet palisade") == kernel_before
    previous = await h.state(service_id)
    assert previous.applied_version == 1

    # The next valid change goes through.
    fixed = await h.replace(service_id, SSH_ANY, R("tcp", "5002"), version=2)
    applied = await h.applied(fixed)
    assert (applied["type"], applied["payload"]["version"]) == ("FirewallApplied", 3)
    assert await from_host(vm, TCP(5002), TCP(23647)) == {TCP(5002): "open", TCP(23647): "blocked"}
    assert (await h.state(service_id)).state == "applied"
    listing = await read_table(host)
    domain.compare_with_kernel(listing, True, (domain.rule("tcp", "22"), domain.rule("tcp", "5002")))


async def test_a_kernel_that_drifted_is_put_back_by_the_next_apply(h: Harness, vm: NamespaceVm) -> None:
    service_id, first = await h.provisioned(vm, "redis")
    await vm.exec("nft", "delete", "table", "inet", "palisade")  # by hand, or a reboot
    assert await from_host(vm, TCP(5002)) == {TCP(5002): "open"}
    env = await h.send(fw.FirewallApplyRequested(reason="operator"), service_id)
    applied = await h.applied(env)
    assert (applied["type"], applied["payload"]["checksum"]) == ("FirewallApplied", first["payload"]["checksum"])
    [audit] = await h.audited(action="FirewallApplyRequested", correlation_id=str(env.correlation_id))
    assert (audit["outcome"], audit["detail"]["outcome"]) == ("accepted", "drift_repaired")
    assert await from_host(vm, TCP(5002), TCP(23647)) == {TCP(5002): "blocked", TCP(23647): "open"}
    again = await h.send(fw.FirewallApplyRequested(reason="operator"), service_id)
    await h.applied(again)
    [audit] = await h.audited(action="FirewallApplyRequested", correlation_id=str(again.correlation_id))
    assert (audit["outcome"], audit["detail"]["outcome"]) == ("accepted", "unchanged")


async def test_an_unreachable_vm_goes_round_the_retry_ladder_and_converges(h: Harness, vm: NamespaceVm) -> None:
    service_id, _ = await h.provisioned(vm, "redis")
    # Stopping sshd ends every process in the VM but nginx: traffic checks use nginx's 80/tcp.

    await stop_sshd(vm)
    retried = _retried()
    env = await h.replace(service_id, SSH_ANY, R("tcp", "80"))
    assert (await h.decision(env))["type"] == "FirewallRulesReplaced"  # recorded while the VM is down
    await wait_until(lambda: _retried() > retried, what="the apply retried")
    assert (await h.state(service_id)).state == "pending"
    await start_sshd(vm)
    assert (await h.applied(env))["type"] == "FirewallApplied"
    assert await from_host(vm, TCP(80)) == {TCP(80): "open"}

    # Down for longer than the ladder: parked, then the reconcile job asks again.
    await stop_sshd(vm)
    env = await h.replace(service_id, SSH_ANY, R("tcp", "5002"))
    parked = {"action": "FirewallApplyRequested", "outcome": "failed", "correlation_id": str(env.correlation_id)}
    await wait_until(lambda: bool(h.audits(**parked)), what="the apply parked after the ladder")
    assert (await h.state(service_id)).state == "pending"
    await start_sshd(vm)
    assert await h.rt.run_job("reconcile-pending-applies") == 0
    assert (await h.state(service_id)).state == "pending"  # not due yet
    h.clock.advance(timedelta(seconds=FirewallSettings().reconcile_after_seconds + 1))
    await h.rt.run_job("reconcile-pending-applies")

    async def applied() -> bool:
        return (await h.state(service_id)).state == "applied"

    await wait_until(applied, what="the reconciled apply")
    assert await from_host(vm, TCP(80)) == {TCP(80): "blocked"}


async def test_a_vm_whose_host_key_changed_is_refused_and_keeps_its_ruleset(h: Harness, vm: NamespaceVm) -> None:
    service_id, _ = await h.provisioned(vm, "redis")
    vm = await restart_sshd(vm, new_host_key=True)  # same address, another machine (nginx kept)
    env = await h.replace(service_id, SSH_ANY, R("tcp", "80"))
    failed = await h.applied(env)
    assert (failed["type"], failed["payload"]["reason"]) == ("FirewallApplyFailed", "host_key_mismatch")
    [audit] = await h.audited(action="FirewallApplyRequested", outcome="failed", correlation_id=str(env.correlation_id))
    assert audit["detail"]["presented"] == vm.host_key_fingerprint
    assert await from_host(vm, TCP(80)) == {TCP(80): "blocked"}

    # The platform announces the reinstalled VM with its new key: the rules go there.
    await h.provision(vm, "redis", service_id)

    async def applied() -> bool:
        return (await h.state(service_id)).state == "applied"

    await wait_until(applied, what="applied on the reinstalled VM")
    assert await from_host(vm, TCP(80)) == {TCP(80): "open"}


async def test_the_cli_sets_shows_disables_and_enables(h: Harness, vm: NamespaceVm) -> None:
    service_id, _ = await h.provisioned(vm, "redis")
    env = {**os.environ, "PALISADE_AMQP_URL": AMQP_URL, "COLUMNS": "200"}

    def palisade(*args: str, root: bool = False) -> subprocess.CompletedProcess[str]:
        # `palisade firewall ...` (the entry point, loading every worker's commands) or,
        # quicker to start, the firewall's typer app alone.
        code = "from palisade_firewall.cli import app; app(prog_name='palisade firewall')"
        start = ["-m", "palisade_events.cli.main", "firewall"] if root else ["-c", code]
        return subprocess.run([sys.executable, *start, *args], capture_output=True, text=True, env=env, timeout=60)

    done = await asyncio.to_thread(
        palisade,
        "set",
        service_id,
        "--rule",
        "tcp:22:any",
        "--rule",
        "tcp:5001:any4",
        "--rule",
        "udp:5003:2001:db8::/32,::/0",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FirewallApplied" in done.stdout
    assert await from_host(vm, TCP(5001), UDP(5003)) == {TCP(5001): "open", UDP(5003): "blocked"}
    assert await from_host(vm, TCP(5001), UDP(5003), v6=True) == {TCP(5001): "blocked", UDP(5003): "open"}

    shown = await asyncio.to_thread(palisade, "show", service_id, root=True)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "firewall enabled, version 2, applied" in shown.stdout
    assert "tcp   5001         Any IPv4 address" in shown.stdout

    refused = await asyncio.to_thread(palisade, "set", service_id, "--rule", "tcp:443")
    assert refused.returncode == 1
    assert "automation_port_required" in refused.stdout

    off = await asyncio.to_thread(palisade, "disable", service_id)
    assert off.returncode == 0, off.stdout + off.stderr
    assert await from_host(vm, TCP(5002)) == {TCP(5002): "open"}
    on = await asyncio.to_thread(palisade, "enable", service_id)
    assert on.returncode == 0, on.stdout + on.stderr
    assert await from_host(vm, TCP(5002), TCP(23647)) == {TCP(5002): "blocked", TCP(23647): "open"}
    unknown = await asyncio.to_thread(palisade, "show", "svc-nobody")
    assert (unknown.returncode, "unknown_service" in unknown.stdout) == (1, True)
