"""What the MFA worker does with each message. The rules are in `domain`, the SQL in
`store`, the keys in `crypto`.

Two ways to say no:
- `Rejected` for refusals decided before any code is checked (wrong word, locked,
  rate-limited ...): the runtime rolls the handler's writes back, emits the rejection
  event and writes the `rejected` audit record.
- a normal return with the rejection event and audit record written by hand once a
  code *was* checked and refused, because the failed attempt must be committed: a
  rollback would erase it and make brute force free.
Queries (request/reply) never raise `Rejected` (the runtime audits only commands):
they answer with a negative reply and audit themselves.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import pyotp
import segno

from palisade_events import Context, Job, PermanentError, Rejected, Reply, WorkerRuntime
from palisade_events.contract import accounts
from palisade_events.contract import mfa as m

from . import domain, store
from .crypto import DecryptionError, Keyring, UnknownKeyError
from .domain import Account, Challenge
from .mail import Mailer, Purpose, UndeliverableError, render_code_email
from .metrics import ACCOUNTS, EMAIL_CODES, LOCKOUTS, STORED_SECRETS, VERIFICATIONS
from .settings import MfaSettings

log = logging.getLogger("palisade.mfa")


@dataclass
class Deps:
    settings: MfaSettings
    keys: Keyring
    mailer: Mailer


Ctx = Context[Deps]
Method = Literal["email", "totp", "recovery"]


@dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str | None = None
    method: Method | None = None
    counted: bool = False  # a code was compared and refused: it counts toward the lockout

    @classmethod
    def refused(cls, reason: str, *, counted: bool) -> Verdict:
        return cls(False, reason, None, counted)


def _account_id(ctx: Ctx) -> str:
    if not ctx.account_id:
        raise Rejected("account_id_missing")
    return ctx.account_id


def _message_type(ctx: Ctx) -> str:
    return ctx.envelope.type if ctx.envelope else "unknown"


# ------------------------------------------------------------ code checking (shared by every path)


def _totp_secret(ctx: Ctx, account: Account, *, pending: bool = False) -> bytes:
    key_id, blob = (
        (account.pending_key_id, account.pending_secret) if pending else (account.totp_key_id, account.totp_secret)
    )
    assert key_id is not None
    assert blob is not None
    try:
        secret = ctx.deps.keys.decrypt(key_id, blob, domain.totp_aad(account.account_id))
    except (UnknownKeyError, DecryptionError) as exc:
        # A configuration fault (a key removed too early) or tampering: loud, parked, audited.
        raise PermanentError(f"TOTP secret of {account.account_id} unreadable: {exc}") from None
    return domain.totp_key(secret.decode("ascii"))


async def _check_totp_or_recovery(ctx: Ctx, account: Account, code: str) -> Verdict:
    """TOTP mode: a code from the app (6 digits), or a recovery code."""
    if domain.is_six_digits(code):
        check = domain.verify_totp(_totp_secret(ctx, account), code, ctx.now(), last_used_step=account.totp_last_step)
        if not check.valid:
            return Verdict.refused(check.reason or "invalid_code", counted=True)
        assert check.step is not None
        await store.set_totp_last_step(ctx.db, account.account_id, check.step, ctx.now())
        return Verdict(True, method="totp")
    normalized = domain.normalize_recovery_code(code)
    if normalized is None:
        return Verdict.refused("invalid_code", counted=True)
    message = domain.recovery_code_message(account.account_id, normalized)
    match: int | None = None
    # Compare against every unused code (no early exit), each with its own key id.
    for row in await store.unused_recovery_codes(ctx.db, account.account_id):
        if ctx.deps.keys.matches(row["code_key_id"], row["code_hash"], message) and match is None:
            match = row["id"]
    if match is None:
        return Verdict.refused("invalid_code", counted=True)
    await store.use_recovery_code(ctx.db, match, ctx.now())
    remaining = await store.count_unused_recovery_codes(ctx.db, account.account_id)
    await ctx.emit(m.RecoveryCodeUsed(remaining=remaining), account_id=account.account_id)
    return Verdict(True, method="recovery")


def _check_email_code(
    ctx: Ctx, key_id: str | None, digest: bytes | None, message: Callable[[str], bytes], code: str
) -> Verdict:
    digits = domain.normalize_digits(code)
    if key_id is None or digest is None or digits is None or len(digits) != domain.EMAIL_CODE_DIGITS:
        return Verdict.refused("invalid_code", counted=True)
    if not ctx.deps.keys.matches(key_id, digest, message(digits)):
        return Verdict.refused("invalid_code", counted=True)
    return Verdict(True, method="email")


async def _settle(ctx: Ctx, account: Account, verdict: Verdict, *, mode: str | None = None) -> None:
    """Commit what a code check means for the account's one lockout counter, and count it
    (`mode`: the mode the code belongs to, when not the account's current one)."""
    now = ctx.now()
    before = account.lockout
    if verdict.valid:
        if before.failures or before.locked_until:
            await store.save_lockout(ctx.db, account.account_id, before.after_success(), now)
    elif verdict.counted:
        after = before.after_failure(now)
        await store.save_lockout(ctx.db, account.account_id, after, now)
        if after.just_locked(before, now):
            assert after.locked_until is not None
            await ctx.emit(
                m.MfaLocked(locked_until=after.locked_until, failures=domain.MAX_FAILURES),
                account_id=account.account_id,
            )
            await ctx.audit(
                "MfaLocked",
                "accepted",
                "too_many_failed_codes",
                account_id=account.account_id,
                detail={"locked_until": after.locked_until.isoformat(), "failures": domain.MAX_FAILURES},
            )
            ctx.after_commit(LOCKOUTS.inc)
    result = "valid" if verdict.valid else (verdict.reason or "invalid_code")
    label = mode or account.mode
    ctx.after_commit(lambda: VERIFICATIONS.labels(label, result).inc())


async def _refuse_after_check(ctx: Ctx, action: Any, reason: str) -> None:
    """A command refused after its code was checked: the failure stays committed."""
    await ctx.emit(m.MfaChangeRejected(action=action, reason=reason))
    await ctx.audit(_message_type(ctx), "rejected", reason, detail=ctx.audit_detail)


def _reject(action: Any, reason: str, **detail: str | int | bool | None) -> Rejected:
    return Rejected(reason, m.MfaChangeRejected(action=action, reason=reason), **detail)


# ------------------------------------------------------------ projections


async def account_registered(evt: accounts.AccountRegistered | accounts.AccountEmailChanged, ctx: Ctx) -> None:
    await store.set_email(ctx.db, evt.account_id, evt.email, ctx.now())


# ------------------------------------------------------------ email codes


async def _send_code(ctx: Ctx, account: Account, purpose: Purpose, code: str) -> None:
    """Email the code (inside the transaction: if sending fails, nothing is recorded and
    the message is retried with a fresh code)."""
    assert account.email is not None
    settings = ctx.deps.settings
    message = render_code_email(
        to=account.email,
        sender=settings.mfa_mail_from,
        code=code,
        purpose=purpose,
        valid_for=domain.EMAIL_CODE_TTL,
        now=ctx.now(),
        issuer=settings.mfa_issuer,
    )
    try:
        await ctx.deps.mailer.send(message)
    except UndeliverableError:
        EMAIL_CODES.labels(purpose, "undeliverable").inc()
        raise
    except Exception:
        EMAIL_CODES.labels(purpose, "failed").inc()
        raise
    ctx.after_commit(lambda: EMAIL_CODES.labels(purpose, "sent").inc())
    sent = (*domain.within(account.email_codes_sent, ctx.now(), domain.EMAIL_CODE_WINDOW), ctx.now())
    await store.record_email_code_sent(ctx.db, account.account_id, sent, ctx.now())


async def email_code_requested(_: m.MfaEmailCodeRequested, ctx: Ctx) -> None:
    account = await store.lock_account(ctx.db, _account_id(ctx), ctx.now())
    if account.mode != "email":
        raise _reject("email_code", "email_codes_not_in_use")
    refusal = domain.refuse_email_code(account, ctx.now())
    if refusal is not None:
        raise _reject("email_code", refusal[0])
    code = domain.new_email_code()
    expires_at = ctx.now() + domain.EMAIL_CODE_TTL
    hashed = ctx.deps.keys.keyed_hash(domain.action_code_message(account.account_id, code))
    await store.put_action_code(ctx.db, account.account_id, hashed, ctx.now(), expires_at)
    try:
        await _send_code(ctx, account, "account_action", code)
    except UndeliverableError:
        raise _reject("email_code", "email_rejected") from None
    await ctx.emit(m.MfaEmailCodeSent(purpose="account_action", expires_at=expires_at))


# ------------------------------------------------------------ login


async def login_challenge_requested(cmd: m.LoginChallengeRequested, ctx: Ctx) -> None:
    now = ctx.now()
    account = await store.lock_account(ctx.db, _account_id(ctx), now)
    existing = await store.get_challenge(ctx.db, cmd.login_id, lock=True)

    def reject(reason: str, retry_at: datetime | None = None) -> Rejected:
        return Rejected(reason, m.LoginChallengeRejected(login_id=cmd.login_id, reason=reason, retry_at=retry_at))

    if existing is not None and existing.account_id != account.account_id:
        raise reject("login_id_in_use")
    if existing is not None and existing.verified_at is not None:
        raise reject("code_already_used")
    if account.lockout.is_locked(now):
        raise reject("locked", account.lockout.locked_until)
    expires_at = now + domain.LOGIN_CHALLENGE_TTL
    ctx.audit_detail.update(login_id=cmd.login_id, mode=account.mode)
    if account.mode != "email":
        await store.put_challenge(ctx.db, cmd.login_id, account.account_id, account.mode, None, now, expires_at)
    else:
        refusal = domain.refuse_email_code(account, now)
        if refusal is not None:
            raise reject(*refusal)
        code = domain.new_email_code()
        hashed = ctx.deps.keys.keyed_hash(domain.login_code_message(account.account_id, cmd.login_id, code))
        await store.put_challenge(ctx.db, cmd.login_id, account.account_id, "email", hashed, now, expires_at)
        try:
            await _send_code(ctx, account, "login", code)
        except UndeliverableError:
            raise reject("email_rejected") from None
        await ctx.emit(m.MfaEmailCodeSent(purpose="login", login_id=cmd.login_id, expires_at=expires_at))
    await ctx.emit(
        m.LoginChallengeIssued(
            login_id=cmd.login_id,
            mode=account.mode,
            delivery=domain.delivery_for(account.mode),
            expires_at=expires_at,
        )
    )


async def _verify_login(ctx: Ctx, login_id: str, code: str) -> tuple[Verdict, str | None]:
    """The one verification of a login code, for the query and the command alike.
    Returns the verdict and the account it concerned (None: unknown login)."""
    now = ctx.now()
    found = await store.get_challenge(ctx.db, login_id)
    if found is None or (ctx.account_id and ctx.account_id != found.account_id):
        ctx.after_commit(lambda: VERIFICATIONS.labels("unknown", "unknown_login").inc())
        return Verdict.refused("unknown_login", counted=False), ctx.account_id
    # Account first, then challenge: the same lock order as a challenge request.
    account = await store.lock_account(ctx.db, found.account_id, now)
    challenge = await store.get_challenge(ctx.db, login_id, lock=True)
    assert challenge is not None
    verdict = await _check_login_code(ctx, account, challenge, code)
    if verdict.valid:
        await store.mark_challenge_verified(ctx.db, login_id, now)
    await _settle(ctx, account, verdict)
    return verdict, account.account_id


async def _check_login_code(ctx: Ctx, account: Account, challenge: Challenge, code: str) -> Verdict:
    reason = domain.refuse_login_code(account, challenge, ctx.now()) or (None if code.strip() else "code_required")
    if reason is not None:
        return Verdict.refused(reason, counted=False)
    if account.mode == "totp":
        return await _check_totp_or_recovery(ctx, account, code)
    return _check_email_code(
        ctx,
        challenge.code_key_id,
        challenge.code_hash,
        lambda digits: domain.login_code_message(account.account_id, challenge.login_id, digits),
        code,
    )


async def _announce_login_outcome(ctx: Ctx, login_id: str, verdict: Verdict, account_id: str | None) -> None:
    """The outcome as an event and an audit record (the query's reply says the same)."""
    await ctx.emit(
        m.LoginCodeChecked(login_id=login_id, valid=verdict.valid, reason=verdict.reason, method=verdict.method),
        account_id=account_id,
    )
    await ctx.audit(
        _message_type(ctx),
        "accepted" if verdict.valid else "rejected",
        verdict.reason,
        account_id=account_id,
        detail={"login_id": login_id, "method": verdict.method},
    )


async def verify_login_code(query: m.VerifyLoginCode, ctx: Ctx) -> Reply:
    verdict, account_id = await _verify_login(ctx, query.login_id, query.code)
    await _announce_login_outcome(ctx, query.login_id, verdict, account_id)
    return m.VerifyLoginCodeReply(valid=verdict.valid, reason=verdict.reason)


async def login_code_submitted(cmd: m.LoginCodeSubmitted, ctx: Ctx) -> None:
    verdict, account_id = await _verify_login(ctx, cmd.login_id, cmd.code)
    await _announce_login_outcome(ctx, cmd.login_id, verdict, account_id)


# ------------------------------------------------------------ TOTP setup


def _qr_svg(uri: str) -> str:
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=4, border=4, xmldecl=False)
    return out.getvalue().decode("utf-8")


