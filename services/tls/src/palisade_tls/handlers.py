"""What the TLS worker does with each message. The rules are in `domain`, the SQL in
`store`, the CA in `acme_client`/`issuance`, the VM's files in `vm`.

Three kinds of work, each in its own transaction:
- domain changes (`DomainAdded`, `DomainRemoved`, renew, reset, firewall and platform
  events) lock the service row, decide, record, and ask for the slower work by emitting
  `CertificateIssueRequested` / `TlsConfigApplyRequested` to this worker (outbox);
- an issuance (`CertificateIssueRequested`) takes the service's advisory lock, makes
  sure nginx routes the challenge path of every name, orders the certificate (challenge
  files on the VM, self-check, CA), stores it (key encrypted), and asks for the apply;
- an apply (`TlsConfigApplyRequested`) takes the same lock and writes the certificate,
  key and server blocks rendered from what is committed, `nginx -t`, reload.
The slow ones hold one pooled connection and the advisory lock while they talk to the
CA and the VM; domain changes never wait for them.

A CA failure is not a message failure: it is recorded with its back-off (1 minute
doubling to 6 hours, never before the CA's Retry-After) and the scheduler asks again
when it is due. An unreachable VM raises `TransientError` (the retry ladder); the
scheduler asks again for work whose message was parked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from palisade_events import Context, Event, Job, Rejected, Reply, TransientError, WorkerRuntime
from palisade_events.contract import firewall, platform
from palisade_events.contract import tls as contract
from palisade_hostctl import (
    ActivationFailed,
    AuthenticationFailed,
    Host,
    HostctlError,
    HostIdentity,
    HostKeyMismatch,
    ReplaceResult,
    ValidationFailed,
)

from . import domain, store
from .acme_client import AccountGone, AcmeFailure, Issued
from .deps import Deps
from .domain import DnsVerdict, DomainRefused
from .issuance import account_aad, certificate_key_aad, new_private_key, obtain
from .metrics import (
    CERTIFICATE_EXPIRY,
    CONFIG_APPLIES,
    DNS_CHECKS,
    DOMAIN_STATES,
    DOMAINS,
    ISSUANCE_SECONDS,
    ISSUANCES,
    REJECTIONS,
    STORED_SECRETS,
)
from .vm import CertificateFiles, VmPaths, install

log = logging.getLogger("palisade.tls")

Ctx = Context[Deps]
FailureReason = Literal[
    "validation_failed", "self_check_failed", "rate_limited", "ca_error", "ca_unreachable", "port_80_closed",
    "vm_error",
]  # fmt: skip
# Requests that act whatever the schedule says (a person or a change asked for them).
FORCING = ("renew_requested", "reset")
SCHEDULED = ("renewal", "retry")


def _sid(ctx: Ctx) -> str:
    return ctx.service_id or ""


def _reject(ctx: Ctx, reason: str, event: Event | None = None, **detail: str | None) -> Rejected:
    ctx.after_commit(lambda: REJECTIONS.labels(reason).inc())
    return Rejected(reason, event, **detail)


async def _request_issue(
    ctx: Ctx,
    service_id: str,
    reason: Any,
    *,
    force: bool = False,
    reset: bool = False,
    clear_failures: bool = False,
) -> None:
    await store.schedule_issue(
        ctx.db, service_id, ctx.now(), reason, force=force, reset=reset, clear_failures=clear_failures
    )
    await ctx.emit(contract.CertificateIssueRequested(reason=reason), service_id=service_id)


async def _request_apply(ctx: Ctx, service_id: str, reason: Any) -> None:
    await store.mark_apply_requested(ctx.db, service_id, ctx.now())
    await ctx.emit(contract.TlsConfigApplyRequested(reason=reason), service_id=service_id)


def _normalize(raw: str) -> str | None:
    """The A-label form of a name the service may already have (its hostname included)."""
    try:
        return domain.check_domain(raw, platform_domains=()).name
    except DomainRefused:
        return None


# ------------------------------------------------------------ DNS


async def _judge(ctx: Ctx, name: str, service: store.Service) -> DnsVerdict:
    answer = await ctx.deps.resolver.lookup(name)
    verdict = domain.judge_dns(
        answer, hostname=service.hostname, service_addresses=service.addresses, cloudflare=ctx.deps.cloudflare
    )
    ctx.after_commit(lambda: DNS_CHECKS.labels(verdict.outcome).inc())
    return verdict


def _expected(name: str, service: store.Service) -> list[contract.DnsRecord]:
    return [
        contract.DnsRecord(type=r.type, name=r.name, value=r.value)
        for r in domain.expected_records(name, service.hostname, service.ipv4, service.ipv6)
    ]


def _describe(verdict: DnsVerdict) -> str:
    found = ", ".join(verdict.found) or "nothing"
    if verdict.outcome == "proxied":
        return f"resolves to Cloudflare's proxy ({found})"
    return {
        "no_records": "no CNAME, A or AAAA record yet",
        "points_elsewhere": f"points elsewhere ({found})",
        "lookup_failed": "the DNS lookup failed",
    }.get(verdict.reason or "", found)


async def _settle_dns(
    ctx: Ctx,
    service: store.Service,
    row: store.DomainRow,
    verdict: DnsVerdict,
    *,
    restart: bool,
) -> bool:
    """Record what a DNS check of `row` found and say so; True when the domain now waits
    for a certificate (the caller asks for one)."""
    now, sid, name, settings = ctx.now(), service.service_id, row.domain, ctx.deps.settings
    if verdict.outcome == "ok":
        is_open = await store.port_80_open(ctx.db, sid)
        await store.set_domain_state(ctx.db, sid, name, "issuing" if is_open else "blocked", now)
        await ctx.emit(contract.DomainDnsVerified(domain=name, via=verdict.via or "address"), service_id=sid)
        if not is_open:
            await ctx.emit(contract.DomainBlocked(domain=name, reason="port_80_closed"), service_id=sid)
        return is_open
    state = "proxied" if verdict.outcome == "proxied" else "pending_dns"
    error = _describe(verdict)
    since = now if restart or row.pending_since is None else row.pending_since
    if now - since >= timedelta(seconds=settings.dns_give_up_seconds):
        await store.set_domain_state(ctx.db, sid, name, "failed", now, last_error=f"gave up after 7 days: {error}")
        reason: Literal["proxied", "dns_not_configured"] = "proxied" if state == "proxied" else "dns_not_configured"
        await ctx.emit(contract.DomainFailed(domain=name, reason=reason, detail=error[:500]), service_id=sid)
        return False
    checks = 0 if restart else row.dns_checks
    next_check = now + domain.dns_recheck_delay(
        checks, settings.dns_recheck_initial_seconds, settings.dns_recheck_max_seconds
    )
    await store.record_dns_pending(
        ctx.db, sid, name, state, checks=checks + 1, next_check_at=next_check, error=error, now=now, restart=restart
    )
    if restart or row.state != state or row.last_error != error:  # say it once per change, not every re-check
        if state == "proxied":
            event: Event = contract.DomainProxied(
                domain=name, addresses=list(verdict.found)[:20], guidance=domain.CLOUDFLARE_GUIDANCE
            )
        else:
            event = contract.DomainDnsPending(
                domain=name,
                reason=verdict.reason or "no_records",
                expected_records=_expected(name, service),
                found=[f[:100] for f in verdict.found][:20],
                next_check_at=next_check,
            )
        await ctx.emit(event, service_id=sid)
    return False


async def _recheck_now(ctx: Ctx, service: store.Service, row: store.DomainRow) -> bool:
    """Another chance for a pending, proxied or failed domain: check its DNS now, with the
    back-off and the 7-day limit started afresh."""
    verdict = await _judge(ctx, row.domain, service)
    return await _settle_dns(ctx, service, row, verdict, restart=True)


# ------------------------------------------------------------ projections


async def service_provisioned(evt: platform.ServiceProvisioned, ctx: Ctx) -> None:
    sid, now = evt.service_id, ctx.now()
    hostname = domain.platform_hostname(evt.hostname)
    before = await store.upsert_service(
        ctx.db,
        sid,
        hostname=hostname,
        ipv4=evt.ipv4,
        ipv6=evt.ipv6,
        ssh_host=evt.ssh.host,
        ssh_port=evt.ssh.port,
        host_key=evt.ssh.host_key,
        now=now,
    )
    if before is not None and before.hostname != hostname:
        # The service was renamed: its old name leaves the certificate, the new one joins.
        await store.remove_domain(ctx.db, sid, before.hostname)
        await ctx.emit(contract.DomainReleased(domain=before.hostname), service_id=sid)
    if before is None or before.hostname != hostname:
        # The service's own hostname is its first domain: it resolves by construction.
        is_open = await store.port_80_open(ctx.db, sid)
        if await store.get_domain(ctx.db, sid, hostname) is None:
            await store.add_domain(
                ctx.db, sid, hostname, kind="hostname", state="issuing" if is_open else "blocked", now=now
            )
        await ctx.emit(contract.DomainAccepted(domain=hostname), service_id=sid)
        if is_open:
            await _request_issue(ctx, sid, "domains_changed")
        else:
            await ctx.emit(contract.DomainBlocked(domain=hostname, reason="port_80_closed"), service_id=sid)
        return
    moved = (before.ssh_host, before.ssh_port, before.host_key) != (evt.ssh.host, evt.ssh.port, evt.ssh.host_key)
    if moved:
        # A re-provisioned VM gets the service's certificate and server blocks again.
        await _request_apply(ctx, sid, "reprovisioned")


async def service_deprovisioned(evt: platform.ServiceDeprovisioned, ctx: Ctx) -> None:
    await store.delete_service(ctx.db, evt.service_id)
    ctx.after_commit(lambda: _forget_expiry(evt.service_id))


def _forget_expiry(service_id: str) -> None:
    with contextlib.suppress(KeyError):  # no certificate was ever issued
        CERTIFICATE_EXPIRY.remove(service_id)


async def firewall_applied(evt: firewall.FirewallApplied, ctx: Ctx) -> None:
    sid, now = _sid(ctx), ctx.now()
    if not sid:
        return
    was_open = await store.record_firewall(ctx.db, sid, evt.port_80_open, evt.version, now)
    if was_open is None or was_open == evt.port_80_open:
        return  # older than what is known, or nothing changed for port 80
    if await store.lock_service(ctx.db, sid) is None:
        return  # remembered for when the service is provisioned
    if evt.port_80_open:
        await store.move_domains(ctx.db, sid, "blocked", "issuing", now)
        await _request_issue(ctx, sid, "port_80_opened", clear_failures=True)
    else:
        for name in await store.move_domains(ctx.db, sid, "issuing", "blocked", now):
            await ctx.emit(contract.DomainBlocked(domain=name, reason="port_80_closed"), service_id=sid)


# ------------------------------------------------------------ domain changes


async def domain_added(cmd: contract.DomainAdded, ctx: Ctx) -> None:
    sid, settings = _sid(ctx), ctx.deps.settings
    raw = cmd.domain[:300]
    service = await store.lock_service(ctx.db, sid)
    if service is None:
        raise _reject(ctx, "unknown_service", contract.DomainRejected(domain=raw, reason="unknown_service"))
    try:
        checked = domain.check_domain(cmd.domain, platform_domains=settings.platform_domains)
    except DomainRefused as refused:
        raise _reject(ctx, refused.reason, contract.DomainRejected(domain=raw, reason=refused.reason)) from None
    if await store.get_domain(ctx.db, sid, checked.name) is not None:
        raise _reject(ctx, "domain_already_added", contract.DomainRejected(domain=raw, reason="domain_already_added"))
    if await store.count_domains(ctx.db, sid) >= settings.max_domains_per_service:
        raise _reject(ctx, "too_many_domains", contract.DomainRejected(domain=raw, reason="too_many_domains"))
    await store.add_domain(ctx.db, sid, checked.name, kind="custom", state="pending_dns", now=ctx.now())
    ctx.audit_detail.update(domain=checked.name)
    await ctx.emit(contract.DomainAccepted(domain=checked.name), service_id=sid)
    row = await store.get_domain(ctx.db, sid, checked.name)
    assert row is not None
    if await _recheck_now(ctx, service, row):
        await _request_issue(ctx, sid, "domains_changed")


async def domain_removed(cmd: contract.DomainRemoved, ctx: Ctx) -> None:
    sid = _sid(ctx)
    raw = cmd.domain[:300]
    service = await store.lock_service(ctx.db, sid)
    if service is None:
        raise _reject(ctx, "unknown_service", contract.DomainRemovalRejected(domain=raw, reason="unknown_service"))
    name = _normalize(cmd.domain)
    row = await store.get_domain(ctx.db, sid, name) if name else None
    if row is None:
        raise _reject(ctx, "unknown_domain", contract.DomainRemovalRejected(domain=raw, reason="unknown_domain"))
    if row.kind == "hostname":
        event = contract.DomainRemovalRejected(domain=raw, reason="hostname_not_removable")
        raise _reject(ctx, "hostname_not_removable", event)
    await store.remove_domain(ctx.db, sid, row.domain)
    ctx.audit_detail.update(domain=row.domain, state=row.state)
    await ctx.emit(contract.DomainReleased(domain=row.domain), service_id=sid)
    cert = await store.current_certificate(ctx.db, sid)
    if row.state in store.ON_CERTIFICATE or (cert is not None and row.domain in cert.domains):
        # Its server block goes now; the certificate is reissued without it.
        await _request_apply(ctx, sid, "domains_changed")
        await _request_issue(ctx, sid, "domains_changed")


async def renewal_requested(cmd: contract.CertificateRenewalRequested, ctx: Ctx) -> None:
    sid = _sid(ctx)
    service = await store.lock_service(ctx.db, sid)
    if service is None:
        event = contract.CertificateRenewalRejected(domain=(cmd.domain or "")[:300] or None, reason="unknown_service")
        raise _reject(ctx, "unknown_service", event)
    if cmd.domain is not None:
        name = _normalize(cmd.domain)
        row = await store.get_domain(ctx.db, sid, name) if name else None
        if row is None:
            event = contract.CertificateRenewalRejected(domain=cmd.domain[:300], reason="unknown_domain")
            raise _reject(ctx, "unknown_domain", event)
        ctx.audit_detail.update(domain=row.domain)
        if row.kind == "custom" and row.state in ("pending_dns", "proxied", "failed"):
            await _recheck_now(ctx, service, row)
    await _request_issue(ctx, sid, "renew_requested", force=True, clear_failures=True)


async def reset_requested(cmd: contract.SslResetRequested, ctx: Ctx) -> None:
    sid = _sid(ctx)
    service = await store.lock_service(ctx.db, sid)
    if service is None:
        raise _reject(ctx, "unknown_service", contract.SslResetRejected(reason="unknown_service"))
    for row in await store.domains(ctx.db, sid):
        if row.kind == "custom" and row.state in ("pending_dns", "proxied", "failed"):
            await _recheck_now(ctx, service, row)
    cert = await store.current_certificate(ctx.db, sid)
    ctx.audit_detail.update(set_aside_serial=cert.serial if cert else None)
    await ctx.emit(contract.SslReset(set_aside_serial=cert.serial if cert else None), service_id=sid)
    await _request_issue(ctx, sid, "reset", force=True, reset=True, clear_failures=True)


# ------------------------------------------------------------ the VM's configuration


def _host(ctx: Ctx, service: store.Service) -> Host:
    return ctx.deps.hosts.host(HostIdentity(service.ssh_host, service.ssh_port, service.host_key))


async def _render(
    ctx: Ctx, service: store.Service, paths: VmPaths
) -> tuple[domain.ServerBlocks, CertificateFiles | None]:
    sid = service.service_id
    rows = await store.domains(ctx.db, sid)
    cert = await store.current_certificate(ctx.db, sid)
    on_cert = set(cert.domains) if cert else set()
    https = tuple(r.domain for r in rows if r.domain in on_cert)
    http = tuple(r.domain for r in rows if r.state == "issuing" and r.domain not in on_cert)
    files = None
    chain: str | None = None
    key: str | None = None
    if cert is not None and https:
        key_pem = ctx.deps.keys.decrypt(cert.key_id, cert.key_ciphertext, certificate_key_aad(sid, cert.serial))
        files = CertificateFiles(cert.serial, cert.fullchain_pem, key_pem)
        chain, key = paths.certificate(cert.serial)
    blocks = domain.ServerBlocks(
        service_id=sid,
        https_names=https if files else (),
        http_names=http,
        serial=files.serial if files else None,
        certificate=chain,
        certificate_key=key,
        acme_webroot=paths.acme_webroot,
        upstream=ctx.deps.settings.upstream,
        snippet=paths.snippet,
    )
    return blocks, files


@dataclass(frozen=True)
class _VmWrite:
    """What writing the service's configuration to its VM did (recorded by `_record_apply`)."""

    blocks: domain.ServerBlocks
    result: ReplaceResult | None = None
    failure: tuple[str, str, dict[str, str | None]] | None = None  # reason, message, audit detail


