"""Real SMTP parts for the relay's tests: an aiosmtpd upstream that records what it
got, smtplib and swaks clients bound to 127.0.0.x source addresses (each standing
for one service's private IP), and a throwaway certificate for STARTTLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import smtp as contract
from tests.fixtures import Collector, wait_until
from tests.provisioning import service_provisioned

SENDER_DOMAIN = "vm.example.app"
PRIVATE_NETWORK = "127.0.0.0/24"  # 127.0.1.x stands for addresses outside it


# ------------------------------------------------------------------ upstream sink


@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes

    def header(self, name: str) -> list[str]:
        head = self.content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        unfolded = re.sub(r"\r\n[ \t]", " ", head)
        return [
            line.split(":", 1)[1].strip()
            for line in unfolded.split("\r\n")
            if line.lower().startswith(name.lower() + ":")
        ]


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook names
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.sink.refuse:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        assert isinstance(envelope.original_content, bytes)
        self.sink.data_arrived.set()
        await self.sink.gate.wait()
        self.sink.messages.append(
            Delivered(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 OK stored"


class Sink:
    """The smarthost: a real aiosmtpd server on loopback that keeps every message.
    With `tls` and `credentials` it requires STARTTLS and AUTH, as a provider would."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, credentials: tuple[str, str] | None = None) -> None:
        self.messages: list[Delivered] = []
        self.refuse: set[str] = set()
        self.port = 0
        self.logins: list[str] = []
        self.gate = asyncio.Event()  # cleared: messages wait before they are accepted
        self.gate.set()
        self.data_arrived = asyncio.Event()
        self._tls = tls
        self._credentials = credentials
        self._server: asyncio.Server | None = None
        self._sessions: set[Any] = set()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self._credentials is not None
            and (data.login.decode(), data.password.decode()) == self._credentials
        )
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok)

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        sink = self

        class SinkSession(SMTP):
            def connection_made(self, transport: Any) -> None:
                if self.transport is None:
                    sink._sessions.add(self)
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                sink._sessions.discard(self)
                super().connection_lost(error)

        def factory() -> SMTP:
            return SinkSession(
                _SinkHandler(self),
                hostname="sink.test",
                tls_context=self._tls,
                require_starttls=self._tls is not None,
                auth_required=self._credentials is not None,
                authenticator=self._authenticate if self._credentials else None,
                loop=loop,
            )

        self._server = await loop.create_server(factory, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Down: no listener, and the relay's pooled connections are cut."""
        if self._server is not None:
            self._server.close()
            for s in list(self._sessions):
                if s.transport is not None:
                    s.transport.close()
            await self._server.wait_closed()
            self._server = None

    def to(self, address: str) -> list[Delivered]:
        return [m for m in self.messages if address in m.rcpt_tos]

    def sent_by(self, sender: str) -> list[Delivered]:
        return [m for m in self.messages if m.mail_from == sender]


# ------------------------------------------------------------------ certificates


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


# ------------------------------------------------------------------ messages and clients


def message(
    from_header: str,
    *,
    to: str = "ops@example.com",
    headers: Sequence[str] = (),
    body: str = "Your password reset code is 482913.",
    message_id: str | None = "<reset-1@app.example>",
) -> bytes:
    lines = [f"From: {from_header}", f"To: {to}", "Subject: Password reset"]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    lines += [*headers, "", body, ""]
    return "\r\n".join(lines).encode()


@dataclass
class Outcome:
    """What a client saw: the stage it stopped at ("sent" when DATA got 250) and the reply."""

    stage: str
    code: int
    text: str
    refused_rcpts: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


def _text(b: bytes | str) -> str:
    return b.decode() if isinstance(b, bytes) else b


def smtp_send(
    port: int,
    source_ip: str,
    mail_from: str,
    rcpts: Sequence[str],
    content: bytes,
    *,
    raw: bool = False,
    mail_options: Sequence[str] = (),
    starttls: ssl.SSLContext | None = None,
) -> Outcome:
    """One transaction with smtplib, from `source_ip`; stops at the first refusal.
    `raw` sends the DATA bytes as they are (smtplib would fix bare LFs)."""
    try:
        client = smtplib.SMTP("127.0.0.1", port, source_address=(source_ip, 0), timeout=15)
    except smtplib.SMTPConnectError as exc:
        return Outcome("connect", exc.smtp_code, _text(exc.smtp_error))
    with client:
        client.ehlo("app.example")
        if starttls is not None:
            client.starttls(context=starttls)
            client.ehlo("app.example")
        return transact(client, mail_from, rcpts, content, raw=raw, mail_options=mail_options)


def transact(
    client: smtplib.SMTP,
    mail_from: str,
    rcpts: Sequence[str],
    content: bytes,
    *,
    raw: bool = False,
    mail_options: Sequence[str] = (),
) -> Outcome:
    code, text = client.mail(mail_from, list(mail_options))
    if code != 250:
        client.rset()
        return Outcome("mail", code, _text(text))
    refused: dict[str, tuple[int, str]] = {}
    for rcpt in rcpts:
        code, text = client.rcpt(rcpt)
        if code not in (250, 251):
            refused[rcpt] = (code, _text(text))
    if len(refused) == len(rcpts):
        client.rset()
        first_code, first_text = next(iter(refused.values()))
        return Outcome("rcpt", first_code, first_text, refused)
    if raw:
        code, text = client.docmd("DATA")
        assert code == 354, (code, text)
        client.send(content + b".\r\n")
        code, text = client.getreply()
    else:
        code, text = client.data(content)
    return Outcome("sent" if code == 250 else "data", code, _text(text), refused)


def ehlo_features(port: int, source_ip: str) -> dict[str, str]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source_ip, 0), timeout=15) as client:
        client.ehlo("app.example")
        return dict(client.esmtp_features)