async def totp_setup_requested(_: m.MfaTotpSetupRequested, ctx: Ctx) -> Reply:
    if not ctx.account_id:
        return await _setup_refused(ctx, "account_id_missing")
    now = ctx.now()
    account = await store.lock_account(ctx.db, ctx.account_id, now)
    reason = domain.refuse_totp_setup(account, now)
    if reason is not None:
        return await _setup_refused(ctx, reason)
    secret = domain.new_totp_secret()
    key_id, ciphertext = ctx.deps.keys.encrypt(secret.encode("ascii"), domain.totp_aad(account.account_id))
    expires_at = now + domain.TOTP_SETUP_TTL
    await store.set_pending_totp(ctx.db, account.account_id, key_id, ciphertext, expires_at, now)
    uri = pyotp.TOTP(secret).provisioning_uri(
        name=account.email or account.account_id, issuer_name=ctx.deps.settings.mfa_issuer
    )
    await ctx.emit(m.MfaTotpSetupStarted(expires_at=expires_at))
    await ctx.audit(_message_type(ctx), "accepted", detail={"expires_at": expires_at.isoformat()})
    return m.MfaTotpSetupReply(
        accepted=True, secret=secret, otpauth_uri=uri, qr_svg=_qr_svg(uri), expires_at=expires_at
    )


