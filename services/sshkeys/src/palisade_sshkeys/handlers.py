"""What sshkeys does with each message. The rules are in `domain`, the SQL in `store`.

Two steps, two transactions. A key change (`SshKeyAdded`, `SshKeyRemoved`) is
decided and recorded in its own short transaction, which also emits
`SshKeysApplyRequested` to this worker through the outbox. The write to the VM is
the handler of that request: it takes a per-service advisory lock (writes to one
VM never interleave, across replicas too, while key changes, which lock the
service row, never wait for SSH), renders the file from the keys committed at that
moment, writes it over SSH, reads it back, and records the outcome.

So a key is never lost because its VM is unreachable: an unreachable VM makes the
apply raise `TransientError` and the runtime retries it (1 s, 10 s, 60 s); only
the apply is retried, the key stays recorded. If the ladder runs out the message is
parked (with a `failed` audit record) and the `reconcile` job asks again later. A
host key mismatch, a refused automation key or a failed write are not retried:
`SshKeysApplyFailed` + a `failed` audit record, and the VM keeps its previous file.

The apply's transaction stays open during the SSH calls (the runtime runs a
handler inside its message's transaction); it holds one pooled database
connection and the advisory lock, nothing other handlers wait on.
"""

from __future__ import annotations

import time
from typing import Any

from palisade_events import Context, Event, Job, Rejected, Reply, TransientError
from palisade_events.contract import platform
from palisade_events.contract import sshkeys as sk
from palisade_events.vm_apply import reconcile_job
from palisade_hostctl import (
    AuthenticationFailed,
    Host,
    HostctlError,
    HostIdentity,
    HostKeyMismatch,
    NegotiationFailed,
    ReplaceResult,
)

from . import domain, store
from .deps import Deps
from .metrics import APPLIES, APPLY_SECONDS, REJECTIONS

Ctx = Context[Deps]


def _reject(ctx: Ctx, reason: str, event: Event, **detail: str | None) -> Rejected:
    ctx.after_commit(lambda: REJECTIONS.labels(reason).inc())
    return Rejected(reason, event, **detail)


def _service_id(ctx: Ctx) -> str:
    return ctx.service_id or ""


async def _request_apply(ctx: Ctx, service_id: str, reason: Any, *, changed: bool) -> None:
    await store.mark_pending(ctx.db, service_id, ctx.now(), changed=changed)
    await ctx.emit(sk.SshKeysApplyRequested(reason=reason), service_id=service_id)


# ------------------------------------------------------------ projections


async def service_provisioned(evt: platform.ServiceProvisioned, ctx: Ctx) -> None:
    ssh = evt.ssh
    before = await store.upsert_service(ctx.db, evt.service_id, ssh.host, ssh.port, ssh.host_key, ctx.now())
    moved = before is not None and (before.ssh_host, before.ssh_port, before.host_key) != (
        ssh.host,
        ssh.port,
        ssh.host_key,
    )
    if moved and await store.keys(ctx.db, evt.service_id):
        # A re-provisioned VM (new identity) must get the service's keys again.
        await _request_apply(ctx, evt.service_id, "reprovisioned", changed=False)


async def service_deprovisioned(evt: platform.ServiceDeprovisioned, ctx: Ctx) -> None:
    await store.delete_service(ctx.db, evt.service_id)


# ------------------------------------------------------------ key changes


async def key_added(cmd: sk.SshKeyAdded, ctx: Ctx) -> None:
    service_id = _service_id(ctx)
    if await store.lock_service(ctx.db, service_id) is None:
        raise _reject(ctx, "unknown_service", sk.SshKeyRejected(reason="unknown_service"))
    existing = {k.fingerprint for k in await store.keys(ctx.db, service_id)}
    try:
        key, title = domain.accept_key(
            cmd.title,
            cmd.public_key,
            existing=existing,
            automation_fingerprint=ctx.deps.automation_fingerprint,
            max_keys=ctx.deps.settings.max_keys_per_service,
        )
    except domain.KeyRefused as refused:
        event = sk.SshKeyRejected(reason=refused.reason, fingerprint=refused.fingerprint)
        raise _reject(ctx, refused.reason, event, fingerprint=refused.fingerprint) from None
    await store.add_key(ctx.db, service_id, key, title, ctx.now())
    ctx.audit_detail.update(fingerprint=key.fingerprint, algorithm=key.algorithm, bits=key.bits)
    await ctx.emit(sk.SshKeyAccepted(fingerprint=key.fingerprint, title=title, algorithm=key.algorithm, bits=key.bits))
    await _request_apply(ctx, service_id, "keys_changed", changed=True)


async def key_removed(cmd: sk.SshKeyRemoved, ctx: Ctx) -> None:
    service_id = _service_id(ctx)
    if await store.lock_service(ctx.db, service_id) is None:
        event = sk.SshKeyRemovalRejected(reason="unknown_service", fingerprint=cmd.fingerprint)
        raise _reject(ctx, "unknown_service", event)
    # The contract takes any text here, so that a mistyped fingerprint gets this answer.
    if not domain.is_fingerprint(cmd.fingerprint) or not await store.remove_key(ctx.db, service_id, cmd.fingerprint):
        event = sk.SshKeyRemovalRejected(reason="unknown_fingerprint", fingerprint=cmd.fingerprint)
        raise _reject(ctx, "unknown_fingerprint", event, fingerprint=cmd.fingerprint[:100])
    ctx.audit_detail.update(fingerprint=cmd.fingerprint)
    await ctx.emit(sk.SshKeyRemovalAccepted(fingerprint=cmd.fingerprint))
    await _request_apply(ctx, service_id, "keys_changed", changed=True)


