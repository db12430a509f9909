"""The MFA rules, pure: code generation and checking, TOTP steps, lockout and
rate-limit arithmetic, recovery codes. No I/O; time is always an argument.

Comparisons of anything secret go through `hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

Mode = Literal["disabled", "email", "totp"]

EMAIL_CODE_DIGITS = 6
EMAIL_CODE_TTL = timedelta(minutes=10)
LOGIN_CHALLENGE_TTL = timedelta(minutes=10)
TOTP_SETUP_TTL = timedelta(minutes=10)
PRUNE_AFTER = timedelta(days=1)  # login challenges are forgotten this long after expiry

# Brute force: this many failed codes inside the window lock verification for LOCK_DURATION.
MAX_FAILURES = 5
FAILURE_WINDOW = timedelta(minutes=15)
LOCK_DURATION = timedelta(minutes=15)

# Email codes an account may ask for inside the window (login and account-action codes together).
MAX_EMAIL_CODES = 5
EMAIL_CODE_WINDOW = timedelta(minutes=15)

TOTP_STEP_SECONDS = 30
TOTP_DIGITS = 6
TOTP_WINDOW = 1  # steps accepted either side of the current one (clock drift, typing time)
TOTP_SECRET_BYTES = 20  # 160 bits, as RFC 4226 recommends

RECOVERY_CODE_COUNT = 10
# Crockford's base32 alphabet: no I, L, O, U, so nothing to confuse when typed from paper.
RECOVERY_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
RECOVERY_GROUP = 5  # two groups of five: 50 bits per code
CONFIRMATION_WORD = "disable"


# ------------------------------------------------------------------ email codes


def new_email_code() -> str:
    """Six decimal digits, uniformly from the OS's CSPRNG (leading zeros kept)."""
    return f"{secrets.randbelow(10**EMAIL_CODE_DIGITS):0{EMAIL_CODE_DIGITS}d}"


def normalize_digits(code: str) -> str | None:
    """The code as digits without the spaces or dashes people type; None if not digits."""
    cleaned = "".join(ch for ch in code if ch not in " -\t")
    if not cleaned.isascii() or not cleaned.isdigit():
        return None
    return cleaned


def is_six_digits(code: str) -> bool:
    digits = normalize_digits(code)
    return digits is not None and len(digits) == EMAIL_CODE_DIGITS


# ------------------------------------------------------------------ TOTP (RFC 6238 over RFC 4226)


def new_totp_secret() -> str:
    """A fresh 160-bit secret, base32 without padding (what authenticator apps take)."""
    return base64.b32encode(secrets.token_bytes(TOTP_SECRET_BYTES)).decode("ascii").rstrip("=")


def totp_key(secret_b32: str) -> bytes:
    """The HMAC key of a base32 secret (case and padding forgiven)."""
    s = secret_b32.strip().replace(" ", "").upper()
    return base64.b32decode(s + "=" * (-len(s) % 8))


def hotp(key: bytes, counter: int, *, digits: int = TOTP_DIGITS, digest: str = "sha1") -> str:
    """RFC 4226: HMAC of the 8-byte counter, dynamic truncation, `digits` decimal digits."""
    mac = hmac.new(key, struct.pack(">Q", counter), digest).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{value % 10**digits:0{digits}d}"


def totp_step(now: datetime, *, step_seconds: int = TOTP_STEP_SECONDS) -> int:
    """The RFC 6238 time step (T0 = Unix epoch) of an aware datetime."""
    return int(now.timestamp()) // step_seconds


@dataclass(frozen=True)
class TotpCheck:
    valid: bool
    step: int | None = None  # the matched step, also when it was refused as already used
    reason: Literal["invalid_code", "code_already_used"] | None = None