async def _write_vm(ctx: Ctx, service: store.Service) -> _VmWrite:
    """Write the service's certificate and server blocks, rendered from what is committed, to
    its VM. An unreachable VM raises TransientError (nothing is committed; the message goes
    round the retry ladder); other failures are returned for `_record_apply`."""
    host = _host(ctx, service)
    paths = VmPaths.of(host, ctx.deps.settings)
    blocks, files = await _render(ctx, service, paths)
    text = domain.render_server_blocks(blocks)
    where: dict[str, str | None] = {"host": str(host.identity)}
    try:
        return _VmWrite(blocks, result=await install(host, paths, text, files))
    except HostKeyMismatch as exc:
        detail = {**where, "expected": exc.expected_fingerprint, "presented": exc.presented_fingerprint}
        return _VmWrite(blocks, failure=("host_key_mismatch", str(exc), detail))
    except ValidationFailed as exc:
        return _VmWrite(blocks, failure=("nginx_config_invalid", exc.output, where))
    except ActivationFailed as exc:
        return _VmWrite(blocks, failure=("nginx_reload_failed", exc.output, where))
    except HostctlError as exc:
        if exc.transient:
            ctx.after_commit(lambda: CONFIG_APPLIES.labels("retried").inc())
            raise TransientError(str(exc)) from exc
        reason = "authentication_failed" if isinstance(exc, AuthenticationFailed) else "command_failed"
        return _VmWrite(blocks, failure=(reason, str(exc), where))


