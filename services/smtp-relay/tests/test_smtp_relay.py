"""The relay end to end: real SMTP clients (smtplib, swaks) from 127.0.0.x, a real
aiosmtpd upstream, the real broker and database, the clock moved by hand."""

from __future__ import annotations

import asyncio
import logging
import os
import smtplib
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from smtp_harness import (
    PRIVATE_NETWORK,
    SENDER_DOMAIN,
    Outcome,
    Sink,
    audits,
    ehlo_features,
    message,
    payloads,
    provision,
    relay_status,
    self_signed,
    server_context,
    smtp_send,
    swaks,
)

from palisade_events import ManualClock, WorkerRuntime
from palisade_events.client import PalisadeClient
from palisade_events.contract import platform
from palisade_events.contract import smtp as contract
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from palisade_smtp_relay.settings import RelaySettings
from palisade_smtp_relay.worker import spec
from tests.fixtures import AMQP_URL, Collector, unique, wait_until

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
IP_A, IP_B = "127.0.0.10", "127.0.0.11"
IP_UNKNOWN = "127.0.0.99"  # inside the private network, no service
IP_OUTSIDE = "127.0.1.5"  # a provisioned service's address, but outside the private network


@dataclass
class Service:
    service_id: str
    slug: str
    ip: str

    @property
    def sender(self) -> str:
        return f"{self.slug}@{SENDER_DOMAIN}"


