"""Multi-factor authentication of platform accounts (worker `mfa`).

The seed: "By default, Elestio uses Email-based MFA, each time you log in ... we
will send you an email with a one-time code", and "We also have TOTP-based MFA,
this is more secure".

Every message about one account carries its id in the envelope (`account_id`).
Secrets (TOTP secrets, email codes, recovery codes) never appear in an event: the
TOTP secret and the recovery codes travel only in the replies of the request/reply
queries below, which go to the caller's own reply queue. Codes the user types
travel in commands and queries (addressed to the worker only), never back out.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from ..messages import Command, Event, Payload, Query, Reply
from ..types import AccountId, Reason, ShortText

OWNER = "mfa"

Mode = Literal["disabled", "email", "totp"]
Method = Literal["email", "totp", "recovery"]

LoginId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"),
    Field(description="The dashboard's id of one login attempt", examples=["login-7f3a9c21"]),
]
Code = Annotated[
    str,
    # Empty is allowed on the wire so that an empty form field gets `code_required`, not a parked message.
    StringConstraints(max_length=32),
    Field(
        description="What the user typed: a 6-digit email or authenticator code, or a recovery code",
        examples=["492039"],
    ),
]
_REASONS = (
    "Machine-readable reason: locked, invalid_code, code_already_used, code_expired, code_required, unknown_login,"
    " mode_changed, login_id_in_use, confirmation_required, confirmation_mismatch, totp_already_enabled,"
    " no_totp_setup_pending, totp_setup_expired, mfa_not_enabled, no_email_address, rate_limited,"
    " email_codes_not_in_use, email_rejected, support_actor_required, account_id_missing"
)


class _Mfa:
    owner: ClassVar[str] = OWNER


# ------------------------------------------------------------------ commands


class MfaEmailEnableRequested(_Mfa, Command):
    """Use email codes (the default). Leaving TOTP for email is a downgrade and needs a
    current authenticator or recovery code."""

    code: Code | None = Field(None, description="Needed only when the account uses TOTP")


class MfaEmailCodeRequested(_Mfa, Command):
    """Email a one-time code that confirms a security change (e.g. disabling MFA) of an
    account in email mode. Limited like login codes (5 per 15 minutes)."""


class MfaDisableRequested(_Mfa, Command):
    """Turn MFA off. Needs the typed word `disable` and a current valid code."""

    confirmation: str = Field("", max_length=64, description="Must be exactly the word `disable`", examples=["disable"])
    code: Code | None = Field(None, description="A current authenticator, emailed or recovery code")


class MfaResetBySupport(_Mfa, Command):
    """Support turned MFA off for an account after checking the owner's identity by other
    means (the envelope's actor must be of kind `support`)."""

    ticket: str = Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:#-]*$",
        description="The support ticket that justifies the reset",
        examples=["SUP-20931"],
    )
    operator: ShortText = Field(description="The support operator who reset", examples=["jane.support"])


class LoginChallengeRequested(_Mfa, Command):
    """A login passed the password step: start its MFA challenge (in email mode, send a code)."""

    login_id: LoginId


class LoginCodeSubmitted(_Mfa, Command):
    """The code typed for a login; the outcome is `LoginCodeChecked` (the dashboard usually
    asks `VerifyLoginCode` instead, which answers directly)."""

    login_id: LoginId
    code: Code


# ------------------------------------------------------------------ queries (request/reply)


class MfaTotpSetupReply(Reply):
    """The new TOTP secret, given only to the caller; nothing of it is in any event."""

    accepted: bool
    reason: Reason | None = None
    secret: str | None = Field(None, max_length=128, description="Base32 secret, to keep for recovery")
    otpauth_uri: str | None = Field(None, max_length=2000, description="otpauth://totp/... with issuer")
    qr_svg: str | None = Field(None, max_length=200_000, description="The URI as a QR code, SVG")
    expires_at: AwareDatetime | None = Field(None, description="Confirm with a code before this")


class MfaTotpSetupRequested(_Mfa, Query):
    """Start TOTP setup: a new secret, answered by request/reply only."""

    reply: ClassVar[type[Reply]] = MfaTotpSetupReply


class MfaTotpConfirmReply(Reply):
    """The outcome of confirming TOTP; on success the recovery codes, shown once."""

    enabled: bool
    reason: Reason | None = None
    recovery_codes: list[str] = Field(
        default_factory=list, max_length=20, description="Single-use recovery codes; never shown again"
    )