# ------------------------------------------------------------ the write to the VM


class ReadbackMismatch(Exception):  # noqa: N818 - named for what happened
    pass


async def write_authorized_keys(host: Host, content: bytes) -> ReplaceResult:
    """Replace root's authorized_keys atomically (0600), then read it back and compare."""
    path = host.layout.authorized_keys
    result = await host.replace_file(path, content, mode=0o600)
    back = await host.read_file(path)
    if back != content:
        raise ReadbackMismatch(f"{path} on {host.identity} does not hold what was written")
    stat = await host.stat(path)
    if stat is None or stat.mode != 0o600:
        raise ReadbackMismatch(f"{path} on {host.identity} has mode {oct(stat.mode) if stat else 'none'}")
    return result


async def apply_keys(cmd: sk.SshKeysApplyRequested, ctx: Ctx) -> None:
    service_id = _service_id(ctx)
    await store.lock_apply(ctx.db, service_id)
    service = await store.get_service(ctx.db, service_id)
    if service is None:
        raise Rejected("unknown_service", sk.SshKeysApplyFailed(reason="unknown_service"))
    keys = await store.keys(ctx.db, service_id)
    content = domain.render_authorized_keys(ctx.deps.automation_line, keys)
    digest = domain.checksum(content)
    try:
        identity = HostIdentity(service.ssh_host, service.ssh_port, service.host_key)
    except ValueError as exc:  # the platform announced a key asyncssh cannot read
        await _apply_failed(ctx, service, "invalid_host_key", str(exc), "failed", {"host": service.ssh_host})
        return
    started = time.perf_counter()
    try:
        result = await write_authorized_keys(ctx.deps.hosts.host(identity), content)
    except HostKeyMismatch as exc:
        detail = {"host": str(identity), "expected": exc.expected_fingerprint, "presented": exc.presented_fingerprint}
        await _apply_failed(ctx, service, "host_key_mismatch", str(exc), "host_key_mismatch", detail, started)
        return
    except HostctlError as exc:
        if exc.transient:
            # Not committed: the message goes round the retry ladder; the key change is already recorded.
            APPLIES.labels("retried").inc()
            APPLY_SECONDS.observe(time.perf_counter() - started)
            raise TransientError(str(exc)) from exc
        reason = {AuthenticationFailed: "authentication_failed", NegotiationFailed: "negotiation_failed"}.get(
            type(exc), "command_failed"
        )
        await _apply_failed(ctx, service, reason, str(exc), "failed", {"host": str(identity)}, started)
        return
    except ReadbackMismatch as exc:
        await _apply_failed(ctx, service, "readback_mismatch", str(exc), "failed", {"host": str(identity)}, started)
        return
    elapsed = time.perf_counter() - started
    await store.APPLY.mark_applied(ctx.db, service_id, service.keys_version, digest, ctx.now())
    await ctx.emit(sk.SshKeysApplied(count=len(keys), checksum=digest, changed=result.changed))
    await ctx.audit(
        "SshKeysApplyRequested",
        "accepted",
        detail={"host": str(identity), "count": len(keys), "checksum": digest, "changed": result.changed},
    )
    outcome = "applied" if result.changed else "unchanged"

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
    started: float | None = None,
) -> None:
    elapsed = None if started is None else time.perf_counter() - started
    await store.APPLY.mark_failed(ctx.db, service.service_id, service.keys_version, f"{reason}: {message}", ctx.now())
    await ctx.emit(sk.SshKeysApplyFailed(reason=reason, detail=message[:500]))
    await ctx.audit("SshKeysApplyRequested", "failed", reason, detail={**detail, "error": message[:500]})

    def count() -> None:
        APPLIES.labels(outcome).inc()
        if elapsed is not None:
            APPLY_SECONDS.observe(elapsed)

    ctx.after_commit(count)


# ------------------------------------------------------------ query


async def list_keys(query: sk.ListSshKeys, ctx: Ctx) -> Reply:
    service = await store.get_service(ctx.db, query.service_id)
    if service is None:
        raise Rejected("unknown_service")
    keys = await store.keys(ctx.db, query.service_id)
    return sk.SshKeyList(
        service_id=query.service_id,
        keys=[
            sk.SshKeyInfo(
                fingerprint=k.fingerprint, title=k.title, algorithm=k.algorithm, bits=k.bits, added_at=k.added_at
            )
            for k in keys
        ],
        automation_fingerprint=ctx.deps.automation_fingerprint,
        state=service.apply_state,  # type: ignore[arg-type]
        applied_checksum=service.applied_checksum,
        last_error=service.last_error,
    )


HANDLERS: dict[type[Any], Any] = {
    platform.ServiceProvisioned: service_provisioned,
    platform.ServiceDeprovisioned: service_deprovisioned,
    sk.SshKeyAdded: key_added,
    sk.SshKeyRemoved: key_removed,
    sk.SshKeysApplyRequested: apply_keys,
    sk.ListSshKeys: list_keys,
}


# ------------------------------------------------------------ scheduled work


async def _ask_again(ctx: Context[Any], service_id: str) -> None:
    """An apply still due long after it was asked for (reconcile_job): ask again."""
    await store.mark_pending(ctx.db, service_id, ctx.now(), changed=False)
    await ctx.emit(sk.SshKeysApplyRequested(reason="reconcile"), service_id=service_id)


def jobs(every_seconds: float, after_seconds: float) -> tuple[Job, ...]:
    return (reconcile_job(every_seconds, after_seconds, _ask_again),)