async def _record_apply(ctx: Ctx, service_id: str, action: str, written: _VmWrite) -> str | None:
    """Record, announce and count a VM write; None when nginx serves it, else why not."""
    if written.failure is not None:
        reason, message, detail = written.failure
        return await _apply_failed(ctx, service_id, action, reason, message, detail)
    result = written.result
    assert result is not None
    blocks = written.blocks
    await store.mark_applied(ctx.db, service_id, result.sha256, blocks.serial, ctx.now())
    await ctx.emit(
        contract.TlsConfigApplied(
            serial=blocks.serial,
            https_domains=list(blocks.https_names),
            http_domains=list(blocks.http_names),
            checksum=result.sha256,
            changed=result.changed,
        ),
        service_id=service_id,
    )
    outcome = "applied" if result.changed else "unchanged"
    ctx.after_commit(lambda: CONFIG_APPLIES.labels(outcome).inc())
    return None


async def _apply_failed(
    ctx: Ctx, service_id: str, action: str, reason: str, message: str, detail: dict[str, str | None]
) -> str:
    await store.mark_apply_failed(ctx.db, service_id, f"{reason}: {message}", ctx.now())
    await ctx.emit(contract.TlsConfigApplyFailed(reason=reason, detail=message[:500]), service_id=service_id)
    await ctx.audit(action, "failed", reason, service_id=service_id, detail={**detail, "error": message[:500]})
    ctx.after_commit(lambda: CONFIG_APPLIES.labels("failed").inc())
    return f"{reason}: {message}"