@dataclass
class Env:
    rt: WorkerRuntime[Any]
    sink: Sink
    client: PalisadeClient
    events: Collector
    audit: Collector
    clock: ManualClock
    a: Service
    b: Service

    @property
    def port(self) -> int:
        assert self.rt.deps.bound is not None
        return int(self.rt.deps.bound[1])

    async def send(
        self, svc: Service | str, rcpts: list[str], content: bytes, *, mail_from: str | None = None, **kw: Any
    ) -> Outcome:
        ip = svc.ip if isinstance(svc, Service) else svc
        sender = (
            mail_from if mail_from is not None else (svc.sender if isinstance(svc, Service) else "x@" + SENDER_DOMAIN)
        )
        return await asyncio.to_thread(smtp_send, self.port, ip, sender, rcpts, content, **kw)

    async def rejected(self, reason: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        """Wait for `count` EmailRejected events with this reason, and as many audit records."""
        await wait_until(
            lambda: len(payloads(self.events, "EmailRejected", reason=reason, **match)) >= count,
            what=f"{count} EmailRejected {reason}",
        )
        found = payloads(self.events, "EmailRejected", reason=reason, **match)
        await wait_until(lambda: len(audits(self.audit, reason=reason)) >= count, what=f"{count} audits of {reason}")
        return found

    def good(self, svc: Service, **kw: Any) -> bytes:
        return message(svc.sender, **kw)


async def start_relay(run_worker: Any, sink: Sink, clock: ManualClock, **overrides: Any) -> WorkerRuntime[Any]:
    settings = RelaySettings(
        smtp_listen="127.0.0.1:0",
        private_network=PRIVATE_NETWORK,
        sender_domain=SENDER_DOMAIN,
        smarthost=f"127.0.0.1:{sink.port}",
        smtp_hostname="relay.test",
        **overrides,
    )
    rt: WorkerRuntime[Any] = await run_worker(spec(settings), clock=clock)
    return rt


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.stop()


async def make_env(run_worker: Any, client: PalisadeClient, collect: Any, sink: Sink, **overrides: Any) -> Env:
    clock = ManualClock(START)
    events = await collect(EVENTS_EXCHANGE, "smtp-relay.#")
    audit = await collect(AUDIT_EXCHANGE, "smtp-relay.#")
    rt = await start_relay(run_worker, sink, clock, **overrides)
    a = Service(unique("svc-a"), unique("wp").lower(), IP_A)
    b = Service(unique("svc-b"), unique("n8n").lower(), IP_B)
    for svc in (a, b):
        await provision(client, svc.service_id, svc.slug, svc.ip)
    return Env(rt, sink, client, events, audit, clock, a, b)


@pytest.fixture
async def env(run_worker: Any, client: PalisadeClient, collect: Any, sink: Sink) -> Env:
    return await make_env(run_worker, client, collect, sink)


# ------------------------------------------------------------------ relaying


async def test_transactional_mail_is_relayed_after_upstream_accepted_it(env: Env) -> None:
    features = await asyncio.to_thread(ehlo_features, env.port, env.a.ip)
    assert {"size", "pipelining", "8bitmime", "enhancedstatuscodes"} <= set(features)
    assert "auth" not in features
    assert "starttls" not in features

    out = await env.send(env.a, ["ops@example.com", "dev@example.com"], env.good(env.a))
    assert (out.stage, out.code) == ("sent", 250)
    assert out.text.startswith("2.0.0 OK queued as ")
    [got] = env.sink.messages
    assert (got.mail_from, got.rcpt_tos) == (env.a.sender, ["ops@example.com", "dev@example.com"])
    assert got.content.endswith(env.good(env.a))  # the message itself is untouched ...
    [received] = got.header("Received")  # ... below the relay's trace header
    assert f"from app.example ([{env.a.ip}])" in received
    assert "by relay.test" in received

    await wait_until(lambda: bool(payloads(env.events, "EmailRelayed")), what="EmailRelayed")
    [relayed] = payloads(env.events, "EmailRelayed")
    assert relayed["service_id"] == env.a.service_id
    assert relayed["payload"]["message_id_header"] == "<reset-1@app.example>"
    assert relayed["payload"]["recipients"] == ["ops@example.com", "dev@example.com"]
    assert relayed["payload"]["relay_id"] == out.text.rsplit(" ", 1)[1]
    assert relayed["payload"]["relay_id"] in received
    # The event is the record of an accepted message; refusals are what the audit stream holds.
    assert not audits(env.audit, outcome="accepted")
    # No body in the event, the audit record, or anywhere on the bus.
    assert all(b"482913" not in m.body for m in env.events.messages + env.audit.messages)
    assert (await relay_status(env.client, env.a.service_id)).quota_used == 2


async def test_swaks_pipelines_through_the_relay_and_gets_a_message_id_added(env: Env) -> None:
    result = await swaks(
        env.port, env.b.ip, "--pipeline", "--from", env.b.sender, "--to", "alerts@example.com",
        "--header", "Subject: disk almost full", "--body", "95 % used",
    )  # fmt: skip
    assert result.returncode == 0, result.transcript
    assert result.server_replies()[-2].startswith("250 2.0.0 OK queued as")  # DATA, then QUIT's 221
    [got] = env.sink.sent_by(env.b.sender)
    [message_id] = got.header("Message-ID")  # swaks sends one; the relay keeps it
    await wait_until(lambda: bool(payloads(env.events, "EmailRelayed", service_id=env.b.service_id)), what="relayed")
    assert payloads(env.events, "EmailRelayed")[0]["payload"]["message_id_header"] == message_id

    # A message without Message-ID gets one from the relay, named in EmailRelayed.
    out = await env.send(env.b, ["alerts@example.com"], env.good(env.b, message_id=None))
    assert out.code == 250
    [added] = env.sink.messages[-1].header("Message-ID")
    assert added.endswith(f".{env.b.sender}>")
    await wait_until(lambda: len(payloads(env.events, "EmailRelayed")) == 2, what="second EmailRelayed")
    assert payloads(env.events, "EmailRelayed")[1]["payload"]["message_id_header"] == added


# ------------------------------------------------------------------ who may connect


async def test_connections_outside_the_private_network_or_from_unknown_addresses_get_554(
    env: Env, client: PalisadeClient
) -> None:
    outsider = Service(unique("svc-out"), unique("out").lower(), IP_OUTSIDE)
    await provision(client, outsider.service_id, outsider.slug, outsider.ip)

    out = await env.send(outsider, ["ops@example.com"], env.good(outsider))
    assert (out.stage, out.code) == ("connect", 554)
    assert out.text.startswith("5.7.1 Relay access denied")
    swaks_out = await swaks(env.port, IP_UNKNOWN, "--from", "x@" + SENDER_DOMAIN, "--to", "ops@example.com")
    assert swaks_out.returncode != 0
    assert swaks_out.refusals()[0].startswith("554 5.7.1 Relay access denied: 127.0.0.99 is not a known service")

    [ev] = await env.rejected("outside_private_network", peer_ip=IP_OUTSIDE)
    assert (ev["payload"]["smtp_reply"], ev["payload"]["stage"]) == ("554 5.7.1", "connect")
    [ev] = await env.rejected("unknown_service", peer_ip=IP_UNKNOWN)
    assert (ev["service_id"], ev["payload"]["smtp_reply"]) == (None, "554 5.7.1")
    assert not env.sink.messages


async def test_a_deprovisioned_service_can_no_longer_connect(env: Env) -> None:
    await env.client.publish(platform.ServiceDeprovisioned(service_id=env.a.service_id), service_id=env.a.service_id)

    async def refused() -> bool:
        return (await env.send(env.a, ["ops@example.com"], env.good(env.a))).code == 554

    await wait_until(refused, what="refusal after deprovisioning")
    await env.rejected("unknown_service", peer_ip=IP_A)


# ------------------------------------------------------------------ sender rules


async def test_the_envelope_sender_must_be_the_services_own_address(env: Env) -> None:
    for wrong in (
        f"admin@{SENDER_DOMAIN}",  # another local part
        env.b.sender,  # another service's address
        f"{env.a.slug}@example.com",  # another domain
        f"{env.a.slug.upper()}@{SENDER_DOMAIN}",  # the local part is exact
    ):
        out = await env.send(env.a, ["ops@example.com"], env.good(env.a), mail_from=wrong)
        assert (out.stage, out.code, out.text) == ("mail", 550, f"5.7.1 Sender address must be <{env.a.sender}>")
    events = await env.rejected("sender_not_allowed", 4)
    assert {(e["service_id"], e["payload"]["smtp_reply"], e["payload"]["stage"]) for e in events} == {
        (env.a.service_id, "550 5.7.1", "mail")
    }
    # The domain is case-insensitive.
    out = await env.send(env.a, ["ops@example.com"], env.good(env.a), mail_from=f"{env.a.slug}@VM.Example.APP")
    assert out.code == 250
    assert len(env.sink.messages) == 1


@pytest.mark.parametrize(
    ("from_header", "why"),
    [
        ("ops@{domain}", "not the service's sender address"),
        ('"{sender}" <ops@{domain}>', "must not contain an address"),
        ("Support <{sender}>, ops@{domain}", "exactly one address"),
        ("=?utf-8?q?PayPal?= <{sender}>", "encoded words"),
        ("{sender} (Your Bank)", "exactly one address"),
        ("Bank (official) <{sender}>", "comments"),
        ("undisclosed-recipients:;", "exactly one address"),
    ],
)
async def test_the_from_header_must_carry_exactly_the_sender_address(env: Env, from_header: str, why: str) -> None:
    value = from_header.format(sender=env.a.sender, domain=SENDER_DOMAIN)
    out = await env.send(env.a, ["ops@example.com"], message(value))
    assert (out.stage, out.code) == ("data", 550)
    assert out.text.startswith("5.7.1 ")
    assert why in out.text
    assert f"<{env.a.sender}>" in out.text
    [ev] = await env.rejected("from_header_mismatch")
    assert (ev["payload"]["smtp_reply"], ev["payload"]["recipients"]) == ("550 5.7.1", 1)
    assert not env.sink.messages


async def test_from_and_sender_headers_missing_doubled_or_foreign_are_refused_and_plain_names_pass(env: Env) -> None:
    no_from = b"To: ops@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    two_froms = message(env.a.sender, headers=[f"From: {env.a.sender}"])
    foreign_sender = message(env.a.sender, headers=["Sender: billing@bank.example"])
    for content, why in (
        (no_from, "Missing From"),
        (two_froms, "More than one From"),
        (foreign_sender, "Sender header"),
    ):
        out = await env.send(env.a, ["ops@example.com"], content)
        assert (out.code, out.text.split(" ")[0]) == (550, "5.7.1"), out
        assert why in out.text
    await env.rejected("from_header_mismatch", 3)

    for fine in (f"WordPress <{env.a.sender}>", f'"Shop: orders" <{env.a.sender}>', f"<{env.a.slug}@VM.EXAMPLE.APP>"):
        assert (await env.send(env.a, ["ops@example.com"], message(fine))).code == 250, fine
    assert len(env.sink.messages) == 3


# ------------------------------------------------------------------ transactional only


async def test_marketing_mail_is_refused_and_five_violations_suspend_until_support_lifts_it(env: Env) -> None:
    a = env.a
    out = await env.send(a, ["ops@example.com"], env.good(a, headers=["Precedence: bulk"]))
    assert (out.code, out.text) == (550, "5.7.1 Marketing mail is not permitted (Precedence: bulk)")
    out = await env.send(a, ["ops@example.com"], env.good(a, headers=["Precedence:  List "]))
    assert (out.code, out.text) == (550, "5.7.1 Marketing mail is not permitted (Precedence: list)")
    result = await swaks(
        env.port, a.ip, "--from", a.sender, "--to", "ops@example.com",
        "--add-header", "List-Unsubscribe: <mailto:unsubscribe@example.com>",
    )  # fmt: skip
    assert result.refusals() == ["550 5.7.1 Marketing mail is not permitted (List-Unsubscribe header)"]
    out = await env.send(a, ["ops@example.com"], env.good(a, headers=["Precedence: junk"]))
    assert out.code == 550
    assert not payloads(env.events, "RelaySuspended")

    # 51 recipients: the 51st is refused at RCPT and the message at DATA; nothing is sent.
    rcpts = [f"customer{i}@example.com" for i in range(51)]
    out = await env.send(a, rcpts, env.good(a))
    assert list(out.refused_rcpts.values()) == [
        (550, "5.7.1 Marketing mail is not permitted (more than 50 recipients)")
    ]
    assert (out.stage, out.code) == ("data", 550)
    assert not env.sink.messages

    await env.rejected("marketing_precedence", 3)
    await env.rejected("marketing_list_unsubscribe")
    [too_many] = await env.rejected("marketing_too_many_recipients")
    assert (too_many["payload"]["stage"], too_many["payload"]["recipients"]) == ("rcpt", 51)
    await wait_until(lambda: bool(payloads(env.events, "RelaySuspended")), what="RelaySuspended")
    [suspended] = payloads(env.events, "RelaySuspended")
    assert suspended["service_id"] == a.service_id
    assert suspended["payload"] == {"reason": "marketing_violations", "violations": 5, "window_hours": 24}
    await wait_until(lambda: bool(audits(env.audit, action="RelaySuspension")), what="suspension audit")

    # Suspended: refused at connect, while the other service is unaffected.
    out = await env.send(a, ["ops@example.com"], env.good(a))
    assert (out.stage, out.code) == ("connect", 554)
    assert out.text == "5.7.1 Relay access suspended after repeated marketing mail; contact support"
    await env.rejected("relay_suspended")
    assert (await env.send(env.b, ["ops@example.com"], env.good(env.b))).code == 250
    assert (await relay_status(env.client, a.service_id)).suspended

    lift = await env.client.publish(contract.RelaySuspensionLifted(note="ticket 8812"), service_id=a.service_id)
    await wait_until(lambda: bool(payloads(env.events, "RelayAccessRestored")), what="RelayAccessRestored")
    await wait_until(lambda: bool(audits(env.audit, action="RelaySuspensionLifted")), what="lift audit")
    [lifted] = audits(env.audit, action="RelaySuspensionLifted")
    assert (lifted["outcome"], lifted["message_id"], lifted["detail"]["note"]) == (
        "accepted",
        str(lift.message_id),
        "ticket 8812",
    )
    assert (await env.send(a, ["ops@example.com"], env.good(a))).code == 250
    status = await relay_status(env.client, a.service_id)
    assert (status.suspended, status.violations_24h) == (False, 0)

    # Lifting again, or for an unknown service, is refused.
    await env.client.publish(contract.RelaySuspensionLifted(), service_id=a.service_id)
    await env.client.publish(contract.RelaySuspensionLifted(), service_id="svc-nobody")
    await wait_until(lambda: len(payloads(env.events, "RelaySuspensionLiftRejected")) == 2, what="lift rejections")
    assert sorted(e["payload"]["reason"] for e in payloads(env.events, "RelaySuspensionLiftRejected")) == [
        "not_suspended",
        "unknown_service",
    ]


async def test_violations_older_than_24_hours_do_not_count(env: Env) -> None:
    bulk = env.good(env.a, headers=["Precedence: bulk"])
    for _ in range(4):
        assert (await env.send(env.a, ["ops@example.com"], bulk)).code == 550
    env.clock.advance(timedelta(hours=24))
    assert (await env.send(env.a, ["ops@example.com"], bulk)).code == 550
    await env.rejected("marketing_precedence", 5)
    status = await relay_status(env.client, env.a.service_id)
    assert (status.suspended, status.violations_24h) == (False, 1)
    assert not payloads(env.events, "RelaySuspended")


# ------------------------------------------------------------------ message checks


async def test_size_line_length_bare_lf_and_header_injection_are_refused(
    run_worker: Any, client: PalisadeClient, collect: Any, sink: Sink
) -> None:
    env = await make_env(run_worker, client, collect, sink, smtp_max_message_bytes=4096)
    a, rcpt = env.a, ["ops@example.com"]

    out = await env.send(a, rcpt, env.good(a, body="x" * 900 + ("\r\n" + "x" * 900) * 5))
    assert (out.code, out.text) == (552, "5.3.4 Message exceeds the size limit of 4096 bytes")
    out = await env.send(a, rcpt, env.good(a), mail_options=["SIZE=10000"])
    assert (out.stage, out.code, out.text) == ("mail", 552, "5.3.4 Message exceeds the size limit of 4096 bytes")
    out = await env.send(a, rcpt, env.good(a, body="y" * 1200))
    assert (out.code, out.text) == (500, "5.5.2 Line too long (more than 998 characters)")

    smuggled = env.good(a) + b"\n.\nMAIL FROM:<ceo@bank.example>\r\n"
    out = await env.send(a, rcpt, smuggled, raw=True)
    assert (out.code, out.text) == (550, "5.6.0 Bare LF in message; lines must end with CRLF")
    out = await env.send(a, rcpt, env.good(a, headers=["Subject: hi\rBcc: everyone@example.com"]), raw=True)
    assert (out.code, out.text) == (550, "5.6.0 Bare CR in message; lines must end with CRLF")
    injected = env.good(a, headers=["X-Note: ok", "Bcc everyone@example.com"])
    out = await env.send(a, rcpt, injected)
    assert (out.code, out.text) == (550, "5.6.0 Malformed message header: line without a field name")
    out = await env.send(a, rcpt, b" folded: first\r\n" + env.good(a))
    assert (out.code, out.text) == (550, "5.6.0 Malformed message header: continuation line before the first field")

    too_large = await env.rejected("message_too_large", 2)
    assert sorted(e["payload"]["stage"] for e in too_large) == ["data", "mail"]
    assert {e["payload"]["smtp_reply"] for e in too_large} == {"552 5.3.4"}
    [long_line] = await env.rejected("line_too_long")
    assert long_line["payload"]["smtp_reply"] == "500 5.5.2"
    await env.rejected("bare_lf")
    await env.rejected("bare_cr")
    injections = await env.rejected("header_injection", 2)
    assert {e["payload"]["smtp_reply"] for e in injections} == {"550 5.6.0"}
    assert not env.sink.messages
    assert (await relay_status(client, a.service_id)).quota_used == 0


# ------------------------------------------------------------------ quota


async def test_rolling_hour_quota_all_or_nothing_warning_and_one_slot_back_3600_s_after_the_first(env: Env) -> None:
    a = env.a
    rcpts = [f"user{i}@example.com" for i in range(50)]
    assert (await env.send(a, rcpts[:1], env.good(a))).code == 250  # the first, at t
    env.clock.advance(timedelta(seconds=1))
    for n in (50, 50, 50, 50, 50, 49):  # 299 more at t + 1 s: 300 in the window
        assert (await env.send(a, rcpts[:n], env.good(a))).code == 250
    assert len(env.sink.sent_by(a.sender)) == 7

    out = await env.send(a, rcpts[:1], env.good(a))
    assert (out.stage, out.code, out.text) == (
        "data",
        451,
        "4.7.1 Quota of 300 emails per hour reached; retry in 3599 seconds",
    )
    [ev] = await env.rejected("quota_exceeded")
    assert (ev["service_id"], ev["payload"]["smtp_reply"], ev["payload"]["retry_after_seconds"]) == (
        a.service_id,
        "451 4.7.1",
        3599,
    )
    # The other service has its own quota.
    assert (await env.send(env.b, rcpts[:50], env.good(env.b))).code == 250

    env.clock.advance(timedelta(seconds=3598))  # t + 3599 s: the first still counts
    assert (await env.send(a, rcpts[:1], env.good(a))).text.endswith("retry in 1 seconds")
    env.clock.advance(timedelta(seconds=1))  # t + 3600 s: exactly one slot is back
    out = await env.send(a, rcpts[:2], env.good(a))  # all or nothing: two do not fit
    assert (out.code, out.text) == (451, "4.7.1 Quota of 300 emails per hour reached; retry in 1 seconds")
    assert (await env.send(a, rcpts[:1], env.good(a))).code == 250
    assert (await env.send(a, rcpts[:1], env.good(a))).code == 451
    assert len(env.sink.sent_by(a.sender)) == 8

    status = await relay_status(env.client, a.service_id)
    assert (status.quota_used, status.quota_limit, status.next_slot_seconds) == (300, 300, 1)
    await wait_until(lambda: bool(payloads(env.events, "EmailQuotaWarning")), what="EmailQuotaWarning")
    await env.rejected("quota_exceeded", 4)
    [warning] = payloads(env.events, "EmailQuotaWarning")  # once, when the 80 % mark was crossed
    assert warning["service_id"] == a.service_id
    assert warning["payload"] == {"used": 251, "limit": 300, "window_seconds": 3600}


# ------------------------------------------------------------------ upstream


async def test_upstream_down_answers_451_and_gives_the_quota_back(env: Env) -> None:
    a = env.a
    assert (await env.send(a, ["ops@example.com"], env.good(a))).code == 250  # a pooled connection exists now
    await env.sink.stop()
    out = await env.send(a, ["ops@example.com", "dev@example.com"], env.good(a))
    assert (out.stage, out.code, out.text) == ("data", 451, "4.3.0 Upstream relay unavailable; try again later")
    [ev] = await env.rejected("upstream_unavailable")
    assert (ev["payload"]["stage"], ev["payload"]["recipients"]) == ("upstream", 2)
    [record] = audits(env.audit, reason="upstream_unavailable")
    assert record["outcome"] == "failed"
    assert (await relay_status(env.client, a.service_id)).quota_used == 1

    await env.sink.start()  # back, on the same port
    assert (await env.send(a, ["ops@example.com"], env.good(a))).code == 250

    # A permanent refusal of any recipient upstream: nothing is sent to the others either.
    env.sink.refuse.add("gone@example.com")
    out = await env.send(a, ["ops@example.com", "gone@example.com"], env.good(a))
    assert (out.code, out.text) == (554, "5.0.0 The upstream relay refused the message (550)")
    await env.rejected("upstream_refused")
    assert (await relay_status(env.client, a.service_id)).quota_used == 2
    assert len(env.sink.messages) == 2
    assert (await env.send(a, ["ops@example.com"], env.good(a))).code == 250  # the connection was reset, not lost


async def test_a_client_hanging_up_while_its_message_goes_upstream_does_not_lose_the_record(env: Env) -> None:
    env.sink.gate.clear()  # the smarthost holds the message before it answers
    env.sink.data_arrived.clear()

    def send_without_waiting() -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", env.port, source_address=(env.a.ip, 0), timeout=15)
        client.ehlo("app.example")
        assert client.mail(env.a.sender)[0] == 250
        assert client.rcpt("ops@example.com")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(env.good(env.a) + b".\r\n")
        return client

    client = await asyncio.to_thread(send_without_waiting)
    await asyncio.wait_for(env.sink.data_arrived.wait(), 10)  # the message is on its way upstream ...
    await asyncio.to_thread(client.close)  # ... when its client hangs up
    env.sink.gate.set()
    await wait_until(lambda: bool(payloads(env.events, "EmailRelayed")), what="EmailRelayed")
    assert len(env.sink.messages) == 1
    assert (await relay_status(env.client, env.a.service_id)).quota_used == 1


async def test_starttls_to_clients_and_to_an_authenticating_smarthost_and_no_secret_leaks(
    run_worker: Any, client: PalisadeClient, collect: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "s3cr3t-Smarthost-pa55"
    sink_cert, sink_key = self_signed(tmp_path, "smarthost.test")
    relay_cert, relay_key = self_signed(tmp_path, "relay.test")
    sink = await Sink(tls=server_context(sink_cert, sink_key), credentials=("palisade", password)).start()
    try:
        env = await make_env(
            run_worker, client, collect, sink,
            smtp_tls_cert=relay_cert, smtp_tls_key=relay_key,
            smarthost_starttls=True, smarthost_ca_file=sink_cert,
            smarthost_username="palisade", smarthost_password=password,
        )  # fmt: skip
        assert "starttls" in await asyncio.to_thread(ehlo_features, env.port, env.a.ip)
        trust = ssl.create_default_context(cafile=str(relay_cert))
        out = await env.send(env.a, ["ops@example.com"], env.good(env.a), starttls=trust)
        assert out.code == 250, out
        [got] = sink.messages
        assert "with ESMTPS" in got.header("Received")[0]
        assert sink.logins == ["palisade"]
        result = await swaks(env.port, env.b.ip, "--tls", "--tls-verify", "--tls-ca-path", str(relay_cert),
                             "--from", env.b.sender, "--to", "ops@example.com")  # fmt: skip
        assert result.returncode == 0, result.transcript
        await wait_until(lambda: len(payloads(env.events, "EmailRelayed")) == 2, what="two relayed")
    finally:
        await sink.stop()
    everything = b"".join(m.body for m in env.events.messages + env.audit.messages)
    assert password.encode() not in everything
    assert password not in caplog.text
    assert "482913" not in caplog.text  # nor a message body


# ------------------------------------------------------------------ metrics


async def test_metrics_count_outcomes_top_quota_users_and_sessions(env: Env) -> None:
    assert (await env.send(env.a, ["ops@example.com", "dev@example.com"], env.good(env.a))).code == 250
    assert (await env.send(IP_UNKNOWN, ["ops@example.com"], b"")).code == 554
    await env.rt.run_job("quota-gauge")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{env.rt.metrics_port}/metrics") as resp,
    ):
        text = await resp.text()
    assert 'palisade_smtp_emails_total{outcome="relayed"}' in text
    assert 'palisade_smtp_emails_total{outcome="rejected"}' in text
    assert f'palisade_smtp_quota_used{{service_id="{env.a.service_id}"}} 2.0' in text
    assert env.b.service_id not in text  # nothing sent: not among the top services
    assert "palisade_smtp_session_seconds_count" in text


# ------------------------------------------------------------------ the CLI


async def palisade_cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("palisade")),
        *args,
        env={**os.environ, "PALISADE_AMQP_URL": AMQP_URL, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_cli_shows_status_and_lifts_a_suspension(env: Env) -> None:
    assert (await env.send(env.a, ["ops@example.com", "dev@example.com"], env.good(env.a))).code == 250
    code, out = await palisade_cli("smtp", "status", env.a.service_id)
    assert code == 0, out
    assert f"sends as {env.a.sender} from {IP_A}: active" in out
    assert "quota 2/300 in the last 3600s" in out

    code, out = await palisade_cli("smtp", "lift", env.a.service_id, "--note", "ticket 1")
    assert (code, "rejected: not_suspended" in out) == (1, True), out
    for _ in range(5):
        await env.send(env.a, ["ops@example.com"], env.good(env.a, headers=["Precedence: bulk"]))
    await wait_until(lambda: bool(payloads(env.events, "RelaySuspended")), what="suspension")
    code, out = await palisade_cli("smtp", "status", env.a.service_id)
    assert ": suspended" in out, out
    assert "marketing violations in 24 h: 5" in out
    code, out = await palisade_cli("smtp", "lift", env.a.service_id, "--note", "ticket 1")
    assert code == 0, out
    assert f"relay access restored for {env.a.service_id}" in out
    assert (await env.send(env.a, ["ops@example.com"], env.good(env.a))).code == 250
