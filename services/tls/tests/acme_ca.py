"""A real ACME CA and real DNS for the TLS worker's tests (started once per session by conftest).

- Pebble (Debian's `pebble`), on loopback ports chosen for this session, with a
  certificate made here for its own HTTPS listener (the package ships none): the worker's
  ACME client trusts exactly that certificate (`PALISADE_TLS_ACME_CA_BUNDLE`; the
  machine's REQUESTS_CA_BUNDLE points elsewhere). `httpPort: 80`, so HTTP-01 validation
  goes to port 80 of the address DNS gives: a test VM's nginx. `PEBBLE_VA_NOSLEEP=1`
  for speed; Pebble's random bad-nonce rejections stay on (the client retries them).
  `PEBBLE_AUTHZREUSE=0`: every order is validated, renewals included.
- Two `pebble-challtestsrv` DNS servers: one answers the worker's resolver, the other
  Pebble's validation lookups (`-dnsserver`). Tests normally write the same records to
  both (`dns.add_a`); writing only the CA's view models a CA that sees other DNS than
  the worker (stale records, split horizon), which is how a test makes the CA refuse
  a validation that the worker's self-check passed. Both start with no default
  answers (`-defaultIPv4 "" -defaultIPv6 ""`), so an unknown name has no records.
- Pebble's root (for verifying the certificates it issues) comes from its management
  port, `/roots/0`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

READY_TIMEOUT = 15.0
CERTIFICATE_LIFETIME = dt.timedelta(days=90)  # like Let's Encrypt's


def _free_port() -> int:
    """A loopback port free for both TCP and UDP (a DNS server listens on both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free loopback port")


def _listener_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for Pebble's own HTTPS listener (127.0.0.1, localhost)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test listener")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "listener.pem", directory / "listener.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class ChallTestSrv:
    """One pebble-challtestsrv: a DNS server whose records are set over HTTP."""

    dns_port: int
    management_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    async def post(self, path: str, body: dict[str, object]) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            response = await http.post(self.url + path, content=json.dumps(body))
            response.raise_for_status()


@dataclass
class Dns:
    """The records of both DNS views: what the worker resolves and what the CA resolves."""

    worker: ChallTestSrv
    ca: ChallTestSrv

    def _views(self, ca_only: bool) -> list[ChallTestSrv]:
        return [self.ca] if ca_only else [self.worker, self.ca]

    async def add_a(self, host: str, *addresses: str, ca_only: bool = False) -> None:
        for view in self._views(ca_only):
            await view.post("/add-a", {"host": host, "addresses": list(addresses)})

    async def clear_a(self, host: str, *, ca_only: bool = False) -> None:
        for view in self._views(ca_only):
            await view.post("/clear-a", {"host": host})

    async def add_aaaa(self, host: str, *addresses: str) -> None:
        for view in self._views(False):
            await view.post("/add-aaaa", {"host": host, "addresses": list(addresses)})

    async def set_cname(self, host: str, target: str) -> None:
        for view in self._views(False):
            await view.post("/set-cname", {"host": host, "target": target})


@dataclass
class AcmeCa:
    directory: str
    listener_certificate: Path  # what the ACME client trusts for Pebble's HTTPS
    root_pem: bytes  # Pebble's root: what issued certificates verify against
    dns: Dns


class _Processes:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(self, name: str, *argv: str, env: dict[str, str] | None = None) -> None:
        log = os.open(self.logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        finally:
            os.close(log)
        self.procs.append((name, proc))

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.returncode is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited ({proc.returncode}): {tail}")

    async def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _until(what: str, probe: object, procs: _Processes) -> object:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while True:
        procs.check()
        try:
            return await probe()  # type: ignore[operator]
        except (httpx.HTTPError, OSError):
            if loop.time() > deadline:
                raise RuntimeError(f"{what} did not answer within {READY_TIMEOUT}s") from None
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_ca(work: Path) -> AsyncIterator[AcmeCa]:
    """Pebble and two challtestsrv DNS servers, stopped on exit."""
    procs = _Processes(work)
    views = []
    try:
        for name in ("dns-worker", "dns-ca"):
            view = ChallTestSrv(dns_port=_free_port(), management_port=_free_port())
            await procs.start(
                name,
                "pebble-challtestsrv",
                "-defaultIPv4", "",
                "-defaultIPv6", "",
                "-dns01", f"127.0.0.1:{view.dns_port}",
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-management", f"127.0.0.1:{view.management_port}",
            )  # fmt: skip
            views.append(view)
        listener_cert, listener_key = _listener_certificate(work)
        acme_port, management_port = _free_port(), _free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{acme_port}",
                "managementListenAddress": f"127.0.0.1:{management_port}",
                "certificate": str(listener_cert),
                "privateKey": str(listener_key),
                "httpPort": 80,
                "tlsPort": _free_port(),  # TLS-ALPN-01 is not used
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "certificateValidityPeriod": int(CERTIFICATE_LIFETIME.total_seconds()),
            }
        }
        (work / "pebble.json").write_text(json.dumps(config))
        await procs.start(
            "pebble",
            "pebble",
            "-config", str(work / "pebble.json"),
            "-dnsserver", f"127.0.0.1:{views[1].dns_port}",
            env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0"},
        )  # fmt: skip
        directory = f"https://127.0.0.1:{acme_port}/dir"
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=listener_cert), trust_env=False, timeout=5
        ) as http:

            async def directory_answers() -> None:
                (await http.get(directory)).raise_for_status()

            async def root() -> bytes:
                response = await http.get(f"https://127.0.0.1:{management_port}/roots/0")
                response.raise_for_status()
                return response.content

            await _until("pebble", directory_answers, procs)
            root_pem = await _until("pebble's management port", root, procs)
            for view in views:

                async def management(v: ChallTestSrv = view) -> None:
                    await v.post("/clear-a", {"host": "probe.invalid"})

                await _until("pebble-challtestsrv", management, procs)
        yield AcmeCa(directory, listener_cert, root_pem, Dns(worker=views[0], ca=views[1]))  # type: ignore[arg-type]
    finally:
        await procs.stop()