async def apply_config(cmd: contract.TlsConfigApplyRequested, ctx: Ctx) -> None:
    sid = _sid(ctx)
    await store.lock_vm(ctx.db, sid)
    service = await store.get_service(ctx.db, sid)
    if service is None:
        raise Rejected("unknown_service", contract.TlsConfigApplyFailed(reason="unknown_service"))
    written = await _write_vm(ctx, service)
    await _record_apply(ctx, sid, "TlsConfigApplyRequested", written)


# ------------------------------------------------------------ issuance


def _due(
    service: store.Service, cert: store.Certificate | None, wanted: list[str], now: datetime, *, force: bool
) -> bool:
    if not wanted:
        return False
    if cert is None or force:
        return True
    if set(wanted) != set(cert.domains):
        return True
    return now >= cert.renew_at


async def issue_certificate(cmd: contract.CertificateIssueRequested, ctx: Ctx) -> None:
    sid, now = _sid(ctx), ctx.now()
    await store.lock_vm(ctx.db, sid)
    service = await store.get_service(ctx.db, sid)
    if service is None:
        raise Rejected("unknown_service")
    rows = await store.domains(ctx.db, sid)
    wanted = [r.domain for r in rows if r.state in store.ON_CERTIFICATE]
    cert = await store.current_certificate(ctx.db, sid)
    force = service.force_issue or cmd.reason in FORCING
    renew_next = cert.renew_at if cert else None

    if cmd.reason in SCHEDULED and not force and service.next_attempt_at is not None and service.next_attempt_at > now:
        # A stale request (the attempt was rescheduled since it was sent): keep the schedule.
        await store.record_attempt_idle(
            ctx.db, sid, next_attempt_at=service.next_attempt_at, reason=service.attempt_reason, now=now
        )
        ctx.audit_detail.update(outcome="not_due")
        return
    if not _due(service, cert, wanted, now, force=force):
        await store.record_attempt_idle(ctx.db, sid, next_attempt_at=renew_next, reason="renewal", now=now)
        ctx.audit_detail.update(outcome="nothing_due")
        return
    if service.retry_not_before is not None and service.retry_not_before > now:
        # The CA said when to come back; nothing, not even a person, makes that sooner.
        await store.record_attempt_idle(
            ctx.db, sid, next_attempt_at=service.retry_not_before, reason=service.attempt_reason or "retry", now=now
        )
        ctx.audit_detail.update(outcome="waiting_for_retry_after")
        return
    if not await store.port_80_open(ctx.db, sid):
        await _attempt_failed(ctx, service, cert, rows, wanted, "port_80_closed", "port 80 is closed on the firewall")
        return

    # nginx must route the challenge path of every name first. The service row is locked only
    # once the VM and the CA are done with, so domain changes never wait for them.
    prepared = await _write_vm(ctx, service)
    started = time.perf_counter()
    outcome: tuple[Issued, bytes] | AcmeFailure | str
    if prepared.failure is not None:
        outcome = "vm_error"
    else:
        try:
            outcome = await _order(ctx, service, wanted)
        except AcmeFailure as failure:
            outcome = failure
        except HostctlError as exc:
            if exc.transient:
                raise TransientError(str(exc)) from exc
            outcome = str(exc)
    elapsed = time.perf_counter() - started

    locked = await store.lock_service(ctx.db, sid)  # fresh, and ours until commit
    if locked is None:  # deprovisioned meanwhile: nothing to record
        ctx.audit_detail.update(outcome="service_gone")
        return
    service = locked
    problem = await _record_apply(ctx, sid, "CertificateIssueRequested", prepared)
    if isinstance(outcome, AcmeFailure):
        f = outcome
        # The CA's Retry-After is an instant of real time; the schedule runs on the worker's
        # clock (moved by tests and `palisade clock`), so carry the wait over to that clock.
        retry_after = f.retry_after + (ctx.now() - datetime.now(UTC)) if f.retry_after is not None else None
        await _attempt_failed(ctx, service, cert, rows, wanted, f.kind, f.detail, retry_after, f.failed_domains)
    elif isinstance(outcome, str):
        await _attempt_failed(ctx, service, cert, rows, wanted, "vm_error", problem or outcome)
    else:
        await _issued(ctx, service, cert, outcome, force_set_aside=service.reset_requested or cmd.reason == "reset")
        ctx.after_commit(lambda: ISSUANCE_SECONDS.observe(elapsed))