async def _setup_refused(ctx: Ctx, reason: str) -> Reply:
    await ctx.audit(_message_type(ctx), "rejected", reason)
    return m.MfaTotpSetupReply(accepted=False, reason=reason)


async def totp_confirm_requested(query: m.MfaTotpConfirmRequested, ctx: Ctx) -> Reply:
    if not ctx.account_id:
        return await _confirm_refused(ctx, "account_id_missing")
    now = ctx.now()
    account = await store.lock_account(ctx.db, ctx.account_id, now)
    reason = domain.refuse_totp_confirm(account, now) or (None if query.code.strip() else "code_required")
    if reason is not None:
        return await _confirm_refused(ctx, reason)
    check = domain.verify_totp(_totp_secret(ctx, account, pending=True), query.code, now, last_used_step=None)
    if not check.valid:
        verdict = Verdict.refused(check.reason or "invalid_code", counted=True)
        await _settle(ctx, account, verdict, mode="totp")
        return await _confirm_refused(ctx, verdict.reason or "invalid_code")
    assert check.step is not None
    await _settle(ctx, account, Verdict(True, method="totp"), mode="totp")
    await store.enable_totp(ctx.db, account.account_id, check.step, now)
    codes = domain.new_recovery_codes()
    hashes = [ctx.deps.keys.keyed_hash(domain.recovery_code_message(account.account_id, _canonical(c))) for c in codes]
    await store.replace_recovery_codes(ctx.db, account.account_id, hashes, now)
    await ctx.emit(m.MfaTotpEnabled(previous_mode=account.mode, recovery_codes=len(codes)))
    await ctx.audit(
        _message_type(ctx), "accepted", detail={"previous_mode": account.mode, "recovery_codes": len(codes)}
    )
    return m.MfaTotpConfirmReply(enabled=True, recovery_codes=codes)