@dataclass
class SwaksResult:
    returncode: int
    transcript: str

    def server_replies(self) -> list[str]:
        """Every reply line from the server, successful (`<-`) or not (`<**`)."""
        return [
            re.sub(r"^<(-|\*\*) +", "", line) for line in self.transcript.splitlines() if re.match(r"^<(-|\*\*) ", line)
        ]

    def refusals(self) -> list[str]:
        return [re.sub(r"^<\*\* +", "", line) for line in self.transcript.splitlines() if line.startswith("<** ")]


async def swaks(port: int, source_ip: str, *args: str) -> SwaksResult:
    proc = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"127.0.0.1:{port}",
        "--local-interface",
        source_ip,
        "--helo",
        "app.example",
        "--timeout",
        "15",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return SwaksResult(proc.returncode, out.decode("utf-8", "replace"))


# ------------------------------------------------------------------ the bus side


async def provision(client: PalisadeClient, service_id: str, slug: str, private_ip: str) -> None:
    """Announce a service as the platform would, and wait until the relay knows it."""
    await client.publish(
        service_provisioned(
            service_id,
            slug[:30],
            software="wordpress",
            hostname=f"{slug}.vm-hosts.example.net",
            ipv4="203.0.113.10",
            private_ip=private_ip,
            ssh_host="203.0.113.10",
        ),
        service_id=service_id,
    )

    async def known() -> bool:
        try:
            reply = await relay_status(client, service_id)
        except QueryRejectedError:
            return False
        return reply.private_ip == private_ip

    await wait_until(known, what=f"{service_id} projected by the relay")


async def relay_status(client: PalisadeClient, service_id: str) -> contract.RelayStatusReply:
    reply: contract.RelayStatusReply = await client.request(contract.RelayStatus(service_id=service_id), timeout=5)
    return reply


def payloads(collector: Collector, type_name: str, **match: Any) -> list[dict[str, Any]]:
    """Bodies of collected events of one type whose envelope or payload fields match."""
    out = []
    for m in collector.messages:
        body = m.json()
        if body.get("type") != type_name:
            continue
        fields = {**body, **body.get("payload", {})}
        if all(fields.get(k) == v for k, v in match.items()):
            out.append(body)
    return out


def audits(collector: Collector, **match: Any) -> list[dict[str, Any]]:
    out = []
    for m in collector.messages:
        body = m.json()
        fields = {**body, **body.get("detail", {})}
        if all(fields.get(k) == v for k, v in match.items()):
            out.append(body)
    return out