async def _order(ctx: Ctx, service: store.Service, wanted: list[str]) -> tuple[Issued, bytes]:
    host = _host(ctx, service)
    paths = VmPaths.of(host, ctx.deps.settings)
    key_pem = new_private_key()  # a fresh key for every order

    async def attempt(registered_again: bool) -> Issued:
        session = await ctx.deps.accounts.session(ctx.db, ctx.now())
        try:
            return await obtain(
                session,
                wanted,
                key_pem,
                host=host,
                paths=paths,
                resolver=ctx.deps.resolver,
                http=ctx.deps.http,
                settings=ctx.deps.settings,
            )
        except AccountGone:
            if registered_again:
                raise AcmeFailure("ca_error", "the CA does not know the account even after registering") from None
            log.warning("the CA does not know the ACME account; registering it again")
            await ctx.deps.accounts.register_again(ctx.db, session, ctx.now())
        finally:
            session.close()
        return await attempt(True)

    return await attempt(False), key_pem


async def _issued(
    ctx: Ctx,
    service: store.Service,
    previous: store.Certificate | None,
    result: tuple[Issued, bytes],
    *,
    force_set_aside: bool,
) -> None:
    issued, key_pem = result
    sid, now, settings = service.service_id, ctx.now(), ctx.deps.settings
    renew_at = domain.renewal_time(
        now,
        issued.not_before,
        issued.not_after,
        left=settings.renew_when_left,
        jitter=settings.renew_jitter,
        draw=ctx.deps.random.random(),
    )
    key_id, blob = ctx.deps.keys.encrypt(key_pem, certificate_key_aad(sid, issued.serial))
    names = list(issued.domains)
    await store.store_certificate(
        ctx.db,
        sid,
        serial=issued.serial,
        domains=names,
        not_before=issued.not_before,
        not_after=issued.not_after,
        issued_at=now,
        renew_at=renew_at,
        fullchain_pem=issued.fullchain_pem,
        key_id=key_id,
        key_ciphertext=blob,
        set_aside_previous=force_set_aside,
    )
    await store.activate_domains(ctx.db, sid, names, now)
    # Domains may have come or gone while the CA worked: then another round is due at once.
    still_wanted = {r.domain for r in await store.domains(ctx.db, sid) if r.state in store.ON_CERTIFICATE}
    again = still_wanted != set(names)
    await store.record_attempt_done(
        ctx.db,
        sid,
        next_attempt_at=now if again else renew_at,
        reason="domains_changed" if again else "renewal",
        now=now,
    )
    await ctx.emit(
        contract.CertificateIssued(
            domains=names,
            not_before=issued.not_before,
            not_after=issued.not_after,
            serial=issued.serial,
            renewal=previous is not None,
        ),
        service_id=sid,
    )
    await ctx.audit(
        "CertificateIssueRequested",
        "accepted",
        service_id=sid,
        detail={
            "serial": issued.serial,
            "domains": len(names),
            "not_after": issued.not_after.isoformat(),
            "previous_serial": previous.serial if previous else None,
        },
    )
    await _request_apply(ctx, sid, "certificate_issued")
    if again:
        await _request_issue(ctx, sid, "domains_changed")
    expiry = issued.not_after.timestamp()

    def count() -> None:
        ISSUANCES.labels("issued").inc()
        CERTIFICATE_EXPIRY.labels(sid).set(expiry)

    ctx.after_commit(count)