def _canonical(recovery_code: str) -> str:
    normalized = domain.normalize_recovery_code(recovery_code)
    assert normalized is not None
    return normalized


async def _confirm_refused(ctx: Ctx, reason: str) -> Reply:
    await ctx.audit(_message_type(ctx), "rejected", reason)
    return m.MfaTotpConfirmReply(enabled=False, reason=reason)


# ------------------------------------------------------------ mode changes


async def _check_current_code(ctx: Ctx, account: Account, code: str) -> Verdict:
    """A current valid code of the account's own mode: authenticator or recovery code in
    TOTP mode, the emailed account-action code in email mode."""
    if account.mode == "totp":
        verdict = await _check_totp_or_recovery(ctx, account, code)
    else:
        row = await store.get_action_code(ctx.db, account.account_id)
        if row is None:
            verdict = Verdict.refused("invalid_code", counted=True)
        elif row["used_at"] is not None:
            verdict = Verdict.refused("code_already_used", counted=False)
        elif ctx.now() >= row["expires_at"]:
            verdict = Verdict.refused("code_expired", counted=False)
        else:
            verdict = _check_email_code(
                ctx,
                row["code_key_id"],
                row["code_hash"],
                lambda digits: domain.action_code_message(account.account_id, digits),
                code,
            )
            if verdict.valid:
                await store.mark_action_code_used(ctx.db, account.account_id, ctx.now())
    await _settle(ctx, account, verdict)
    return verdict


