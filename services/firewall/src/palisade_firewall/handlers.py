"""What the firewall worker does with each message. The rules are in `domain`, the SQL in `store`.

Two steps, two transactions. A change of a service's rule set (provisioning defaults,
`FirewallRulesReplaceRequested`, `FirewallEnableRequested`, `FirewallDisableRequested`)
is judged and recorded as the next version in its own short transaction, which also
emits `FirewallApplyRequested` to this worker through the outbox. Putting it in force
is the handler of that request: it takes a per-service advisory lock (applies to one
VM never interleave, across replicas too, while changes, which lock the service row,
never wait for SSH), renders the version committed at that moment, and on the VM
replaces the ruleset file, validates it (`nft -c -f`), loads it (`nft -f`, one
transaction), reads the table back (`nft -j list table inet palisade`) and compares.

So a change is never lost because its VM is unreachable: the apply raises
`TransientError` and goes round the retry ladder (then parked, and the reconcile job
asks again later). A ruleset the kernel refuses, a read-back that differs, a host key
mismatch: `FirewallApplyFailed` + a `failed` audit record, and the VM keeps its
previous ruleset (a refused file is put back by hostctl; `nft -f` is all or nothing).
"""

from __future__ import annotations

import json
import time
from typing import Any

from palisade_events import Context, Job, PermanentError, Rejected, Reply, TransientError
from palisade_events.contract import firewall as fw
from palisade_events.contract import platform, tls
from palisade_events.vm_apply import reconcile_job
from palisade_hostctl import (
    ActivationFailed,
    AuthenticationFailed,
    CommandFailed,
    Host,
    HostctlError,
    HostIdentity,
    HostKeyMismatch,
    NegotiationFailed,
    ValidationFailed,
)

from . import domain, store
from .deps import Deps
from .metrics import APPLIES, APPLY_SECONDS, REJECTIONS, RULES

Ctx = Context[Deps]
RULESET_FILE = "palisade.nft"


def _reject(ctx: Ctx, reason: str, detail: str | None = None, rule_index: int | None = None) -> Rejected:
    ctx.after_commit(lambda: REJECTIONS.labels(reason).inc())
    event = fw.FirewallChangeRejected(reason=reason, detail=detail[:500] if detail else None, rule_index=rule_index)
    return Rejected(reason, event, detail=detail[:500] if detail else None, rule_index=rule_index)


def _service_id(ctx: Ctx) -> str:
    return ctx.service_id or ""


async def _request_apply(ctx: Ctx, service_id: str, reason: Any) -> None:
    await ctx.emit(fw.FirewallApplyRequested(reason=reason), service_id=service_id)


# ------------------------------------------------------------ projections


async def service_provisioned(evt: platform.ServiceProvisioned, ctx: Ctx) -> None:
    ssh = evt.ssh
    before = await store.lock_service(ctx.db, evt.service_id)
    if before is None:
        # A new service: the firewall is on, with its software's defaults, at once.
        entry = ctx.deps.catalog.defaults(evt.software)
        await store.insert_service(
            ctx.db, evt.service_id, evt.software, ssh.host, ssh.port, ssh.host_key, entry.rules, ctx.now()
        )
        await ctx.emit(
            fw.FirewallEnabled(version=1, rule_count=len(entry.rules), software=entry.software),
            service_id=evt.service_id,
        )
        await ctx.audit(
            "ServiceProvisioned",
            "accepted",
            service_id=evt.service_id,
            detail={"software": evt.software, "defaults": entry.software, "rule_count": len(entry.rules)},
        )
        await _request_apply(ctx, evt.service_id, "provisioned")
        return
    await store.update_identity(ctx.db, evt.service_id, evt.software, ssh.host, ssh.port, ssh.host_key, ctx.now())
    if (before.ssh_host, before.ssh_port, before.host_key) != (ssh.host, ssh.port, ssh.host_key):
        # A re-provisioned VM (new identity) must get the service's ruleset again.
        await store.mark_pending(ctx.db, evt.service_id, ctx.now())
        await _request_apply(ctx, evt.service_id, "reprovisioned")


async def service_deprovisioned(evt: platform.ServiceDeprovisioned, ctx: Ctx) -> None:
    await store.delete_service(ctx.db, evt.service_id)


async def domain_accepted(evt: tls.DomainAccepted, ctx: Ctx) -> None:
    if not ctx.service_id:
        raise PermanentError("tls.DomainAccepted without a service_id in its envelope")
    await store.add_domain(ctx.db, ctx.service_id, evt.domain, ctx.now())


async def domain_released(evt: tls.DomainReleased, ctx: Ctx) -> None:
    if not ctx.service_id:
        raise PermanentError("tls.DomainReleased without a service_id in its envelope")
    await store.remove_domain(ctx.db, ctx.service_id, evt.domain)


# ------------------------------------------------------------ changes of the rule set


async def _locked(ctx: Ctx) -> store.Service:
    service = await store.lock_service(ctx.db, _service_id(ctx))
    if service is None:
        raise _reject(ctx, "unknown_service")
    return service


