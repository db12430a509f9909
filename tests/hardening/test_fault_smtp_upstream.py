"""The relay's smarthost failing while services send mail through it: down (no
listener, pooled connections cut), answering 4xx, and hanging past the relay's
timeout, between batches of normal service.

For every message the client's answer is compared with what reached the smarthost:
250 only for what it holds, 451 for the rest, and each service's quota counts exactly
the recipients delivered (every reservation of an undelivered message given back).
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from palisade_events import ManualClock, WorkerRuntime
from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import smtp as contract
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from palisade_smtp_relay.settings import RelaySettings
from palisade_smtp_relay.worker import spec
from tests.fixtures import Collector, unique, wait_until
from tests.provisioning import service_provisioned

SENDER_DOMAIN = "vm.example.app"
UPSTREAM_TIMEOUT = 1.0
BATCH = 16


class Upstream:
    """The smarthost: an aiosmtpd server whose behaviour the test switches.

    `up`: accepts and keeps every message; `tempfail`: answers MAIL with 451;
    `hang`: takes DATA and never answers (until the test ends the mode: then 421,
    nothing kept); `down`: not listening, open sessions cut."""

    def __init__(self) -> None:
        self.mode = "up"
        self.kept: list[bytes] = []
        self.port = 0
        self.released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook names
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mode == "tempfail":
            return "451 4.3.0 Try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        if self.mode == "hang":
            await self.released.wait()
            return "421 4.4.2 Timeout"
        assert isinstance(envelope.original_content, bytes)
        self.kept.append(envelope.original_content)
        return "250 OK kept"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class Tracked(SMTP):
            def connection_made(self, transport: Any) -> None:
                upstream._sessions.add(self)
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                upstream._sessions.discard(self)
                super().connection_lost(error)

        self._server = await loop.create_server(
            lambda: Tracked(self, hostname="upstream.test", loop=loop), "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()
            await self._server.wait_closed()
            self._server = None

    def message_ids(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for content in self.kept:
            for line in content.split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    out[line.split(b":", 1)[1].strip().decode()] += 1
        return out


@dataclass
class Service:
    service_id: str
    slug: str
    ip: str

    @property
    def sender(self) -> str:
        return f"{self.slug}@{SENDER_DOMAIN}"


@dataclass
class Sent:
    message_id: str
    service: Service
    recipients: int
    code: int
    text: str


def send_one(port: int, svc: Service, message_id: str, recipients: list[str]) -> Sent:
    content = "\r\n".join(
        [
            f"From: {svc.sender}",
            f"To: {recipients[0]}",
            "Subject: Your receipt",
            f"Message-ID: {message_id}",
            "",
            "Thanks for your order.",
            "",
        ]
    ).encode()
    with smtplib.SMTP("127.0.0.1", port, source_address=(svc.ip, 0), timeout=20) as client:
        client.ehlo("app.example")
        code, text = client.mail(svc.sender)
        for rcpt in recipients:
            if code == 250:
                code, text = client.rcpt(rcpt)
        if code == 250:
            code, text = client.data(content)
    return Sent(message_id, svc, len(recipients), code, text.decode() if isinstance(text, bytes) else text)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    u = Upstream()
    await u.start()
    try:
        yield u
    finally:
        u.released.set()
        await u.stop()


async def _provision(client: PalisadeClient, svc: Service) -> None:
    await client.publish(
        service_provisioned(
            svc.service_id,
            svc.slug[:30],
            software="wordpress",
            hostname=f"{svc.slug}.vm-hosts.example.net",
            ipv4="203.0.113.10",
            private_ip=svc.ip,
            ssh_host="203.0.113.10",
        ),
        service_id=svc.service_id,
    )

    async def known() -> bool:
        try:
            await _status(client, svc)
        except QueryRejectedError:
            return False
        return True

    await wait_until(known, what=f"{svc.service_id} projected by the relay")


async def _status(client: PalisadeClient, svc: Service) -> contract.RelayStatusReply:
    reply: contract.RelayStatusReply = await client.request(contract.RelayStatus(service_id=svc.service_id), timeout=5)
    return reply


@pytest.mark.timeout(120)
async def test_a_failing_smarthost_gets_451s_gives_the_quota_back_and_nothing_unsent_is_accepted(
    run_worker: Any,
    client: PalisadeClient,
    collect: Any,
    upstream: Upstream,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events: Collector = await collect(EVENTS_EXCHANGE, "smtp-relay.#")
    audit: Collector = await collect(AUDIT_EXCHANGE, "smtp-relay.#")
    settings = RelaySettings(
        smtp_listen="127.0.0.1:0",
        private_network="127.0.0.0/24",
        sender_domain=SENDER_DOMAIN,
        smarthost=f"127.0.0.1:{upstream.port}",
        smtp_hostname="relay.test",
        smarthost_timeout=UPSTREAM_TIMEOUT,
    )
    rt: WorkerRuntime[Any] = await run_worker(spec(settings), clock=ManualClock(datetime(2026, 11, 25, 9, tzinfo=UTC)))
    assert rt.deps.bound is not None
    port = int(rt.deps.bound[1])
    services = [Service(unique("svc"), unique("shop").lower(), ip) for ip in ("127.0.0.41", "127.0.0.42")]
    for svc in services:
        await _provision(client, svc)

    sent: list[Sent] = []
    figures: dict[str, str] = {}

    async def batch(mode: str) -> list[Sent]:
        jobs = []
        for i in range(BATCH):
            svc = services[i % len(services)]
            rcpts = [f"customer{j}@example.com" for j in range(1 + i % 2)]
            jobs.append(asyncio.to_thread(send_one, port, svc, f"<{unique(mode)}@app.example>", rcpts))
        started = time.perf_counter()
        results = list(await asyncio.gather(*jobs))
        codes = Counter(r.code for r in results)
        figures[mode] = f"{dict(codes)} in {time.perf_counter() - started:.2f}s"
        sent.extend(results)
        return results

    assert {r.code for r in await batch("up")} == {250}
    await upstream.stop()
    upstream.mode = "down"
    down = await batch("down")
    await upstream.start()
    upstream.mode = "tempfail"
    tempfail = await batch("tempfail")
    upstream.mode = "hang"
    hang = await batch("hang")
    upstream.released.set()
    upstream.mode = "up"
    back_at = time.perf_counter()
    again = await batch("back")
    recovered = time.perf_counter() - back_at

    for failed in (down, tempfail, hang):
        assert {(r.code, r.text) for r in failed} == {(451, "4.3.0 Upstream relay unavailable; try again later")}
    assert {r.code for r in again} == {250}

    # Nothing accepted that was not delivered, nothing delivered that was refused, nothing twice.
    kept = upstream.message_ids()
    accepted = {r.message_id for r in sent if r.code == 250}
    assert set(kept) == accepted
    assert max(kept.values()) == 1

    # The quota counts what was delivered: every reservation of a 451 was given back.
    quota: dict[str, int] = {}
    for svc in services:
        delivered = sum(r.recipients for r in sent if r.service is svc and r.code == 250)
        refused = sum(r.recipients for r in sent if r.service is svc and r.code == 451)
        status = await _status(client, svc)
        assert status.quota_used == delivered, (svc.service_id, status.quota_used, delivered, refused)
        quota[svc.service_id] = refused

    # Said on the bus: one EmailRelayed per delivery, one failed decision per 451.
    failed_count = len([r for r in sent if r.code == 451])

    def relayed() -> int:
        return len([m for m in events.messages if m.json()["type"] == "EmailRelayed"])

    def failed_audits() -> int:
        return len([m for m in audit.messages if m.json().get("reason") == "upstream_unavailable"])

    await wait_until(lambda: relayed() >= len(accepted) and failed_audits() >= failed_count, what="events and audits")
    assert (relayed(), failed_audits()) == (len(accepted), failed_count)

    line = (
        f"[fault] smarthost down / answering 451 / hanging past {UPSTREAM_TIMEOUT:g}s, batches of {BATCH}:"
        f" {figures}; in flight {len(sent)}, accepted {len(accepted)} = delivered {sum(kept.values())},"
        f" 451 {failed_count}, lost=0, duplicated=0, quota given back {sum(quota.values())} recipients,"
        f" service back {recovered:.2f}s after the smarthost"
    )
    record_property("fault_figures", line)
    with capsys.disabled():
        print("\n" + line)