async def email_enable_requested(cmd: m.MfaEmailEnableRequested, ctx: Ctx) -> None:
    now = ctx.now()
    account = await store.lock_account(ctx.db, _account_id(ctx), now)
    reason = domain.refuse_email_enable(account, cmd.code, now)
    if reason is not None:
        raise _reject("email_enable", reason)
    ctx.audit_detail.update(previous_mode=account.mode)
    if account.mode == "totp":
        # Leaving the authenticator for email is a downgrade: prove you hold it.
        assert cmd.code is not None
        verdict = await _check_current_code(ctx, account, cmd.code)
        if not verdict.valid:
            await _refuse_after_check(ctx, "email_enable", verdict.reason or "invalid_code")
            return
    if account.mode != "email":
        await store.set_mode(ctx.db, account.account_id, "email", now)
    await ctx.emit(m.MfaEmailEnabled(previous_mode=account.mode))


async def disable_requested(cmd: m.MfaDisableRequested, ctx: Ctx) -> None:
    now = ctx.now()
    account = await store.lock_account(ctx.db, _account_id(ctx), now)
    reason = domain.refuse_disable(account, cmd.confirmation, cmd.code, now)
    if reason is not None:
        raise _reject("disable", reason)
    assert cmd.code is not None
    ctx.audit_detail.update(previous_mode=account.mode)
    verdict = await _check_current_code(ctx, account, cmd.code)
    if not verdict.valid:
        await _refuse_after_check(ctx, "disable", verdict.reason or "invalid_code")
        return
    ctx.audit_detail.update(method=verdict.method)
    await store.set_mode(ctx.db, account.account_id, "disabled", now)
    await ctx.emit(m.MfaDisabled(previous_mode=account.mode, by="user"))


async def reset_by_support(cmd: m.MfaResetBySupport, ctx: Ctx) -> None:
    now = ctx.now()
    actor = ctx.envelope.actor if ctx.envelope else None
    ctx.audit_detail.update(ticket=cmd.ticket, operator=cmd.operator)
    if actor is None or actor.kind != "support":
        raise _reject("support_reset", "support_actor_required")
    account = await store.lock_account(ctx.db, _account_id(ctx), now)
    ctx.audit_detail.update(previous_mode=account.mode, actor=actor.id)
    await store.set_mode(ctx.db, account.account_id, "disabled", now)
    # Support checked the owner's identity: a lock from someone else's guessing ends too.
    await store.save_lockout(ctx.db, account.account_id, domain.Lockout(), now)
    await ctx.emit(m.MfaDisabled(previous_mode=account.mode, by="support", ticket=cmd.ticket))