async def rules_replace(cmd: fw.FirewallRulesReplaceRequested, ctx: Ctx) -> None:
    service = await _locked(ctx)
    if cmd.expected_version != service.version:
        detail = f"the rule set is at version {service.version}, the request edited version {cmd.expected_version}"
        raise _reject(ctx, "version_conflict", detail)
    if not service.enabled:
        raise _reject(ctx, "firewall_disabled", "enable the firewall first (it starts from the defaults)")
    tls_domains = await store.count_domains(ctx.db, service.service_id)
    was_open = domain.port_80_open(service.enabled, service.rules)
    try:
        decision = domain.judge_rule_set(
            [r.model_dump() for r in cmd.rules],
            automation_sources=ctx.deps.automation_sources,
            port_80_was_open=was_open,
            tls_domains=tls_domains,
            acknowledge_tls_impact=cmd.acknowledge_tls_impact,
            max_rules=ctx.deps.settings.max_rules,
        )
    except domain.RuleSetRefused as refused:
        raise _reject(ctx, refused.reason, refused.detail, refused.rule_index) from None
    version = await store.set_rules(ctx.db, service.service_id, True, decision.rules, ctx.now())
    now_open = domain.port_80_open(True, decision.rules)
    ctx.audit_detail.update(
        version=version,
        rule_count=len(decision.rules),
        merged=decision.merged,
        port_80_open=now_open,
        # Only reachable with the acknowledgement: the guard refuses it otherwise.
        tls_impact_acknowledged=tls_domains > 0 and was_open and not now_open,
    )
    await ctx.emit(fw.FirewallRulesReplaced(version=version, rule_count=len(decision.rules), merged=decision.merged))
    await _request_apply(ctx, service.service_id, "changed")


async def enable(cmd: fw.FirewallEnableRequested, ctx: Ctx) -> None:
    service = await _locked(ctx)
    entry = ctx.deps.catalog.defaults(service.software)
    tls_domains = await store.count_domains(ctx.db, service.service_id)
    try:
        domain.check_guards(
            entry.rules,
            automation_sources=ctx.deps.automation_sources,
            port_80_was_open=domain.port_80_open(service.enabled, service.rules),
            tls_domains=tls_domains,
            acknowledge_tls_impact=cmd.acknowledge_tls_impact,
        )
    except domain.RuleSetRefused as refused:
        raise _reject(ctx, refused.reason, refused.detail) from None
    version = await store.set_rules(ctx.db, service.service_id, True, entry.rules, ctx.now())
    ctx.audit_detail.update(version=version, rule_count=len(entry.rules), defaults=entry.software)
    await ctx.emit(fw.FirewallEnabled(version=version, rule_count=len(entry.rules), software=entry.software))
    await _request_apply(ctx, service.service_id, "changed")


async def disable(cmd: fw.FirewallDisableRequested, ctx: Ctx) -> None:
    service = await _locked(ctx)
    version = await store.set_rules(ctx.db, service.service_id, False, (), ctx.now())
    # The seed warns: "Disable firewall will delete existing rules".
    ctx.audit_detail.update(version=version, rules_deleted=len(service.rules))
    await ctx.emit(fw.FirewallDisabled(version=version))
    await _request_apply(ctx, service.service_id, "changed")


# ------------------------------------------------------------ putting a ruleset in force