async def _attempt_failed(
    ctx: Ctx,
    service: store.Service,
    cert: store.Certificate | None,
    rows: list[store.DomainRow],
    wanted: list[str],
    kind: FailureReason,
    detail: str,
    retry_after: datetime | None = None,
    failed_domains: dict[str, str] | None = None,
) -> None:
    """An attempt failed. Names that are not on the served certificate yet and that the CA
    (or the self-check) refused are given up on (`DomainFailed`), and the rest is ordered
    again at once; any other failure backs off."""
    sid, now, settings = service.service_id, ctx.now(), ctx.deps.settings
    by_name = {r.domain: r for r in rows}
    on_cert = set(cert.domains) if cert else set()
    new_failed = sorted(
        d
        for d in (failed_domains or {})
        if d in by_name and by_name[d].kind == "custom" and by_name[d].state == "issuing" and d not in on_cert
    )
    ctx.after_commit(lambda: ISSUANCES.labels(kind).inc())
    if new_failed and kind in ("validation_failed", "self_check_failed"):
        for name in new_failed:
            why = (failed_domains or {}).get(name, detail)[:500]
            await store.set_domain_state(ctx.db, sid, name, "failed", now, last_error=f"{kind}: {why}")
            reason: Literal["validation_failed", "self_check_failed"] = kind
            await ctx.emit(contract.DomainFailed(domain=name, reason=reason, detail=why), service_id=sid)
        await ctx.audit(
            "CertificateIssueRequested",
            "failed",
            kind,
            service_id=sid,
            detail={"failed_domains": ", ".join(new_failed)},
        )
        remaining = [d for d in wanted if d not in new_failed]
        if _due(service, cert, remaining, now, force=service.force_issue):
            await _request_issue(ctx, sid, "retry")
        else:
            renew_next = cert.renew_at if cert else None
            await store.record_attempt_idle(ctx.db, sid, next_attempt_at=renew_next, reason="renewal", now=now)
        return
    failures = service.failures + 1
    next_at = domain.next_attempt_after_failure(
        now, failures, retry_after, settings.retry_initial_seconds, settings.retry_max_seconds
    )
    await store.record_attempt_failed(
        ctx.db,
        sid,
        failures=failures,
        next_attempt_at=next_at,
        retry_not_before=retry_after,
        error=f"{kind}: {detail}",
        now=now,
    )
    if cert is not None:
        event: Event = contract.CertificateRenewalFailed(
            domains=wanted,
            reason=kind,
            detail=detail[:500],
            attempt=failures,
            next_attempt_at=next_at,
            current_serial=cert.serial,
            current_not_after=cert.not_after,
        )
    else:
        event = contract.CertificateIssuanceFailed(
            domains=wanted, reason=kind, detail=detail[:500], attempt=failures, next_attempt_at=next_at
        )
    await ctx.emit(event, service_id=sid)
    await ctx.audit(
        "CertificateIssueRequested",
        "failed",
        kind,
        service_id=sid,
        detail={"attempt": failures, "next_attempt_at": next_at.isoformat(), "error": detail[:500]},
    )