# ------------------------------------------------------------ status


async def status(_: m.MfaStatus, ctx: Ctx) -> Reply:
    account_id = _account_id(ctx)
    account = await store.get_account(ctx.db, account_id)
    if account is None:
        return m.MfaStatusReply(
            account_id=account_id, mode="email", email_known=False, recovery_codes_left=0, totp_setup_pending=False
        )
    now = ctx.now()
    return m.MfaStatusReply(
        account_id=account_id,
        mode=account.mode,
        email_known=account.email is not None,
        locked_until=account.lockout.locked_until if account.lockout.is_locked(now) else None,
        recovery_codes_left=await store.count_unused_recovery_codes(ctx.db, account_id),
        totp_setup_pending=account.pending_expires_at is not None and now < account.pending_expires_at,
    )


HANDLERS: dict[type[Any], Any] = {
    accounts.AccountRegistered: account_registered,
    accounts.AccountEmailChanged: account_registered,
    m.MfaEmailEnableRequested: email_enable_requested,
    m.MfaEmailCodeRequested: email_code_requested,
    m.MfaDisableRequested: disable_requested,
    m.MfaResetBySupport: reset_by_support,
    m.LoginChallengeRequested: login_challenge_requested,
    m.LoginCodeSubmitted: login_code_submitted,
    m.MfaTotpSetupRequested: totp_setup_requested,
    m.MfaTotpConfirmRequested: totp_confirm_requested,
    m.VerifyLoginCode: verify_login_code,
    m.MfaStatus: status,
}


# ------------------------------------------------------------ periodic jobs


async def reencrypt_secrets(rt: WorkerRuntime[Deps]) -> int:
    """Key rotation: re-encrypt TOTP secrets still under an old key with the current one.
    (Hashed codes cannot be re-keyed: they stay checkable while their old key is configured.)"""
    keys = rt.deps.keys
    async with rt.transaction() as ctx:
        rows = await store.claim_stale_ciphertexts(ctx.db, keys.current_id)
        for row in rows:
            aad = domain.totp_aad(row["account_id"])
            totp = pending = None
            if row["totp_key_id"] not in (None, keys.current_id):
                totp = keys.encrypt(keys.decrypt(row["totp_key_id"], row["totp_secret"], aad), aad)
            if row["pending_key_id"] not in (None, keys.current_id):
                pending = keys.encrypt(keys.decrypt(row["pending_key_id"], row["pending_secret"], aad), aad)
            await store.replace_ciphertexts(ctx.db, row["account_id"], totp, pending)
        if rows:
            await ctx.audit("SecretsReencrypted", "accepted", detail={"accounts": len(rows), "key_id": keys.current_id})
    return len(rows)


async def refresh_gauges(rt: WorkerRuntime[Deps]) -> int:
    async with rt.pool.acquire() as conn:
        modes = await store.accounts_by_mode(conn)
        by_key = await store.stored_secrets_by_key(conn)
    for mode, n in modes.items():
        ACCOUNTS.labels(mode).set(n)
    STORED_SECRETS.clear()
    for (kind, key_id), n in by_key.items():
        STORED_SECRETS.labels(kind, key_id).set(n)
    return 0


async def prune_challenges(rt: WorkerRuntime[Deps]) -> int:
    """Login challenges a day past their expiry are of no use to anyone."""
    async with rt.pool.acquire() as conn:
        await store.prune_challenges(conn, rt.clock.now() - domain.PRUNE_AFTER)
    return 0


JOBS = (
    Job("reencrypt-secrets", 300.0, reencrypt_secrets),
    Job("refresh-gauges", 30.0, refresh_gauges),
    Job("prune-challenges", 3600.0, prune_challenges),
)

__all__ = ["HANDLERS", "JOBS", "Deps"]