def verify_totp(
    key: bytes,
    code: str,
    now: datetime,
    *,
    last_used_step: int | None,
    digits: int = TOTP_DIGITS,
    window: int = TOTP_WINDOW,
    digest: str = "sha1",
    step_seconds: int = TOTP_STEP_SECONDS,
) -> TotpCheck:
    """Accept the code of the current step or one within `window` steps of it, but only
    a step later than the last one accepted: a code is never accepted twice, and a code
    older than one already used is refused too (RFC 6238 section 5.2)."""
    typed = normalize_digits(code)
    if typed is None or len(typed) != digits:
        return TotpCheck(False, reason="invalid_code")
    current = totp_step(now, step_seconds=step_seconds)
    matched: int | None = None
    # Every candidate is computed and compared, so the time taken does not say which matched.
    for step in range(max(0, current - window), current + window + 1):
        if hmac.compare_digest(hotp(key, step, digits=digits, digest=digest), typed) and matched is None:
            matched = step
    if matched is None:
        return TotpCheck(False, reason="invalid_code")
    if last_used_step is not None and matched <= last_used_step:
        return TotpCheck(False, step=matched, reason="code_already_used")
    return TotpCheck(True, step=matched)


# ------------------------------------------------------------------ recovery codes


def new_recovery_codes(count: int = RECOVERY_CODE_COUNT) -> list[str]:
    """`count` distinct codes like `7KX2M-QD9TA`, from the OS's CSPRNG."""
    codes: set[str] = set()
    while len(codes) < count:
        raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(2 * RECOVERY_GROUP))
        codes.add(f"{raw[:RECOVERY_GROUP]}-{raw[RECOVERY_GROUP:]}")
    return sorted(codes)


def normalize_recovery_code(code: str) -> str | None:
    """The canonical form (upper case, no separators) of something typed, or None when it
    cannot be a recovery code."""
    cleaned = "".join(ch for ch in code if ch not in " -\t").upper()
    if len(cleaned) != 2 * RECOVERY_GROUP or any(ch not in RECOVERY_ALPHABET for ch in cleaned):
        return None
    return cleaned


# ------------------------------------------------------------------ lockout and rate limits


def within(times: Sequence[datetime], now: datetime, window: timedelta) -> tuple[datetime, ...]:
    """The times inside the window that ends now (older ones no longer count)."""
    return tuple(t for t in times if now - window < t <= now)


@dataclass(frozen=True)
class Lockout:
    """Failed codes of one account, whatever the mode or the path they came through
    (login, TOTP confirmation, disable, downgrade): one counter, one lock."""

    failures: tuple[datetime, ...] = ()
    locked_until: datetime | None = None

    def is_locked(self, now: datetime) -> bool:
        return self.locked_until is not None and now < self.locked_until

    def after_failure(self, now: datetime) -> Lockout:
        """The state after one more failed code; locks at MAX_FAILURES inside FAILURE_WINDOW."""
        failures = (*within(self.failures, now, FAILURE_WINDOW), now)
        if len(failures) >= MAX_FAILURES:
            return Lockout(failures=(), locked_until=now + LOCK_DURATION)
        return Lockout(failures=failures, locked_until=self.locked_until if self.is_locked(now) else None)

    def after_success(self) -> Lockout:
        return Lockout()

    def just_locked(self, before: Lockout, now: datetime) -> bool:
        return self.is_locked(now) and not before.is_locked(now)


@dataclass(frozen=True)
class SendAllowance:
    allowed: bool
    retry_at: datetime | None = None


def email_code_allowance(sent: Sequence[datetime], now: datetime) -> SendAllowance:
    """At most MAX_EMAIL_CODES codes per account in any EMAIL_CODE_WINDOW."""
    recent = sorted(within(sent, now, EMAIL_CODE_WINDOW))
    if len(recent) < MAX_EMAIL_CODES:
        return SendAllowance(True)
    # The window frees a slot when the oldest of the last MAX_EMAIL_CODES leaves it.
    return SendAllowance(False, retry_at=recent[-MAX_EMAIL_CODES] + EMAIL_CODE_WINDOW)


# ------------------------------------------------------------------ the account and its rules


