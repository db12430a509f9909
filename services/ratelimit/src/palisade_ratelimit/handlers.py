"""What ratelimit does with each message. The rules and rendering are in `domain`, the SQL in `store`.

Two steps, two transactions, as in sshkeys. A policy change (`RateLimitConfigured`,
`OutputCacheConfigured`, or a new service's defaults) is recorded in its own short
transaction, which also emits `WebPolicyApplyRequested` to this worker through the
outbox. The apply is the handler of that request: under a per-service advisory lock
(applies to one VM never interleave, across replicas too, while policy changes, which
lock the service row, never wait for SSH) it renders the policy committed at that
moment and installs it with hostctl:

1. the http-level file, replaced atomically and checked with `nginx -t` (refused:
   the previous file is back, nothing reloaded);
2. the per-server snippet, the same, then `nginx -s reload` when either file changed.

The http-level file declares every name any snippet uses, so the VM is consistent
between the two steps and if the second fails. A configuration nginx refuses leaves
the previous one serving and ends in `WebPolicyApplyFailed {reason: nginx_refused}`.
An unreachable VM raises `TransientError`: the apply goes round the retry ladder and,
when it runs out, the `reconcile` job asks again; the policy itself stays recorded.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass
from typing import Any

from palisade_events import Context, Job, Rejected, Reply, TransientError
from palisade_events.contract import platform
from palisade_events.contract import ratelimit as rl
from palisade_events.vm_apply import reconcile_job
from palisade_hostctl import (
    AuthenticationFailed,
    CommandFailed,
    Host,
    HostctlError,
    HostIdentity,
    HostKeyMismatch,
    Layout,
    NegotiationFailed,
    ValidationFailed,
    real_vm_layout,
)

from . import domain, store
from .deps import Deps
from .metrics import APPLIES, APPLY_SECONDS

Ctx = Context[Deps]


def _service_id(ctx: Ctx) -> str:
    return ctx.service_id or ""


def _settings_of(policy: domain.WebPolicy) -> tuple[rl.RateLimitSettings, rl.OutputCacheSettings]:
    rate, cache = policy.rate_limit, policy.output_cache
    return (
        rl.RateLimitSettings(requests=rate.requests, per=rate.per, enabled=rate.enabled),
        rl.OutputCacheSettings(ttl_seconds=cache.ttl_seconds, enabled=cache.enabled),
    )


def _identity(service: store.Service) -> HostIdentity:
    return HostIdentity(service.ssh_host, service.ssh_port, service.host_key)


def _layout(deps: Deps, identity: HostIdentity) -> Layout:
    """The VM's layout; a real VM's when the pool does not know the host (a test VM gone)."""
    try:
        return deps.hosts.host(identity).layout
    except LookupError:
        return real_vm_layout(identity)


def render_for(deps: Deps, service: store.Service, layout: Layout) -> domain.RenderedConfig:
    site = domain.site_for(
        service.service_id,
        layout,
        upstream=deps.settings.upstream,
        ipv6=service.has_ipv6,
        cache_max_size=deps.settings.cache_max_size,
    )
    return domain.render(service.policy, site, deps.cloudflare)


async def _request_apply(ctx: Ctx, service_id: str, reason: Any) -> None:
    await store.mark_pending(ctx.db, service_id, ctx.now())
    await ctx.emit(rl.WebPolicyApplyRequested(reason=reason), service_id=service_id)


# ------------------------------------------------------------ projections


async def service_provisioned(evt: platform.ServiceProvisioned, ctx: Ctx) -> None:
    ssh = evt.ssh
    before = await store.upsert_service(
        ctx.db, evt.service_id, ssh.host, ssh.port, ssh.host_key, evt.ipv6 is not None, ctx.now()
    )
    if before is None:
        # A new service: the defaults (150/minute, cache 3 s) go to its VM at once.
        service = await store.get_service(ctx.db, evt.service_id)
        assert service is not None
        rate, cache = _settings_of(service.policy)
        updated = rl.WebPolicyUpdated(version=service.policy_version, rate_limit=rate, output_cache=cache, changed=True)
        await ctx.emit(updated, service_id=evt.service_id)
        await _request_apply(ctx, evt.service_id, "provisioned")
        return
    moved = (before.ssh_host, before.ssh_port, before.host_key, before.has_ipv6) != (
        ssh.host,
        ssh.port,
        ssh.host_key,
        evt.ipv6 is not None,
    )
    if moved:
        # A re-provisioned VM (new identity) must get the service's policy again.
        await _request_apply(ctx, evt.service_id, "reprovisioned")


async def service_deprovisioned(evt: platform.ServiceDeprovisioned, ctx: Ctx) -> None:
    await store.delete_service(ctx.db, evt.service_id)


# ------------------------------------------------------------ policy changes


async def _change_policy(ctx: Ctx, change: Any) -> None:
    service_id = _service_id(ctx)
    service = await store.lock_service(ctx.db, service_id)
    if service is None:
        raise Rejected("unknown_service", rl.WebPolicyRejected(reason="unknown_service"))
    policy = change(service.policy)
    version = await store.set_policy(ctx.db, service_id, policy, ctx.now())
    rate, cache = _settings_of(policy)
    changed = version != service.policy_version
    ctx.audit_detail.update(version=version, changed=changed)
    await ctx.emit(rl.WebPolicyUpdated(version=version, rate_limit=rate, output_cache=cache, changed=changed))
    # Asked for even when nothing changed: the apply converges the VM (and answers the caller).
    await _request_apply(ctx, service_id, "policy_changed")


async def rate_limit_configured(cmd: rl.RateLimitConfigured, ctx: Ctx) -> None:
    ctx.audit_detail.update(requests=cmd.requests, per=cmd.per, enabled=cmd.enabled)
    rate = domain.RateLimit(cmd.requests, cmd.per, cmd.enabled)
    await _change_policy(ctx, lambda p: domain.WebPolicy(rate, p.output_cache))


async def output_cache_configured(cmd: rl.OutputCacheConfigured, ctx: Ctx) -> None:
    ctx.audit_detail.update(ttl_seconds=cmd.ttl_seconds, enabled=cmd.enabled)
    cache = domain.OutputCache(cmd.ttl_seconds, cmd.enabled)
    await _change_policy(ctx, lambda p: domain.WebPolicy(p.rate_limit, cache))


# ------------------------------------------------------------ the apply to the VM


@dataclass(frozen=True)
class Installed:
    changed: bool


async def install(host: Host, config: domain.RenderedConfig) -> Installed:
    """Put both files on the VM, each validated by `nginx -t` before the next step (a
    refused file is put back by hostctl), and reload nginx once if anything changed."""
    layout = host.layout
    test, reload = layout.nginx("-t"), layout.nginx("-s", "reload")
    # nginx creates the cache directory itself (owned by its workers) but not its parents.
    await host.run(["mkdir", "-p", "--", posixpath.dirname(layout.path(domain.CACHE_DIR))], operation="mkdir_cache")
    http = await host.replace_file(config_path(layout, "http"), config.http_conf, mode=0o644, validate=test)
    snippet = await host.replace_file(
        config_path(layout, "snippet"), config.server_snippet, mode=0o644, validate=test, activate=reload
    )
    if http.changed and not snippet.changed:
        await host.run(reload, operation="activate")
    return Installed(changed=http.changed or snippet.changed)


def config_path(layout: Layout, which: str) -> str:
    return layout.path(rl.NGINX_HTTP_CONF if which == "http" else rl.NGINX_SERVER_SNIPPET)


async def apply_policy(cmd: rl.WebPolicyApplyRequested, ctx: Ctx) -> None:
    service_id = _service_id(ctx)
    await store.lock_apply(ctx.db, service_id)
    service = await store.get_service(ctx.db, service_id)
    if service is None:
        raise Rejected("unknown_service", rl.WebPolicyApplyFailed(reason="unknown_service"))
    identity = _identity(service)
    host = ctx.deps.hosts.host(identity)
    config = render_for(ctx.deps, service, host.layout)
    digest = config.checksum
    started = time.perf_counter()
    try:
        installed = await install(host, config)
    except HostKeyMismatch as exc:
        detail = {"host": str(identity), "expected": exc.expected_fingerprint, "presented": exc.presented_fingerprint}
        await _apply_failed(ctx, service, "host_key_mismatch", str(exc), "host_key_mismatch", detail)
        return
    except ValidationFailed as exc:
        # nginx -t refused it: the previous file is back and nginx was not reloaded.
        message = f"{exc}: {exc.output}"
        await _apply_failed(ctx, service, "nginx_refused", message, "nginx_refused", {"host": str(identity)})
        return
    except HostctlError as exc:
        if exc.transient:
            # Not committed: the message goes round the retry ladder; the policy is already recorded.
            APPLIES.labels("retried").inc()
            APPLY_SECONDS.observe(time.perf_counter() - started)
            raise TransientError(str(exc)) from exc
        reason = {AuthenticationFailed: "authentication_failed", NegotiationFailed: "negotiation_failed"}.get(
            type(exc), "command_failed"
        )
        message = f"{exc}: {exc.output}" if isinstance(exc, CommandFailed) else str(exc)
        await _apply_failed(ctx, service, reason, message, "failed", {"host": str(identity)})
        return
    elapsed = time.perf_counter() - started
    await store.APPLY.mark_applied(ctx.db, service_id, service.policy_version, digest, ctx.now())
    await ctx.emit(rl.WebPolicyApplied(version=service.policy_version, checksum=digest, changed=installed.changed))
    await ctx.audit(
        "WebPolicyApplyRequested",
        "accepted",
        detail={
            "host": str(identity),
            "version": service.policy_version,
            "checksum": digest,
            "changed": installed.changed,
        },
    )
    outcome = "applied" if installed.changed else "unchanged"

    def count() -> None:
        APPLIES.labels(outcome).inc()
        APPLY_SECONDS.observe(elapsed)

    ctx.after_commit(count)


async def _apply_failed(
    ctx: Ctx,
    service: store.Service,
    reason: str,
    message: str,
    outcome: str,
    detail: dict[str, str | None],
) -> None:
    await store.APPLY.mark_failed(ctx.db, service.service_id, service.policy_version, f"{reason}: {message}", ctx.now())
    await ctx.emit(rl.WebPolicyApplyFailed(reason=reason, detail=message[:500]))
    await ctx.audit("WebPolicyApplyRequested", "failed", reason, detail={**detail, "error": message[:500]})
    ctx.after_commit(lambda: APPLIES.labels(outcome).inc())


# ------------------------------------------------------------ query


async def get_web_policy(query: rl.GetWebPolicy, ctx: Ctx) -> Reply:
    service = await store.get_service(ctx.db, query.service_id)
    if service is None:
        raise Rejected("unknown_service")
    layout = _layout(ctx.deps, _identity(service))
    config = render_for(ctx.deps, service, layout)
    rate, cache = _settings_of(service.policy)
    return rl.WebPolicyDetails(
        service_id=service.service_id,
        rate_limit=rate,
        output_cache=cache,
        burst=service.policy.rate_limit.burst,
        retry_after_seconds=service.policy.rate_limit.retry_after_seconds,
        version=service.policy_version,
        state=service.apply_state,  # type: ignore[arg-type]
        applied_checksum=service.applied_checksum,
        last_error=service.last_error,
        checksum=config.checksum,
        files=[
            rl.NginxFile(path=config_path(layout, "http"), content=config.http_conf),
            rl.NginxFile(path=config_path(layout, "snippet"), content=config.server_snippet),
        ],
    )


HANDLERS: dict[type[Any], Any] = {
    platform.ServiceProvisioned: service_provisioned,
    platform.ServiceDeprovisioned: service_deprovisioned,
    rl.RateLimitConfigured: rate_limit_configured,
    rl.OutputCacheConfigured: output_cache_configured,
    rl.WebPolicyApplyRequested: apply_policy,
    rl.GetWebPolicy: get_web_policy,
}


# ------------------------------------------------------------ scheduled work


async def _ask_again(ctx: Context[Any], service_id: str) -> None:
    """An apply still due long after it was asked for (reconcile_job): ask again."""
    await store.mark_pending(ctx.db, service_id, ctx.now())
    await ctx.emit(rl.WebPolicyApplyRequested(reason="reconcile"), service_id=service_id)


def jobs(every_seconds: float, after_seconds: float) -> tuple[Job, ...]:
    return (reconcile_job(every_seconds, after_seconds, _ask_again),)
