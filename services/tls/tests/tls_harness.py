"""Talking to the TLS worker as the dashboard, the orchestrator and the firewall would, and
looking at what the VM's nginx serves."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from acme_ca import AcmeCa
from cryptography import x509

from palisade_events import ManualClock, Payload, WorkerRuntime
from palisade_events.client import PalisadeClient
from palisade_events.contract import firewall, platform
from palisade_events.contract import tls as contract
from palisade_events.contract.platform import SshEndpoint
from palisade_hostctl.testvm import NamespaceVm
from tests.fixtures import Collector, wait_until

PLATFORM_DOMAIN = "vm.example.net"


def unique_domain(label: str = "site") -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}.example.com"


@dataclass(frozen=True)
class Served:
    """What nginx presented for one SNI."""

    serial: str
    names: tuple[str, ...]
    not_after: datetime


async def served(address: str, server_name: str, root_pem: bytes, port: int = 443) -> Served:
    """A TLS handshake to the VM with `server_name` as SNI, verified against `root_pem`
    (chain and name): what certificate nginx serves for that name."""
    context = ssl.create_default_context(cadata=root_pem.decode())
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(address, port, ssl=context, server_hostname=server_name), 5
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
    cert = x509.load_der_x509_certificate(der)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    return Served(format(cert.serial_number, "x"), tuple(names), cert.not_valid_after_utc)


async def handshake_refused(address: str, server_name: str, root_pem: bytes) -> str | None:
    """None when the handshake verifies for `server_name`; else why not."""
    try:
        await served(address, server_name, root_pem)
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message or str(exc)
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def tree_snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root`: its sha256 and mtime, to prove nothing was written."""
    out: dict[str, tuple[str, int]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            try:
                data = path.read_bytes()
                out[str(path.relative_to(root))] = (hashlib.sha256(data).hexdigest(), path.stat().st_mtime_ns)
            except FileNotFoundError:
                continue
    return out


class Harness:
    def __init__(
        self,
        rt: WorkerRuntime[Any],
        client: PalisadeClient,
        events: Collector,
        audit: Collector,
        clock: ManualClock,
        ca: AcmeCa,
    ) -> None:
        self.rt, self.client, self.events, self.audit, self.clock, self.ca = rt, client, events, audit, clock, ca
        self.firewall_versions: dict[str, int] = {}

    # ---- as the orchestrator, the firewall, the dashboard

    async def provision(self, vm: NamespaceVm, *, port_80_open: bool | None = None) -> tuple[str, str]:
        """A service on `vm` whose hostname resolves to it; waits until its first certificate
        is served (or, with port 80 closed first, until its hostname is blocked)."""
        service_id = f"svc-{uuid.uuid4().hex[:10]}"
        # Eight characters: a six-hex label is all digits one time in sixteen, and the session's
        # secrets scan would then take it for an MFA code that happens to have the same digits.
        name = f"redis-{uuid.uuid4().hex[:8]}"
        hostname = f"{name}-u76.{PLATFORM_DOMAIN}"
        await self.ca.dns.add_a(hostname, vm.address)
        if port_80_open is not None:
            await self.firewall(service_id, port_80_open=port_80_open)
        await self.client.publish(
            platform.ServiceProvisioned(
                service_id=service_id,
                name=name,
                software="redis",
                account_id="acc-1",
                hostname=hostname,
                ipv4=vm.address,
                private_ip=vm.address,
                ssh=SshEndpoint(host=vm.address, port=vm.port, host_key=vm.host_key),
            ),
            service_id=service_id,
        )
        if port_80_open is False:
            await self.event("DomainBlocked", service_id, domain=hostname)
        else:
            await wait_until(
                lambda: bool(
                    self.payloads("CertificateIssued", service_id)
                    or self.payloads("CertificateIssuanceFailed", service_id)
                ),
                timeout=30,  # about 2 s alone; the whole suite on two cores stretches it
                what=f"the first certificate of {service_id}",
            )
            failed = self.payloads("CertificateIssuanceFailed", service_id)
            assert not failed, failed[0]["payload"]
            issued = await self.event("CertificateIssued", service_id)
            await self.applied(service_id, issued["payload"]["serial"])
        return service_id, hostname

    async def firewall(self, service_id: str, *, port_80_open: bool) -> None:
        version = self.firewall_versions.get(service_id, 0) + 1
        self.firewall_versions[service_id] = version
        await self.client.publish(
            firewall.FirewallApplied(
                version=version, checksum=f"sha256:{version}", rule_count=3, port_80_open=port_80_open
            ),
            service_id=service_id,
        )

    async def send(self, payload: Payload, service_id: str) -> Any:
        return await self.client.publish(payload, service_id=service_id)

    async def add(self, service_id: str, domain: str) -> Any:
        return await self.send(contract.DomainAdded(domain=domain), service_id)

    async def domains(self, service_id: str) -> contract.DomainList:
        reply: contract.DomainList = await self.client.request(contract.GetDomains(service_id=service_id), timeout=5)
        return reply

    async def state_of(self, service_id: str, domain: str) -> str:
        listing = await self.domains(service_id)
        return next(d.state for d in listing.domains if d.domain == domain)

    # ---- what the worker said

    def payloads(self, type_: str, service_id: str | None = None, **match: Any) -> list[dict[str, Any]]:
        out = []
        for message in list(self.events.messages):
            env = message.json()
            if env["type"] != type_ or (service_id is not None and env["service_id"] != service_id):
                continue
            if all(env["payload"].get(k) == v for k, v in match.items()):
                out.append(env)
        return out

    async def event(
        self, type_: str, service_id: str | None = None, *, after: int = 0, timeout: float = 15, **match: Any
    ) -> dict[str, Any]:
        """The `after`-th (0 = first) event of this type (and payload values) for the service."""
        try:
            await wait_until(
                lambda: len(self.payloads(type_, service_id, **match)) > after,
                timeout=timeout,
                what=f"{type_} {match or ''} #{after + 1} for {service_id}",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await self._state_of(service_id)}") from None
        return self.payloads(type_, service_id, **match)[after]

    async def _state_of(self, service_id: str | None) -> str:
        """What a timed-out wait reports besides its timeout: the service's scheduling row, the
        worker's clock, and the service's audit trail (a rare CI timeout left nothing else)."""
        if service_id is None:
            return ""
        async with self.rt.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT next_attempt_at, issue_requested_at, attempt_reason, failures, retry_not_before, last_error"
                " FROM services WHERE service_id = $1",
                service_id,
            )
        trail = [(r.get("action"), r.get("outcome"), r.get("reason")) for r in self.audits(service_id=service_id)]
        return f"clock {self.clock.now()}; service row {dict(row) if row else None}; audit trail {trail}"

    async def decision(self, env: Any) -> dict[str, Any]:
        """The first event caused by a command."""

        def found() -> list[dict[str, Any]]:
            return [m.json() for m in self.events.messages if m.json()["causation_id"] == str(env.message_id)]

        await wait_until(lambda: bool(found()), what=f"decision on {env.type}")
        return found()[0]

    def audits(self, **match: Any) -> list[dict[str, Any]]:
        records = [m.json() for m in self.audit.messages]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    async def applied(self, service_id: str, serial: str) -> dict[str, Any]:
        """Waits until the VM's nginx was given certificate `serial`."""
        return await self.event("TlsConfigApplied", service_id, serial=serial)

    # ---- what nginx serves

    async def serves(self, vm: NamespaceVm, server_name: str, serial: str, timeout: float = 10) -> Served:
        """Polls until nginx serves certificate `serial` for `server_name` (after a reload an
        old worker process may still answer a connection or two)."""
        seen: list[Served | str] = []

        async def check() -> bool:
            try:
                got = await served(vm.address, server_name, self.ca.root_pem)
            except (ssl.SSLError, OSError) as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
                return False
            seen.append(got)
            return got.serial == serial

        await wait_until(check, timeout=timeout, what=f"certificate {serial} for {server_name} (saw {seen[-1:]})")
        result = seen[-1]
        assert isinstance(result, Served)
        return result

    async def run_job(self, name: str) -> None:
        await self.rt.run_job(name)