@dataclass(frozen=True)
class Account:
    account_id: str
    mode: Mode
    email: str | None
    totp_key_id: str | None = None
    totp_secret: bytes | None = None  # ciphertext
    totp_last_step: int | None = None
    pending_key_id: str | None = None
    pending_secret: bytes | None = None  # ciphertext
    pending_expires_at: datetime | None = None
    lockout: Lockout = field(default_factory=Lockout)
    email_codes_sent: tuple[datetime, ...] = ()

    def with_lockout(self, lockout: Lockout) -> Account:
        return replace(self, lockout=lockout)


def refuse_totp_setup(account: Account, now: datetime) -> str | None:
    if account.lockout.is_locked(now):
        return "locked"
    if account.mode == "totp":
        # Replacing a working authenticator without proving it is a takeover path: disable first.
        return "totp_already_enabled"
    return None


def refuse_totp_confirm(account: Account, now: datetime) -> str | None:
    if account.lockout.is_locked(now):
        return "locked"
    if account.mode == "totp":
        return "totp_already_enabled"
    if account.pending_secret is None or account.pending_expires_at is None:
        return "no_totp_setup_pending"
    if now >= account.pending_expires_at:
        return "totp_setup_expired"
    return None


def refuse_disable(account: Account, confirmation: str, code: str | None, now: datetime) -> str | None:
    """Form checks before any code is looked at (these do not count as failed codes)."""
    if account.mode == "disabled":
        return "mfa_not_enabled"
    if confirmation == "":
        return "confirmation_required"
    if confirmation != CONFIRMATION_WORD:  # exactly: no trimming, no case folding
        return "confirmation_mismatch"
    if not code:
        return "code_required"
    if account.lockout.is_locked(now):
        return "locked"
    return None


def refuse_email_enable(account: Account, code: str | None, now: datetime) -> str | None:
    if account.email is None:
        return "no_email_address"
    if account.lockout.is_locked(now):
        return "locked"
    if account.mode == "totp" and not code:
        return "code_required"
    return None


def refuse_email_code(account: Account, now: datetime) -> tuple[str, datetime | None] | None:
    """Why no email code can be sent now (and when asking again can work), or None."""
    if account.lockout.is_locked(now):
        return "locked", account.lockout.locked_until
    if account.email is None:
        return "no_email_address", None
    allowance = email_code_allowance(account.email_codes_sent, now)
    if not allowance.allowed:
        return "rate_limited", allowance.retry_at
    return None


@dataclass(frozen=True)
class Challenge:
    """One login's MFA challenge."""

    login_id: str
    account_id: str
    mode: Mode
    expires_at: datetime
    code_key_id: str | None = None
    code_hash: bytes | None = None
    verified_at: datetime | None = None


def refuse_login_code(account: Account, challenge: Challenge, now: datetime) -> str | None:
    """Why a code for this login cannot be checked at all (not counted as a failure)."""
    if account.lockout.is_locked(now):
        return "locked"
    if challenge.verified_at is not None:
        return "code_already_used"
    if now >= challenge.expires_at:
        return "code_expired"
    if account.mode == "disabled":
        return "mfa_not_enabled"
    if challenge.mode != account.mode:
        return "mode_changed"  # the account switched modes since: ask for a new challenge
    return None


def delivery_for(mode: Mode) -> Literal["email", "authenticator", "none"]:
    return {"email": "email", "totp": "authenticator", "disabled": "none"}[mode]  # type: ignore[return-value]


# Binding strings for keyed hashes: a code hashed for one login or account never
# matches another's.


def login_code_message(account_id: str, login_id: str, code: str) -> bytes:
    return f"login-code\x00{account_id}\x00{login_id}\x00{code}".encode()


def action_code_message(account_id: str, code: str) -> bytes:
    return f"action-code\x00{account_id}\x00{code}".encode()


def recovery_code_message(account_id: str, normalized: str) -> bytes:
    return f"recovery-code\x00{account_id}\x00{normalized}".encode()


def totp_aad(account_id: str) -> bytes:
    """AES-GCM associated data of an account's TOTP secret: a ciphertext copied to another
    account's row does not decrypt."""
    return f"palisade-mfa totp-secret\x00{account_id}".encode()