# ------------------------------------------------------------ query


async def get_domains(query: contract.GetDomains, ctx: Ctx) -> Reply:
    sid = query.service_id
    service = await store.get_service(ctx.db, sid)
    if service is None:
        raise Rejected("unknown_service")
    rows = await store.domains(ctx.db, sid)
    cert = await store.current_certificate(ctx.db, sid)
    on_cert = set(cert.domains) if cert else set()
    return contract.DomainList(
        service_id=sid,
        hostname=service.hostname,
        port_80_open=await store.port_80_open(ctx.db, sid),
        domains=[
            contract.DomainInfo(
                domain=r.domain,
                display=domain.display_name(r.domain),
                kind=r.kind,  # type: ignore[arg-type]
                state=r.state,  # type: ignore[arg-type]
                expected_records=_expected(r.domain, service) if r.kind == "custom" else [],
                next_dns_check_at=r.next_dns_check_at if r.state in ("pending_dns", "proxied") else None,
                not_after=cert.not_after if cert and r.domain in on_cert else None,
                last_error=r.last_error[:500] if r.last_error else None,
            )
            for r in rows
        ],
        certificate=contract.CertificateInfo(
            serial=cert.serial,
            domains=cert.domains,
            not_before=cert.not_before,
            not_after=cert.not_after,
            renew_at=cert.renew_at,
        )
        if cert
        else None,
        next_attempt_at=service.next_attempt_at,
        failures=service.failures,
        last_error=service.last_error[:500] if service.last_error else None,
    )


HANDLERS: dict[type[Any], Any] = {
    platform.ServiceProvisioned: service_provisioned,
    platform.ServiceDeprovisioned: service_deprovisioned,
    firewall.FirewallApplied: firewall_applied,
    contract.DomainAdded: domain_added,
    contract.DomainRemoved: domain_removed,
    contract.CertificateRenewalRequested: renewal_requested,
    contract.SslResetRequested: reset_requested,
    contract.CertificateIssueRequested: issue_certificate,
    contract.TlsConfigApplyRequested: apply_config,
    contract.GetDomains: get_domains,
}


# ------------------------------------------------------------ scheduled work

BATCH = 50
DNS_CONCURRENCY = 8  # services whose DNS is looked up at once by one run


