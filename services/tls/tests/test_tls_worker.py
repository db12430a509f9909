"""The TLS worker end to end: the real broker and database, a real ACME CA (Pebble) and DNS
servers (challtestsrv), real test VMs with their own nginx; the clock moved by hand."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import idna
import pytest
from acme_ca import CERTIFICATE_LIFETIME, AcmeCa
from prometheus_client import REGISTRY
from pydantic import SecretStr
from tls_harness import PLATFORM_DOMAIN, Harness, handshake_refused, tree_snapshot, unique_domain

from palisade_events import ManualClock
from palisade_events.contract import ratelimit
from palisade_events.contract import tls as contract
from palisade_events.secrets import KeyConfigError, generate_key
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from palisade_hostctl import HostctlSettings
from palisade_hostctl.testvm import NamespaceVm
from palisade_tls.settings import TlsSettings
from palisade_tls.worker import spec
from tests.fixtures import AMQP_URL, wait_until
from tests.vms import VmSession, http_get

pytestmark = pytest.mark.root

CLOUDFLARE_ADDRESS = "104.16.132.229"  # inside 104.16.0.0/13
SITE_FILE = "/etc/nginx/sites-enabled/palisade-tls.conf"


def tls_settings(ca: AcmeCa, **overrides: Any) -> TlsSettings:
    options: dict[str, Any] = {
        "acme_directory": ca.directory,
        "acme_ca_bundle": ca.listener_certificate,
        "key": SecretStr(generate_key("test")),
        "platform_domains": [PLATFORM_DOMAIN],
        "dns_servers": ["127.0.0.1"],
        "dns_port": ca.dns.worker.dns_port,
        "acme_poll_timeout_seconds": 30,
        # The tests run the jobs themselves, after moving the clock.
        "dns_every_seconds": 3600,
        "issue_every_seconds": 3600,
        "expiry_every_seconds": 3600,
    }
    options.update(overrides)
    return TlsSettings(**options)


def hostctl_settings(testvms: VmSession) -> HostctlSettings:
    return HostctlSettings(
        key_file=testvms.automation_key,
        testvm_root=testvms.root,
        connect_attempts=2,
        retry_backoff_seconds=0.05,
        command_timeout=10,
    )


@pytest.fixture
async def start(run_worker, client, collect, testvms: VmSession, acme_ca: AcmeCa, no_requests_ca_bundle):
    async def make(**overrides: Any) -> Harness:
        clock = ManualClock(datetime.now(UTC))  # the CA's clock is real: start from now
        events = await collect(EVENTS_EXCHANGE, "tls.#")
        audit = await collect(AUDIT_EXCHANGE, "tls.#")
        rt = await run_worker(
            spec(tls_settings(acme_ca, **overrides), hostctl_settings(testvms)), clock=clock, db_pool_size=20
        )
        return Harness(rt, client, events, audit, clock, acme_ca)

    return make


@pytest.fixture
async def h(start) -> Harness:
    harness: Harness = await start()
    return harness


async def redirected(vm: NamespaceVm, host: str, path: str = "/") -> None:
    """Waits until plain HTTP for `host` is redirected to HTTPS (right after a reload an old
    nginx worker may still answer a request or two)."""

    async def check() -> bool:
        status, _ = await http_get(vm.address, host=host, path=path)
        return status == 301

    await wait_until(check, what=f"http://{host}{path} redirected to HTTPS")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- issuance


async def test_an_a_record_domain_gets_a_pebble_certificate_that_nginx_serves(h: Harness, vm: NamespaceVm) -> None:
    issued_before = metric("palisade_tls_issuances_total", outcome="issued")
    service_id, hostname = await h.provision(vm)
    first = await h.event("CertificateIssued", service_id)
    assert first["payload"]["domains"] == [hostname]
    assert (await h.event("DomainAccepted", service_id))["payload"]["domain"] == hostname
    # The service is served over TLS from the start, under its own hostname.
    await h.serves(vm, hostname, first["payload"]["serial"])

    domain = unique_domain("shop")
    await h.ca.dns.add_a(domain, vm.address)
    added = await h.add(service_id, domain)
    assert (await h.decision(added))["payload"] == {"domain": domain}  # DomainAccepted
    verified = await h.event("DomainDnsVerified", service_id, domain=domain)
    assert verified["payload"]["via"] == "address"
    issued = await h.event("CertificateIssued", service_id, domains=[hostname, domain])
    serial = issued["payload"]["serial"]
    assert issued["payload"]["renewal"] is True
    assert issued["correlation_id"] == str(added.correlation_id)
    await h.applied(service_id, serial)

    # A handshake with the domain as SNI verifies against Pebble's root and names the domain.
    got = await h.serves(vm, domain, serial)
    assert domain in got.names
    assert hostname in got.names
    assert got.not_after == datetime.fromisoformat(issued["payload"]["not_after"])
    assert await handshake_refused(vm.address, "not-on-it.example.com", h.ca.root_pem) is not None
    # Plain HTTP is redirected to HTTPS; the application is behind HTTPS.
    await redirected(vm, domain, "/x?y=1")

    listing = await h.domains(service_id)
    assert [(d.domain, d.kind, d.state) for d in listing.domains] == [
        (hostname, "hostname", "active"),
        (domain, "custom", "active"),
    ]
    assert listing.certificate is not None
    assert listing.certificate.serial == serial
    shop = listing.domains[1]
    assert [(r.type, r.value) for r in shop.expected_records] == [("CNAME", hostname), ("A", vm.address)]
    lifetime = listing.certificate.not_after - listing.certificate.not_before
    assert lifetime == CERTIFICATE_LIFETIME or abs(lifetime - CERTIFICATE_LIFETIME) < timedelta(seconds=2)

    # The private key sits on the VM readable by root only, and encrypted in the database.
    key_file = vm.path(f"/etc/nginx/palisade-tls/{serial}/privkey.pem")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key_file.read_bytes()
    async with h.rt.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT key_ciphertext FROM certificates WHERE serial = $1", serial)
        account = await conn.fetchrow("SELECT key_ciphertext, account_uri FROM acme_accounts")
    assert b"PRIVATE KEY" not in bytes(row["key_ciphertext"])
    assert b"PRIVATE KEY" not in bytes(account["key_ciphertext"])
    assert account["account_uri"].startswith("https://")
    # ... and never in an event or audit record.
    assert not any(b"PRIVATE KEY" in m.body for m in [*h.events.messages, *h.audit.messages])
    assert metric("palisade_tls_issuances_total", outcome="issued") >= issued_before + 2
    assert metric("palisade_tls_certificate_expiry_timestamp_seconds", service_id=service_id) == pytest.approx(
        got.not_after.timestamp()
    )


async def test_a_cname_to_the_service_hostname_is_enough(h: Harness, vm: NamespaceVm) -> None:
    service_id, hostname = await h.provision(vm)
    domain = unique_domain("www")
    await h.ca.dns.set_cname(domain, hostname)
    await h.add(service_id, domain)
    assert (await h.event("DomainDnsVerified", service_id, domain=domain))["payload"]["via"] == "cname"
    issued = await h.event("CertificateIssued", service_id, domains=[hostname, domain])
    await h.applied(service_id, issued["payload"]["serial"])
    assert domain in (await h.serves(vm, domain, issued["payload"]["serial"])).names


async def test_a_domain_without_dns_waits_then_is_issued_once_its_record_exists(h: Harness, vm: NamespaceVm) -> None:
    service_id, hostname = await h.provision(vm)
    domain = unique_domain("later")
    added_at = h.clock.now()
    await h.add(service_id, domain)
    pending = await h.event("DomainDnsPending", service_id, domain=domain)
    assert pending["payload"]["reason"] == "no_records"
    assert {(r["type"], r["value"]) for r in pending["payload"]["expected_records"]} == {
        ("CNAME", hostname),
        ("A", vm.address),
    }
    assert datetime.fromisoformat(pending["payload"]["next_check_at"]) == added_at + timedelta(minutes=1)
    assert await h.state_of(service_id, domain) == "pending_dns"

    # Not due yet: nothing happens; due but still no record: the next check is 2 minutes later.
    h.clock.advance(timedelta(seconds=30))
    await h.run_job("recheck-dns")
    h.clock.advance(timedelta(seconds=30))
    await h.run_job("recheck-dns")
    listing = await h.domains(service_id)
    entry = next(d for d in listing.domains if d.domain == domain)
    assert entry.state == "pending_dns"
    assert entry.next_dns_check_at == added_at + timedelta(minutes=1) + timedelta(minutes=2)

    # The user creates the record; the next scheduled check finds it and the certificate follows.
    await h.ca.dns.add_a(domain, vm.address)
    h.clock.advance(timedelta(minutes=2))
    await h.run_job("recheck-dns")
    await h.event("DomainDnsVerified", service_id, domain=domain)
    issued = await h.event("CertificateIssued", service_id, domains=[hostname, domain])
    await h.applied(service_id, issued["payload"]["serial"])
    await h.serves(vm, domain, issued["payload"]["serial"])
    assert await h.state_of(service_id, domain) == "active"


async def test_a_domain_whose_dns_never_comes_fails_after_seven_days(h: Harness, vm: NamespaceVm) -> None:
    service_id, _ = await h.provision(vm)
    domain = unique_domain("never")
    await h.add(service_id, domain)
    await h.event("DomainDnsPending", service_id, domain=domain)
    h.clock.advance(timedelta(days=6, hours=23))
    await h.run_job("recheck-dns")
    assert await h.state_of(service_id, domain) == "pending_dns"
    listing = await h.domains(service_id)
    entry = next(d for d in listing.domains if d.domain == domain)
    assert entry.next_dns_check_at == h.clock.now() + timedelta(minutes=2)  # second check: 2 minutes
    h.clock.advance(timedelta(hours=1))
    await h.run_job("recheck-dns")
    failed = await h.event("DomainFailed", service_id, domain=domain)
    assert failed["payload"]["reason"] == "dns_not_configured"
    assert await h.state_of(service_id, domain) == "failed"

    # Another chance on request: the record exists now, so the domain is checked and issued.
    await h.ca.dns.add_a(domain, vm.address)
    await h.send(contract.CertificateRenewalRequested(domain=domain), service_id)
    issued = await h.event("CertificateIssued", service_id, domains=[_hostname(await h.domains(service_id)), domain])
    await h.applied(service_id, issued["payload"]["serial"])


def _hostname(listing: contract.DomainList) -> str:
    return listing.hostname


async def test_a_domain_behind_cloudflares_proxy_is_reported_with_guidance(h: Harness, vm: NamespaceVm) -> None:
    service_id, hostname = await h.provision(vm)
    domain = unique_domain("orange")
    await h.ca.dns.add_a(domain, CLOUDFLARE_ADDRESS)
    await h.add(service_id, domain)
    proxied = await h.event("DomainProxied", service_id, domain=domain)
    assert proxied["payload"]["addresses"] == [CLOUDFLARE_ADDRESS]
    guidance = proxied["payload"]["guidance"]
    assert "DNS only" in guidance
    assert "grey cloud" in guidance
    assert "Full (strict)" in guidance
    assert await h.state_of(service_id, domain) == "proxied"

    # Grey cloud: DNS now points at the service; the next check issues.
    await h.ca.dns.clear_a(domain)
    await h.ca.dns.add_a(domain, vm.address)
    h.clock.advance(timedelta(minutes=1))
    await h.run_job("recheck-dns")
    issued = await h.event("CertificateIssued", service_id, domains=[hostname, domain])
    await h.applied(service_id, issued["payload"]["serial"])


async def test_port_80_closed_blocks_issuance_until_the_firewall_opens_it(h: Harness, vm: NamespaceVm) -> None:
    service_id, hostname = await h.provision(vm, port_80_open=False)
    assert await h.state_of(service_id, hostname) == "blocked"
    domain = unique_domain("fw")
    await h.ca.dns.add_a(domain, vm.address)
    await h.add(service_id, domain)
    blocked = await h.event("DomainBlocked", service_id, domain=domain)
    assert blocked["payload"]["reason"] == "port_80_closed"
    assert await h.state_of(service_id, domain) == "blocked"
    assert not h.payloads("CertificateIssued", service_id)
    assert not vm.path(SITE_FILE).exists()  # nothing was written to the VM

    await h.firewall(service_id, port_80_open=True)
    issued = await h.event("CertificateIssued", service_id)
    assert issued["payload"]["domains"] == [hostname, domain]
    await h.applied(service_id, issued["payload"]["serial"])
    await h.serves(vm, domain, issued["payload"]["serial"])

    # Closing it again blocks new domains only; the served certificate stays.
    await h.firewall(service_id, port_80_open=False)
    later = unique_domain("fw2")
    await h.ca.dns.add_a(later, vm.address)
    await h.add(service_id, later)
    await h.event("DomainBlocked", service_id, domain=later)
    assert await h.state_of(service_id, domain) == "active"
    await h.serves(vm, domain, issued["payload"]["serial"])


# ---------------------------------------------------------------- renewal


async def test_moving_the_clock_into_the_last_third_renews_and_nginx_serves_the_new_serial(
    h: Harness, vm: NamespaceVm
) -> None:
    service_id, hostname = await h.provision(vm)
    first = await h.event("CertificateIssued", service_id)
    listing = await h.domains(service_id)
    assert listing.certificate is not None
    renew_at = listing.certificate.renew_at
    lifetime = listing.certificate.not_after - listing.certificate.not_before
    # A third of the lifetime left, less up to 5 % of jitter: not a fixed 30 days.
    assert (
        listing.certificate.not_before + lifetime * 0.60
        <= renew_at
        <= listing.certificate.not_before + lifetime * (2 / 3) + timedelta(minutes=1)
    )
    assert listing.next_attempt_at == renew_at

    h.clock.set(renew_at - timedelta(minutes=1))
    await h.run_job("request-due-issues")
    assert len(h.payloads("CertificateIssued", service_id)) == 1

    h.clock.set(renew_at + timedelta(seconds=1))
    await h.run_job("request-due-issues")
    renewed = await h.event("CertificateIssued", service_id, after=1)
    assert renewed["payload"]["renewal"] is True
    assert renewed["payload"]["serial"] != first["payload"]["serial"]
    assert renewed["payload"]["domains"] == [hostname]
    await h.applied(service_id, renewed["payload"]["serial"])
    await h.serves(vm, hostname, renewed["payload"]["serial"])
    # The old certificate's files are gone from the VM; the next renewal is a lifetime later.
    assert not vm.path(f"/etc/nginx/palisade-tls/{first['payload']['serial']}").exists()
    after = await h.domains(service_id)
    assert after.certificate is not None
    assert after.certificate.renew_at > h.clock.now() + timedelta(days=50)


async def test_a_ca_refusing_validation_backs_off_and_the_old_certificate_stays(h: Harness, vm: NamespaceVm) -> None:
    service_id, hostname = await h.provision(vm)
    first = await h.event("CertificateIssued", service_id)
    old_serial = first["payload"]["serial"]
    listing = await h.domains(service_id)
    assert listing.certificate is not None

    # The CA's resolvers now see another address for the hostname (the worker's still see the
    # VM, so the self-check passes): Pebble's validation fails.
    await h.ca.dns.clear_a(hostname, ca_only=True)
    await h.ca.dns.add_a(hostname, "127.0.0.1", ca_only=True)
    h.clock.set(listing.certificate.renew_at + timedelta(seconds=1))
    failed_at = h.clock.now()
    await h.run_job("request-due-issues")
    failed = await h.event("CertificateRenewalFailed", service_id)
    assert failed["payload"]["reason"] == "validation_failed"
    assert failed["payload"]["attempt"] == 1
    assert failed["payload"]["current_serial"] == old_serial
    assert datetime.fromisoformat(failed["payload"]["next_attempt_at"]) == failed_at + timedelta(minutes=1)
    await wait_until(
        lambda: bool(h.audits(action="CertificateIssueRequested", outcome="failed", reason="validation_failed")),
        what="the audit record of the failed issuance",
    )
    await h.serves(vm, hostname, old_serial)  # still served

    # Not due again before the back-off; then 1 minute doubles to 2.
    h.clock.advance(timedelta(seconds=30))
    await h.run_job("request-due-issues")
    h.clock.advance(timedelta(seconds=31))
    await h.run_job("request-due-issues")
    second = await h.event("CertificateRenewalFailed", service_id, after=1)
    assert second["payload"]["attempt"] == 2
    assert datetime.fromisoformat(second["payload"]["next_attempt_at"]) == h.clock.now() + timedelta(minutes=2)
    assert len(h.payloads("CertificateRenewalFailed", service_id)) == 2
    listing = await h.domains(service_id)
    assert listing.failures == 2
    assert "validation_failed" in (listing.last_error or "")
    await h.serves(vm, hostname, old_serial)

    # Less than 7 days left: said once.
    assert listing.certificate is not None
    h.clock.set(listing.certificate.not_after - timedelta(days=6))
    await h.run_job("warn-expiring")
    await h.run_job("warn-expiring")
    soon = await h.event("CertificateExpiringSoon", service_id)
    assert soon["payload"]["serial"] == old_serial
    assert 5 * 86400 < soon["payload"]["seconds_left"] <= 6 * 86400
    assert len(h.payloads("CertificateExpiringSoon", service_id)) == 1

    # The CA sees the VM again: the next attempt renews.
    await h.ca.dns.clear_a(hostname, ca_only=True)
    await h.ca.dns.add_a(hostname, vm.address, ca_only=True)
    await h.run_job("request-due-issues")
    renewed = await h.event("CertificateIssued", service_id, after=1)
    await h.applied(service_id, renewed["payload"]["serial"])
    await h.serves(vm, hostname, renewed["payload"]["serial"])
    assert (await h.domains(service_id)).failures == 0


async def test_a_new_domain_the_ca_refuses_fails_alone_and_the_rest_is_issued(h: Harness, vm: NamespaceVm) -> None:
    service_id, hostname = await h.provision(vm)
    good, bad = unique_domain("good"), unique_domain("bad")
    await h.ca.dns.add_a(good, vm.address)
    await h.ca.dns.add_a(bad, vm.address)
    await h.ca.dns.clear_a(bad, ca_only=True)  # the CA cannot resolve it
    await h.add(service_id, bad)
    failed = await h.event("DomainFailed", service_id, domain=bad)
    assert failed["payload"]["reason"] == "validation_failed"
    await h.add(service_id, good)
    issued = await h.event("CertificateIssued", service_id, domains=[hostname, good])
    await h.applied(service_id, issued["payload"]["serial"])
    assert await h.state_of(service_id, bad) == "failed"
    assert not h.payloads("CertificateRenewalFailed", service_id)


async def test_reset_sets_the_certificate_aside_and_issues_a_new_one(h: Harness, vm: NamespaceVm) -> None:
    service_id, hostname = await h.provision(vm)
    first = await h.event("CertificateIssued", service_id)
    reset = await h.send(contract.SslResetRequested(), service_id)
    assert (await h.decision(reset))["payload"] == {"set_aside_serial": first["payload"]["serial"]}
    issued = await h.event("CertificateIssued", service_id, after=1)
    assert issued["payload"]["serial"] != first["payload"]["serial"]
    await h.applied(service_id, issued["payload"]["serial"])
    await h.serves(vm, hostname, issued["payload"]["serial"])
    async with h.rt.pool.acquire() as conn:
        statuses = dict(await conn.fetch("SELECT serial, status FROM certificates WHERE service_id = $1", service_id))
    assert statuses == {first["payload"]["serial"]: "set_aside", issued["payload"]["serial"]: "current"}


async def test_removing_a_domain_drops_its_server_block_and_shrinks_the_certificate(
    h: Harness, vm: NamespaceVm
) -> None:
    service_id, hostname = await h.provision(vm)
    keep, drop = unique_domain("keep"), unique_domain("drop")
    for domain in (keep, drop):
        await h.ca.dns.add_a(domain, vm.address)
        await h.add(service_id, domain)
    both = await h.event("CertificateIssued", service_id, domains=[hostname, keep, drop])
    await h.applied(service_id, both["payload"]["serial"])
    await h.serves(vm, drop, both["payload"]["serial"])

    removed = await h.send(contract.DomainRemoved(domain=drop.upper()), service_id)
    assert (await h.decision(removed))["payload"] == {"domain": drop}  # DomainReleased
    shrunk = await h.event("CertificateIssued", service_id, domains=[hostname, keep])
    await h.applied(service_id, shrunk["payload"]["serial"])
    got = await h.serves(vm, keep, shrunk["payload"]["serial"])
    assert drop not in got.names
    assert drop not in vm.path(SITE_FILE).read_text()
    assert await handshake_refused(vm.address, drop, h.ca.root_pem) is not None
    assert [d.domain for d in (await h.domains(service_id)).domains] == [hostname, keep]

    # The hostname cannot be removed; an unknown domain is said so.
    refused = await h.send(contract.DomainRemoved(domain=hostname), service_id)
    assert (await h.decision(refused))["payload"]["reason"] == "hostname_not_removable"
    unknown = await h.send(contract.DomainRemoved(domain=drop), service_id)
    assert (await h.decision(unknown))["payload"]["reason"] == "unknown_domain"


INVALID = [
    ("", "domain_empty"),
    ("   ", "domain_empty"),
    ("203.0.113.7", "domain_is_ip"),
    ("[2001:db8::1]", "domain_is_ip"),
    ("2001:db8::1", "domain_is_ip"),
    ("10.1.2", "domain_is_ip"),
    ("*.example.com", "domain_wildcard"),
    ("shop.example.com; return 200 pwned", "domain_invalid_characters"),
    ("shop.example.com\n}", "domain_invalid_characters"),
    ("shop.example.com{", "domain_invalid_characters"),
    ('shop"example.com', "domain_invalid_characters"),
    ("$host.example.com", "domain_invalid_characters"),
    ("shop.example.com/x", "domain_invalid_characters"),
    ("under_score.example.com", "domain_invalid_characters"),
    ("zero\u200bwidth.example.com", "domain_invalid_characters"),
    ("a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ".example.com", "domain_too_long"),
    ("x" * 64 + ".example.com", "domain_idna_invalid"),
    ("-leading.example.com", "domain_idna_invalid"),
    ("double..dot.example.com", "domain_idna_invalid"),
    ("xn--zz.example.com", "domain_idna_invalid"),
    ("localhost", "domain_not_fully_qualified"),
    (PLATFORM_DOMAIN, "domain_platform_reserved"),
    (f"other-service.{PLATFORM_DOMAIN}", "domain_platform_reserved"),
]


async def test_every_invalid_domain_is_rejected_with_its_reason_and_nothing_reaches_the_vm(
    start, vm: NamespaceVm
) -> None:
    h: Harness = await start(max_domains_per_service=3)
    service_id, hostname = await h.provision(vm)
    await h.serves(vm, hostname, (await h.event("CertificateIssued", service_id))["payload"]["serial"])
    one = unique_domain("one")
    await h.ca.dns.add_a(one, vm.address)
    await h.add(service_id, one)
    await h.applied(service_id, (await h.event("CertificateIssued", service_id, after=1))["payload"]["serial"])
    before = tree_snapshot(vm.dir / "etc/nginx"), tree_snapshot(vm.dir / "var/www")
    applied_before = len(h.payloads("TlsConfigApplied", service_id))
    rejected_before = {r: metric("palisade_tls_domain_rejections_total", reason=r) for _, r in INVALID}

    cases = [*INVALID, (one, "domain_already_added"), (one.upper() + ".", "domain_already_added")]
    for raw, reason in cases:
        env = await h.add(service_id, raw)
        decision = await h.decision(env)
        assert (decision["type"], decision["payload"]["reason"]) == ("DomainRejected", reason), raw
        assert decision["payload"]["domain"] == raw[:300]
        # The audit record travels on its own exchange: it may arrive just after the event.
        await wait_until(
            lambda m=str(env.message_id), r=reason: bool(h.audits(message_id=m, outcome="rejected", reason=r)),
            what=f"the audit record of {raw!r}",
        )
    # Unicode is fine and stored in A-label form; the limit (3 here) counts the hostname.
    idn = f"bücher-{os.getpid()}.example.com"
    accepted = await h.decision(await h.add(service_id, idn))
    assert accepted["payload"]["domain"] == idna.encode(idn).decode()
    assert accepted["payload"]["domain"].startswith("xn--")
    too_many = await h.decision(await h.add(service_id, unique_domain("four")))
    assert too_many["payload"]["reason"] == "too_many_domains"
    listing = await h.domains(service_id)
    assert next(d.display for d in listing.domains if d.domain.startswith("xn--")) == idn

    # Nothing was written to the VM by any of it (the IDN domain has no DNS: pending, no write).
    assert (tree_snapshot(vm.dir / "etc/nginx"), tree_snapshot(vm.dir / "var/www")) == before
    assert len(h.payloads("TlsConfigApplied", service_id)) == applied_before
    assert metric("palisade_tls_domain_rejections_total", reason="domain_is_ip") == rejected_before["domain_is_ip"] + 4
    unknown = await h.decision(await h.add("svc-unknown", unique_domain()))
    assert unknown["payload"]["reason"] == "unknown_service"


# ---------------------------------------------------------------- the VM's configuration


async def test_the_server_blocks_route_challenges_redirect_http_and_proxy_https(h: Harness, vm: NamespaceVm) -> None:
    _service_id, hostname = await h.provision(vm)
    text = vm.path(SITE_FILE).read_text()
    assert f"server_name {hostname};" in text
    assert "location ^~ /.well-known/acme-challenge/" in text
    assert "default_server" not in text  # the rate-limit worker's default server holds port 80
    await redirected(vm, hostname)
    status, _ = await http_get(vm.address, host=hostname, path="/.well-known/acme-challenge/missing")
    assert status == 404  # served from the web root, not redirected
    # Over HTTPS nginx proxies to the VM's application.
    context = ssl.create_default_context(cadata=h.ca.root_pem.decode())
    async with httpx.AsyncClient(verify=context, trust_env=False) as http:

        async def get() -> httpx.Response:
            return await http.get(
                f"https://{vm.address}/hello", headers={"Host": hostname}, extensions={"sni_hostname": hostname}
            )

        async def proxied() -> bool:
            # Right after the reload an old nginx worker may still take a connection or two.
            with contextlib.suppress(httpx.HTTPError):
                return (await get()).status_code == 200
            return False

        await wait_until(proxied, what="HTTPS proxied to the application")
        response = await get()
        assert response.status_code == 200
        assert response.text == f"app {vm.name} /hello\n"
        assert "x-snippet" not in response.headers
        # The rate-limit worker's snippet is included as soon as it exists (no TLS change needed).
        assert f"include {vm.path(ratelimit.NGINX_SERVER_SNIPPET_INCLUDE)};" in text
        vm.path(ratelimit.NGINX_SERVER_SNIPPET).write_text('add_header X-Snippet "included" always;\n')
        await vm.exec(*vm.layout.nginx("-s", "reload"))

        async def snippet_applies() -> bool:
            # The reload retires the nginx worker holding our kept-alive connection.
            with contextlib.suppress(httpx.HTTPError):
                return bool((await get()).headers.get("x-snippet") == "included")
            return False

        await wait_until(snippet_applies, what="the snippet's header on HTTPS responses")
    assert stat.S_IMODE(os.stat(vm.path(SITE_FILE)).st_mode) == 0o644


async def test_a_reprovisioned_vm_gets_the_certificate_again(h: Harness, make_vms) -> None:
    [vm] = await make_vms(1)
    service_id, hostname = await h.provision(vm)
    serial = (await h.event("CertificateIssued", service_id))["payload"]["serial"]
    [other] = await make_vms(1)
    from palisade_events.contract import platform
    from palisade_events.contract.platform import SshEndpoint

    await h.ca.dns.clear_a(hostname)
    await h.ca.dns.add_a(hostname, other.address)
    await h.client.publish(
        platform.ServiceProvisioned(
            service_id=service_id,
            name=hostname.split("-u76")[0],
            software="redis",
            account_id="acc-1",
            hostname=hostname,
            ipv4=other.address,
            private_ip=other.address,
            ssh=SshEndpoint(host=other.address, port=other.port, host_key=other.host_key),
        ),
        service_id=service_id,
    )
    await h.event("TlsConfigApplied", service_id, serial=serial, after=1)
    await h.serves(other, hostname, serial)


async def test_queries_and_commands_for_unknown_services_are_refused(h: Harness) -> None:
    from palisade_events.client import QueryRejectedError

    with pytest.raises(QueryRejectedError, match="unknown_service"):
        await h.domains("svc-nobody")
    reset = await h.decision(await h.send(contract.SslResetRequested(), "svc-nobody"))
    assert reset["type"] == "SslResetRejected"
    renew = await h.decision(await h.send(contract.CertificateRenewalRequested(), "svc-nobody"))
    assert renew["type"] == "CertificateRenewalRejected"


# ---------------------------------------------------------------- the CLI


async def palisade(*args: str) -> tuple[int, str]:
    """`palisade ...` as a user runs it: a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "palisade_events.cli.main",
        *args,
        env={**os.environ, "PALISADE_AMQP_URL": AMQP_URL, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_the_cli_adds_lists_renews_and_removes(h: Harness, vm: NamespaceVm) -> None:
    service_id, hostname = await h.provision(vm)
    domain = unique_domain("cli")
    code, out = await palisade("tls", "add", service_id, domain)
    assert code == 0, out
    assert "DomainDnsPending" in out
    assert f"{domain}  CNAME  {hostname}" in out
    code, out = await palisade("tls", "add", service_id, "*.example.com")
    assert code == 1, out
    assert "DomainRejected: domain_wildcard" in out

    code, out = await palisade("tls", "list", service_id)
    assert code == 0, out
    assert f"{hostname}  active  (service hostname)" in out
    assert f"{domain}  pending_dns  next DNS check" in out
    assert f"needs: CNAME {hostname} or A {vm.address}" in out

    await h.ca.dns.add_a(domain, vm.address)
    code, out = await palisade("tls", "renew", service_id, domain)
    assert code == 0, out
    assert "CertificateIssued" in out
    assert domain in out
    code, out = await palisade("tls", "remove", service_id, domain)
    assert code == 0, out
    assert "DomainReleased" in out
    code, out = await palisade("tls", "list", "svc-nobody")
    assert code == 1, out
    assert "unknown_service" in out


async def test_a_rotated_key_re_encrypts_the_stored_keys_and_a_missing_one_stops_the_worker(
    start, run_worker, vm: NamespaceVm, acme_ca: AcmeCa, testvms: VmSession
) -> None:
    old_key = generate_key("k-old")
    h: Harness = await start(key=SecretStr(old_key))
    service_id, hostname = await h.provision(vm)
    serial = (await h.event("CertificateIssued", service_id))["payload"]["serial"]
    await h.rt.stop()

    new_key = generate_key("k-new")
    with pytest.raises(KeyConfigError, match="k-old"):  # stored keys under a key it is not given
        await run_worker(spec(tls_settings(acme_ca, key=SecretStr(new_key)), hostctl_settings(testvms)))
    rotated: Harness = await start(key=SecretStr(new_key), old_keys=SecretStr(old_key))
    # The worker's own job loop runs the job at start too; whichever claims the rows (the other
    # skips them, SKIP LOCKED), the stored keys end under the new key.
    await rotated.run_job("reencrypt-secrets")

    async def all_under_new_key() -> bool:
        async with rotated.rt.pool.acquire() as conn:
            sql = "SELECT key_id FROM certificates UNION SELECT key_id FROM acme_accounts"
            return {r["key_id"] for r in await conn.fetch(sql)} == {"k-new"}

    await wait_until(all_under_new_key, what="every stored key under k-new")
    await rotated.run_job("reencrypt-secrets")  # nothing left to claim: the gauges from committed state
    assert metric("palisade_tls_stored_secrets", kind="certificate_key", key_id="k-new") == 1
    await wait_until(lambda: bool(rotated.audits(action="SecretsReencrypted", outcome="accepted")), what="audit")
    # The re-encrypted account and certificate key still work: a renewal under the new key only.
    await rotated.rt.stop()
    only_new: Harness = await start(key=SecretStr(new_key))
    await only_new.send(contract.CertificateRenewalRequested(), service_id)
    renewed = await only_new.event("CertificateIssued", service_id)
    assert renewed["payload"]["serial"] != serial
    await only_new.applied(service_id, renewed["payload"]["serial"])
    await only_new.serves(vm, hostname, renewed["payload"]["serial"])