class MfaTotpConfirmRequested(_Mfa, Query):
    """Enable TOTP with a code from the authenticator app for the pending secret."""

    reply: ClassVar[type[Reply]] = MfaTotpConfirmReply
    code: Code


class VerifyLoginCodeReply(Reply):
    """Whether the code lets this login in."""

    valid: bool
    reason: Reason | None = None


class VerifyLoginCode(_Mfa, Query):
    """Is this code valid for this login? The outcome is also `LoginCodeChecked` and an
    audit record."""

    reply: ClassVar[type[Reply]] = VerifyLoginCodeReply
    login_id: LoginId
    code: Code


class MfaStatusReply(Reply):
    """An account's MFA mode and state (no secrets)."""

    account_id: AccountId
    mode: Mode
    email_known: bool
    locked_until: AwareDatetime | None = None
    recovery_codes_left: int = Field(ge=0)
    totp_setup_pending: bool


class MfaStatus(_Mfa, Query):
    """Ask for the envelope's account's MFA mode and state."""

    reply: ClassVar[type[Reply]] = MfaStatusReply


# ------------------------------------------------------------------ events


class MfaEmailEnabled(_Mfa, Event):
    """The account now gets login codes by email."""

    previous_mode: Mode


class MfaTotpSetupStarted(_Mfa, Event):
    """A TOTP secret was handed out by request/reply and awaits confirmation."""

    expires_at: AwareDatetime


class MfaTotpEnabled(_Mfa, Event):
    """The account now uses an authenticator app; recovery codes were handed out."""

    previous_mode: Mode
    recovery_codes: int = Field(ge=0, description="How many recovery codes were issued (not the codes)")


class MfaDisabled(_Mfa, Event):
    """MFA is off for the account."""

    previous_mode: Mode
    by: Literal["user", "support"]
    ticket: str | None = Field(None, max_length=100, description="The support ticket, for a support reset")


class MfaChangeRejected(_Mfa, Event):
    """A change of the account's MFA was refused; nothing changed."""

    action: Literal["email_enable", "email_code", "disable", "support_reset"]
    reason: Reason = Field(description=_REASONS)


class MfaEmailCodeSent(_Mfa, Event):
    """A one-time code was emailed to the account's address (the code is not here)."""

    purpose: Literal["login", "account_action"]
    login_id: LoginId | None = None
    expires_at: AwareDatetime


class LoginChallengeIssued(_Mfa, Event):
    """The login's MFA challenge is open; `delivery` says where the code comes from
    (`none`: MFA is disabled for the account and the login needs no code)."""

    login_id: LoginId
    mode: Mode
    delivery: Literal["email", "authenticator", "none"]
    expires_at: AwareDatetime


class LoginChallengeRejected(_Mfa, Event):
    """No challenge for this login (locked, rate-limited, no address ...)."""

    login_id: LoginId
    reason: Reason = Field(description=_REASONS)
    retry_at: AwareDatetime | None = Field(None, description="When asking again can succeed")


class LoginCodeChecked(_Mfa, Event):
    """The outcome of a login code: valid (the login may proceed) or why not."""

    login_id: LoginId
    valid: bool
    reason: Reason | None = Field(None, description=_REASONS)
    method: Method | None = Field(None, description="What proved the login, when valid")


class RecoveryCodeUsed(_Mfa, Event):
    """A recovery code was spent; the dashboard may suggest new ones when few are left."""

    remaining: int = Field(ge=0)


class MfaLocked(_Mfa, Event):
    """Too many wrong codes: every code of the account is refused until `locked_until`."""

    locked_until: AwareDatetime
    failures: int = Field(ge=1, description="Failed codes inside the window that caused the lock")


TYPES: tuple[type[Payload], ...] = (
    MfaEmailEnableRequested,
    MfaEmailCodeRequested,
    MfaDisableRequested,
    MfaResetBySupport,
    LoginChallengeRequested,
    LoginCodeSubmitted,
    MfaTotpSetupRequested,
    MfaTotpConfirmRequested,
    VerifyLoginCode,
    MfaStatus,
    MfaEmailEnabled,
    MfaTotpSetupStarted,
    MfaTotpEnabled,
    MfaDisabled,
    MfaChangeRejected,
    MfaEmailCodeSent,
    LoginChallengeIssued,
    LoginChallengeRejected,
    LoginCodeChecked,
    RecoveryCodeUsed,
    MfaLocked,
)
