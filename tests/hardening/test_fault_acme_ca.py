"""The ACME CA failing when a certificate is due for renewal: Pebble not answering
(stopped), gone (killed: connection refused), then something on its port answering
every request with a 503 problem and `Retry-After`. Each attempt ends in
`CertificateRenewalFailed` with the reason, the next one backs off (1 min, doubling,
never before the CA's Retry-After), and the VM's nginx keeps serving the old
certificate throughout. Time moves by the worker's clock; no test step waits for it.

Pebble, its DNS and the TLS harness are the TLS worker's own test parts
(services/tls/tests), run here with a Pebble of this test's own, since the test kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from palisade_events import ManualClock
from palisade_events.secrets import generate_key
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from palisade_hostctl import HostctlSettings
from palisade_tls.settings import TlsSettings
from palisade_tls.worker import spec
from tests.vms import MakeVms, VmSession

pytestmark = pytest.mark.root

TLS_TESTS = Path(__file__).resolve().parents[2] / "services" / "tls" / "tests"
RETRY_AFTER = 3600


def tls_test_module(name: str) -> Any:
    """A module of the TLS worker's tests (they import each other as top-level modules)."""
    if str(TLS_TESTS) not in sys.path:
        sys.path.append(str(TLS_TESTS))
    return importlib.import_module(name)


def _pebble_pid(work: Path) -> int:
    """The Pebble started for `work` (its config file is unique to this test)."""
    config = str(work / "pebble.json")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"pebble") and config.encode() in argv:
                return int(entry.name)
    raise AssertionError(f"no pebble running with {config}")


class ProblemServer:
    """HTTPS on the CA's address answering every request `503` with an ACME problem
    document and `Retry-After`, as a CA under maintenance does."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        self.port, self.cert, self.key = port, cert, key
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            body = b'{"type": "urn:ietf:params:acme:error:serverInternal", "detail": "down for maintenance"}'
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
                + f"Retry-After: {RETRY_AFTER}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    async def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=context)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def ca(tmp_path: Path) -> AsyncIterator[tuple[Any, Path]]:
    acme_ca = tls_test_module("acme_ca")
    work = tmp_path / "pebble"
    work.mkdir()
    async with acme_ca.running_ca(work) as running:
        try:
            yield running, work
        finally:
            # Never left stopped: the harness then ends it as usual (a killed one is already gone).
            with contextlib.suppress(ProcessLookupError, AssertionError):
                os.kill(_pebble_pid(work), signal.SIGCONT)


@pytest.mark.timeout(120)
async def test_a_failing_ca_backs_off_says_renewal_failed_and_the_old_certificate_stays_served(
    run_worker: Any,
    client: Any,
    collect: Any,
    testvms: VmSession,
    make_vms: MakeVms,
    ca: tuple[Any, Path],
    monkeypatch: pytest.MonkeyPatch,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca-bundle.pem")  # the worker trusts only its setting
    acme, work = ca
    harness_module = tls_test_module("tls_harness")
    settings = TlsSettings(
        acme_directory=acme.directory,
        acme_ca_bundle=acme.listener_certificate,
        key=SecretStr(generate_key("fault")),
        platform_domains=[harness_module.PLATFORM_DOMAIN],
        dns_servers=["127.0.0.1"],
        dns_port=acme.dns.worker.dns_port,
        acme_poll_timeout_seconds=30,
        acme_request_timeout_seconds=2,  # a CA that does not answer is given up on after this
        dns_every_seconds=3600,
        issue_every_seconds=3600,
        expiry_every_seconds=3600,
    )
    hostctl = HostctlSettings(
        key_file=testvms.automation_key,
        testvm_root=testvms.root,
        connect_attempts=2,
        retry_backoff_seconds=0.05,
        command_timeout=10,
    )
    clock = ManualClock(datetime.now(UTC))  # Pebble's clock is real: start from now
    events = await collect(EVENTS_EXCHANGE, "tls.#")
    audit = await collect(AUDIT_EXCHANGE, "tls.#")
    rt = await run_worker(spec(settings, hostctl), clock=clock, db_pool_size=20)
    h = harness_module.Harness(rt, client, events, audit, clock, acme)
    [vm] = await make_vms(1)
    service_id, hostname = await h.provision(vm)
    old = (await h.event("CertificateIssued", service_id))["payload"]["serial"]
    listing = await h.domains(service_id)
    assert listing.certificate is not None
    h.clock.set(listing.certificate.renew_at + timedelta(seconds=1))
    pebble = _pebble_pid(work)
    lines = []

    async def attempt(fault: str, n: int) -> dict[str, Any]:
        started = time.perf_counter()
        await h.run_job("request-due-issues")
        failed = await h.event("CertificateRenewalFailed", service_id, after=n - 1, timeout=20)
        took = time.perf_counter() - started
        payload = failed["payload"]
        assert payload["attempt"] == n
        assert payload["current_serial"] == old
        await h.serves(vm, hostname, old)  # nginx keeps the certificate it has
        next_at = datetime.fromisoformat(payload["next_attempt_at"])
        lines.append(
            f"{fault}: CertificateRenewalFailed({payload['reason']}: {payload['detail'][:80]!r}) after {took:.2f}s,"
            f" next attempt in {(next_at - h.clock.now()).total_seconds():.0f}s, old certificate still served"
        )
        return dict(payload)

    # Not answering at all (stopped): the request times out.
    os.kill(pebble, signal.SIGSTOP)
    first = await attempt("pebble stopped", 1)
    assert first["reason"] == "ca_unreachable"
    assert datetime.fromisoformat(first["next_attempt_at"]) == h.clock.now() + timedelta(minutes=1)
    # Not retried before the back-off ends.
    h.clock.advance(timedelta(seconds=59))
    await h.run_job("request-due-issues")
    assert len(h.payloads("CertificateRenewalFailed", service_id)) == 1

    # Gone: connections refused.
    os.kill(pebble, signal.SIGKILL)
    h.clock.advance(timedelta(seconds=2))
    second = await attempt("pebble killed", 2)
    assert second["reason"] == "ca_unreachable"
    assert datetime.fromisoformat(second["next_attempt_at"]) == h.clock.now() + timedelta(minutes=2)

    # Answering 503 with Retry-After: the worker waits at least that long, not 4 minutes.
    problems = ProblemServer(
        urlsplit(acme.directory).port or 443, acme.listener_certificate, acme.listener_certificate.with_suffix(".key")
    )
    await problems.start()
    try:
        h.clock.advance(timedelta(minutes=2, seconds=1))
        third = await attempt(f"CA answering 503 + Retry-After {RETRY_AFTER}", 3)
    finally:
        await problems.stop()
    assert third["reason"] == "ca_error"
    assert datetime.fromisoformat(third["next_attempt_at"]) >= h.clock.now() + timedelta(seconds=RETRY_AFTER - 60)
    assert problems.requests >= 1
    failed_audits = h.audits(action="CertificateIssueRequested", outcome="failed", service_id=service_id)
    assert [a["reason"] for a in failed_audits] == ["ca_unreachable", "ca_unreachable", "ca_error"]
    assert len(h.payloads("CertificateIssued", service_id)) == 1  # nothing replaced the old one

    line = "[fault] ACME CA failing at renewal: " + "; ".join(lines)
    record_property("fault_figures", line)
    with capsys.disabled():
        print("\n" + line)