async def read_table(host: Host) -> dict[str, Any] | None:
    """`nft -j list table inet palisade`, or None when the table does not exist."""
    result = await host.run(
        host.layout.nft("-j", "list", "table", "inet", "palisade"), check=False, operation="nft_list"
    )
    if result.exit_status != 0:
        if b"No such file or directory" in result.stderr:
            return None
        raise CommandFailed(
            f"{host.identity}: nft list failed (exit {result.exit_status}): {result.output[-500:]}",
            host=str(host.identity),
            argv=result.argv,
            exit_status=result.exit_status,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    listing: dict[str, Any] = json.loads(result.stdout)
    return listing


async def put_in_force(host: Host, text: str, enabled: bool, rules: tuple[domain.Rule, ...]) -> str:
    """Replace the ruleset file, validate (`nft -c -f`), load it (`nft -f`), read the
    table back and compare. Returns the outcome: applied, unchanged or drift_repaired."""
    path = f"{host.layout.nftables_dir}/{RULESET_FILE}"
    result = await host.replace_file(
        path,
        text,
        mode=0o600,
        validate=host.layout.nft("-c", "-f", path),
        activate=host.layout.nft("-f", path),
    )
    try:
        domain.compare_with_kernel(await read_table(host), enabled, rules)
    except domain.UnexpectedRuleset:
        if result.changed:
            raise
        # The file was already right but the kernel is not (a rebooted VM, a hand-made
        # change): load the file again, as one transaction, and look once more.
        await host.run(host.layout.nft("-f", path), operation="nft_load")
        domain.compare_with_kernel(await read_table(host), enabled, rules)
        return "drift_repaired"
    return "applied" if result.changed else "unchanged"


async def apply_rules(cmd: fw.FirewallApplyRequested, ctx: Ctx) -> None:
    service_id = _service_id(ctx)
    await store.lock_apply(ctx.db, service_id)
    service = await store.get_service(ctx.db, service_id)
    if service is None:
        raise Rejected("unknown_service", fw.FirewallApplyFailed(reason="unknown_service"))
    text = ctx.deps.render(service.enabled, service.rules)
    digest = domain.checksum(text)
    identity = HostIdentity(service.ssh_host, service.ssh_port, service.host_key)
    started = time.perf_counter()
    try:
        outcome = await put_in_force(ctx.deps.hosts.host(identity), text, service.enabled, service.rules)
    except HostKeyMismatch as exc:
        detail = {"host": str(identity), "expected": exc.expected_fingerprint, "presented": exc.presented_fingerprint}
        await _apply_failed(ctx, service, "host_key_mismatch", str(exc), "host_key_mismatch", detail)
        return
    except (ValidationFailed, ActivationFailed) as exc:
        # The previous file is back and the kernel never left the previous ruleset.
        await _apply_failed(ctx, service, "ruleset_refused", exc.output, "refused", {"host": str(identity)})
        return
    except HostctlError as exc:
        if exc.transient:
            # Not committed: the message goes round the retry ladder; the change is already recorded.
            APPLIES.labels("retried").inc()
            APPLY_SECONDS.observe(time.perf_counter() - started)
            raise TransientError(str(exc)) from exc
        reason = {AuthenticationFailed: "authentication_failed", NegotiationFailed: "negotiation_failed"}.get(
            type(exc), "command_failed"
        )
        await _apply_failed(ctx, service, reason, str(exc), "failed", {"host": str(identity)})
        return
    except domain.UnexpectedRuleset as exc:
        await _apply_failed(ctx, service, "readback_mismatch", str(exc), "readback_mismatch", {"host": str(identity)})
        return
    elapsed = time.perf_counter() - started
    rule_count = len(service.rules) if service.enabled else 0
    open_80 = domain.port_80_open(service.enabled, service.rules)
    await store.APPLY.mark_applied(ctx.db, service_id, service.version, digest, ctx.now())
    await ctx.emit(
        fw.FirewallApplied(version=service.version, checksum=digest, rule_count=rule_count, port_80_open=open_80)
    )
    await ctx.audit(
        "FirewallApplyRequested",
        "accepted",
        detail={
            "host": str(identity),
            "version": service.version,
            "enabled": service.enabled,
            "rule_count": rule_count,
            "checksum": digest,
            "outcome": outcome,
        },
    )

    def count() -> None:
        APPLIES.labels(outcome).inc()
        APPLY_SECONDS.observe(elapsed)
        RULES.observe(rule_count)

    ctx.after_commit(count)


async def _apply_failed(
    ctx: Ctx,
    service: store.Service,
    reason: str,
    message: str,
    outcome: str,
    detail: dict[str, str | None],
) -> None:
    await store.APPLY.mark_failed(ctx.db, service.service_id, service.version, f"{reason}: {message}", ctx.now())
    await ctx.emit(fw.FirewallApplyFailed(version=service.version, reason=reason, detail=message[:500]))
    await ctx.audit(
        "FirewallApplyRequested",
        "failed",
        reason,
        detail={**detail, "version": service.version, "error": message[:500]},
    )
    ctx.after_commit(lambda: APPLIES.labels(outcome).inc())


# ------------------------------------------------------------ query


async def get_firewall(query: fw.GetFirewall, ctx: Ctx) -> Reply:
    service = await store.get_service(ctx.db, query.service_id)
    if service is None:
        raise Rejected("unknown_service")
    return fw.FirewallState(
        service_id=service.service_id,
        enabled=service.enabled,
        version=service.version,
        rules=[fw.FirewallRuleView(**r.to_json()) for r in service.rules],
        state=service.apply_state,  # type: ignore[arg-type]
        applied_version=service.applied_version,
        applied_checksum=service.applied_checksum,
        applied_at=service.applied_at,
        port_80_open=domain.port_80_open(service.enabled, service.rules),
        tls_domains=await store.count_domains(ctx.db, service.service_id),
        last_error=service.last_error,
    )


HANDLERS: dict[type[Any], Any] = {
    platform.ServiceProvisioned: service_provisioned,
    platform.ServiceDeprovisioned: service_deprovisioned,
    tls.DomainAccepted: domain_accepted,
    tls.DomainReleased: domain_released,
    fw.FirewallRulesReplaceRequested: rules_replace,
    fw.FirewallEnableRequested: enable,
    fw.FirewallDisableRequested: disable,
    fw.FirewallApplyRequested: apply_rules,
    fw.GetFirewall: get_firewall,
}


# ------------------------------------------------------------ scheduled work


async def _ask_again(ctx: Context[Any], service_id: str) -> None:
    """An apply still due long after it was asked for (reconcile_job): ask again."""
    await store.mark_pending(ctx.db, service_id, ctx.now())
    await ctx.emit(fw.FirewallApplyRequested(reason="reconcile"), service_id=service_id)


def jobs(every_seconds: float, after_seconds: float) -> tuple[Job, ...]:
    return (reconcile_job(every_seconds, after_seconds, _ask_again),)
