"""The quota is exact across relay processes: two `python -m palisade_smtp_relay`
processes, one service submitting 1,000 recipients over many connections to both at
once, another service sending meanwhile."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from smtp_harness import PRIVATE_NETWORK, SENDER_DOMAIN, Sink, message, payloads, provision, transact

from palisade_events.client import PalisadeClient
from palisade_events.topology import EVENTS_EXCHANGE
from tests.fixtures import AMQP_URL, DATABASE_URL, TEST_RETRY_DELAYS, drop_worker_state, unique, wait_until

WORKER = "smtp-relay"
IP_A, IP_B = "127.0.0.20", "127.0.0.21"


@dataclass
class RelayProcess:
    name: str
    proc: asyncio.subprocess.Process
    log: Path
    port: int = 0

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def start_relay(name: str, sink: Sink, tmp: Path) -> RelayProcess:
    env = {
        **os.environ,
        "PALISADE_AMQP_URL": AMQP_URL,
        "PALISADE_DATABASE_URL": DATABASE_URL,
        "PALISADE_METRICS_PORT": "0",
        "PALISADE_RETRY_DELAYS": str(TEST_RETRY_DELAYS),
        "PALISADE_OUTBOX_POLL_SECONDS": "0.2",
        "PALISADE_OUTBOX_GRACE_SECONDS": "1.0",
        "PALISADE_SMTP_LISTEN": "127.0.0.1:0",
        "PALISADE_SMTP_HOSTNAME": name,
        "PALISADE_PRIVATE_NETWORK": PRIVATE_NETWORK,
        "PALISADE_SENDER_DOMAIN": SENDER_DOMAIN,
        "PALISADE_SMARTHOST": f"127.0.0.1:{sink.port}",
        "PALISADE_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "palisade_smtp_relay", env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    relay = RelayProcess(name, proc, log)

    def ready() -> bool:
        assert proc.returncode is None, relay.output()
        found = re.search(r"SMTP relay listening on 127\.0\.0\.1:(\d+)", relay.output())
        if found:
            relay.port = int(found.group(1))
        return bool(found) and f"{WORKER} ready" in relay.output()

    await wait_until(ready, timeout=30, what=f"{name} ready")
    return relay


@pytest.fixture
async def relays(amqp: Any, tmp_path: Path) -> AsyncIterator[tuple[Sink, list[RelayProcess]]]:
    await drop_worker_state(WORKER, amqp)
    sink = await Sink().start()
    procs: list[RelayProcess] = []
    try:
        procs = list(await asyncio.gather(*(start_relay(n, sink, tmp_path) for n in ("relay-a.test", "relay-b.test"))))
        yield sink, procs
    finally:
        for r in procs:
            if r.proc.returncode is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in procs:
            await asyncio.wait_for(r.proc.wait(), 30)
        await sink.stop()
        await drop_worker_state(WORKER, amqp)


def submit(port: int, source_ip: str, sender: str, tag: str, count: int) -> list[tuple[int, str]]:
    """`count` one-recipient messages over one connection; the DATA reply of each."""
    replies = []
    with smtplib.SMTP("127.0.0.1", port, source_address=(source_ip, 0), timeout=30) as client:
        client.ehlo("app.example")
        for i in range(count):
            out = transact(client, sender, [f"{tag}-{i}@example.com"], message(sender))
            replies.append((out.code, out.text[:5]))
    return replies


async def test_two_relay_processes_deliver_exactly_300_of_1000_recipients_and_spare_the_other_service(
    relays: tuple[Sink, list[RelayProcess]], client: PalisadeClient, collect: Any
) -> None:
    sink, procs = relays
    events = await collect(
        EVENTS_EXCHANGE, "smtp-relay.EmailRelayed", "smtp-relay.EmailRejected", "smtp-relay.EmailQuotaWarning"
    )
    a_id, b_id = unique("svc-a"), unique("svc-b")
    a_slug, b_slug = unique("shop").lower(), unique("crm").lower()
    await provision(client, a_id, a_slug, IP_A)
    await provision(client, b_id, b_slug, IP_B)
    a_sender, b_sender = f"{a_slug}@{SENDER_DOMAIN}", f"{b_slug}@{SENDER_DOMAIN}"

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=48) as pool:
        # Service A: 40 connections x 25 messages, alternating between the two relays.
        jobs_a = [loop.run_in_executor(pool, submit, procs[i % 2].port, IP_A, a_sender, f"a{i}", 25) for i in range(40)]
        # Service B, at the same time: 4 connections x 15 messages.
        jobs_b = [loop.run_in_executor(pool, submit, procs[i % 2].port, IP_B, b_sender, f"b{i}", 15) for i in range(4)]
        replies_a = [r for rs in await asyncio.gather(*jobs_a) for r in rs]
        replies_b = [r for rs in await asyncio.gather(*jobs_b) for r in rs]

    assert Counter(replies_a) == {(250, "2.0.0"): 300, (451, "4.7.1"): 700}
    assert Counter(replies_b) == {(250, "2.0.0"): 60}
    delivered_a = sink.sent_by(a_sender)
    assert len(delivered_a) == 300
    assert len({m.rcpt_tos[0] for m in delivered_a}) == 300  # 300 different recipients, none twice
    assert len(sink.sent_by(b_sender)) == 60
    # Both processes relayed part of service A's 300.
    by_relay = Counter(re.search(r"by (relay-[ab]\.test)", m.header("Received")[0]).group(1) for m in delivered_a)  # type: ignore[union-attr]
    assert set(by_relay) == {"relay-a.test", "relay-b.test"}, by_relay

    await wait_until(lambda: len(payloads(events, "EmailRelayed", service_id=a_id)) == 300, what="300 EmailRelayed")
    await wait_until(
        lambda: len(payloads(events, "EmailRejected", service_id=a_id, reason="quota_exceeded")) == 700,
        what="700 quota refusals",
    )
    assert len(payloads(events, "EmailRelayed", service_id=b_id)) == 60
    assert not payloads(events, "EmailRejected", service_id=b_id)
    [warning] = payloads(events, "EmailQuotaWarning", service_id=a_id)
    assert warning["payload"]["used"] >= 240
    # Sessions reached DATA together, so reservations were decided many per statement
    # (reserve_slots_batch) in at least one process, and the quota above stayed exact.
    counted = [await reservations_per_statement(r) for r in procs]
    assert sum(c["count"] for c in counted) > 0, counted
    assert any(c["sum"] > c["count"] for c in counted), f"no statement decided two reservations: {counted}"


async def reservations_per_statement(relay: RelayProcess) -> dict[str, float]:
    """The relay process's palisade_smtp_reservations_per_statement histogram: sum and count."""
    url = re.search(r"metrics on (http://\S+/metrics)", relay.output())
    assert url is not None, relay.output()
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url.group(1), timeout=10).read().decode())
    found = re.findall(r"^palisade_smtp_reservations_per_statement_(sum|count) (\S+)$", text, re.M)
    return {name: float(value) for name, value in found}