async def recheck_dns(rt: WorkerRuntime[Deps]) -> int:
    """Look again at pending and proxied domains whose next check is due (1 minute after the
    first, doubling to 1 hour, for up to 7 days): their certificate is asked for as soon as
    their DNS is right, without a new command. One transaction per service, which locks the
    service row first (as domain changes do), so the two never deadlock; a service busy
    with a change is simply looked at on the next run."""
    async with rt.pool.acquire() as conn:
        due = await store.services_with_due_dns_checks(conn, rt.clock.now(), BATCH)
    limit = asyncio.Semaphore(DNS_CONCURRENCY)

    async def one(service_id: str) -> None:
        async with limit, rt.transaction() as ctx:
            service = await store.lock_service(ctx.db, service_id, skip_locked=True)
            if service is None:
                return
            rows = await store.lock_due_dns_checks(ctx.db, service_id, ctx.now())
            verdicts = await asyncio.gather(*(_judge(ctx, r.domain, service) for r in rows))
            ready = False
            for row, verdict in zip(rows, verdicts, strict=True):
                ready = await _settle_dns(ctx, service, row, verdict, restart=False) or ready
            if ready:
                await _request_issue(ctx, service_id, "domains_changed")

    await asyncio.gather(*(one(sid) for sid in due))
    async with rt.pool.acquire() as conn:
        await refresh_gauges(conn, expiries=False)
    return len(due) if len(due) == BATCH else 0


async def request_due_issues(rt: WorkerRuntime[Deps]) -> int:
    """Ask for the issuances, renewals and retries that are due, and again for issuances and
    VM writes whose message was parked long ago."""
    async with rt.transaction() as ctx:
        now = ctx.now()
        stale = now - timedelta(seconds=rt.deps.settings.request_stale_seconds)
        due = await store.claim_due_issues(ctx.db, now, stale, BATCH)
        for sid, reason in due:
            await ctx.emit(contract.CertificateIssueRequested(reason=_scheduled_reason(reason)), service_id=sid)
        for sid in await store.claim_stale_applies(ctx.db, stale, now, BATCH):
            await ctx.emit(contract.TlsConfigApplyRequested(reason="reconcile"), service_id=sid)
    return len(due) if len(due) == BATCH else 0


def _scheduled_reason(reason: str | None) -> Any:
    allowed = contract.CertificateIssueRequested.model_fields["reason"].annotation
    return reason if reason in getattr(allowed, "__args__", ()) and reason not in FORCING else "renewal"


async def warn_expiring(rt: WorkerRuntime[Deps]) -> int:
    """`CertificateExpiringSoon` once per certificate when less than 7 days remain."""
    async with rt.transaction() as ctx:
        now = ctx.now()
        horizon = now + timedelta(seconds=rt.deps.settings.expiring_soon_seconds)
        for cert in await store.claim_expiring(ctx.db, horizon, BATCH):
            await ctx.emit(
                contract.CertificateExpiringSoon(
                    serial=cert.serial,
                    domains=cert.domains,
                    not_after=cert.not_after,
                    seconds_left=int((cert.not_after - now).total_seconds()),
                ),
                service_id=cert.service_id,
            )
            await store.mark_warned(ctx.db, cert.id, now)
        await refresh_gauges(ctx.db)
    return 0


async def refresh_gauges(db: Any, *, expiries: bool = True) -> None:
    """The fleet's gauges from the database (at start, and by the jobs)."""
    counts = await store.domain_state_counts(db)
    for state in DOMAIN_STATES:
        DOMAINS.labels(state).set(counts.get(state, 0))
    if expiries:
        for sid, not_after in await store.current_expiries(db):
            CERTIFICATE_EXPIRY.labels(sid).set(not_after.timestamp())


async def reencrypt_secrets(rt: WorkerRuntime[Deps]) -> int:
    """Keys stored under an older PALISADE_TLS_KEY (now in PALISADE_TLS_OLD_KEYS) are
    re-encrypted under the current one, so the old key can be retired (watch
    `palisade_tls_stored_secrets{key_id}`)."""
    keys = rt.deps.keys
    async with rt.transaction() as ctx:
        sealed = await store.claim_sealed_under_old_keys(ctx.db, keys.current_id, BATCH)
        for item in sealed:
            aad = certificate_key_aad(*item.owner) if item.table == "certificates" else account_aad(item.owner[0])
            key_id, blob = keys.encrypt(keys.decrypt(item.key_id, item.ciphertext, aad), aad)
            await store.reseal(ctx.db, item, key_id, blob)
        if sealed:
            await ctx.audit(
                "SecretsReencrypted",
                "accepted",
                detail={"count": len(sealed), "key_id": keys.current_id},
            )
        counts = await store.sealed_counts(ctx.db)

        def publish() -> None:
            STORED_SECRETS.clear()
            for kind, key_id, n in counts:
                STORED_SECRETS.labels(kind, key_id).set(n)

        ctx.after_commit(publish)
    return len(sealed) if len(sealed) >= BATCH else 0


def jobs(settings: Any) -> tuple[Job, ...]:
    return (
        Job("recheck-dns", settings.dns_every_seconds, recheck_dns),
        Job("request-due-issues", settings.issue_every_seconds, request_due_issues),
        Job("warn-expiring", settings.expiry_every_seconds, warn_expiring),
        Job("reencrypt-secrets", settings.reencrypt_every_seconds, reencrypt_secrets),
    )
