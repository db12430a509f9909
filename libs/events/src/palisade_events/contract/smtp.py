"""The SMTP relay every VM sends its mail through (worker `smtp-relay`).

The seed: "You can only send transactional emails. Marketing emails are not
permitted", "up to 300 transactional emails per hour. That's up to 7200 emails
per day", "All emails must be sent from [domain]@vm.elestio.app", and "The SMTP
service is only available from the global private network IP of your VM".

The relay's own decisions are SMTP replies, not bus commands; each of them is
announced here (`EmailRelayed`, `EmailRejected`) and audited on `palisade.audit`
with routing key `smtp-relay.EmailSubmission.<accepted|rejected|failed>`.
Message bodies never travel in these events.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints

from ..messages import Command, Event, Payload, Query, Reply
from ..types import Reason, ServiceId, ShortText

OWNER = "smtp-relay"

EmailAddress = Annotated[
    str,
    StringConstraints(min_length=3, max_length=320, pattern=r"^[^\s<>@]{1,64}@[^\s<>@]{1,255}$"),
    Field(description="An envelope address as the client gave it", examples=["ops@example.com"]),
]
SmtpReply = Annotated[
    str,
    StringConstraints(pattern=r"^[245][0-9]{2} [245]\.[0-9]{1,3}\.[0-9]{1,3}$"),
    Field(description="The reply code and enhanced status code the client got", examples=["451 4.7.1"]),
]


class _Smtp:
    owner: ClassVar[str] = OWNER


# ------------------------------------------------------------------ commands


class RelaySuspensionLifted(_Smtp, Command):
    """Support lifts a service's relay suspension: it may connect again, and its
    marketing violations are forgotten. Answered by `RelayAccessRestored` or
    `RelaySuspensionLiftRejected`."""

    note: ShortText | None = Field(None, description="Why (e.g. the support ticket)", examples=["ticket 8812"])


class RelayStatusReply(Reply):
    """What the relay knows of one service: its sender address, suspension and quota."""

    service_id: ServiceId
    sender: str = Field(
        max_length=320, description="The only allowed sender address", examples=["redis-bgrkj@vm.example.app"]
    )
    private_ip: str = Field(max_length=45, examples=["10.0.0.5"])
    suspended: bool
    violations_24h: int = Field(ge=0, description="Marketing violations in the last 24 hours")
    quota_used: int = Field(ge=0, description="Emails (recipients) sent in the last 3600 seconds")
    quota_limit: int = Field(ge=1, examples=[300])
    window_seconds: int = Field(ge=1, examples=[3600])
    next_slot_seconds: int | None = Field(
        None, ge=0, description="Seconds until one slot frees, when the quota is full"
    )


class RelayStatus(_Smtp, Query):
    """Ask for a service's sender address, suspension and quota use."""

    reply: ClassVar[type[Reply]] = RelayStatusReply
    service_id: ServiceId


# ------------------------------------------------------------------ events


class EmailRelayed(_Smtp, Event):
    """The smarthost accepted a message from the service; the client got `250`. This
    event is the record of the acceptance (refusals are also audited)."""

    message_id_header: str = Field(
        max_length=255,
        description="The message's Message-ID header (added by the relay when missing)",
        examples=["<20261125090000.1@redis-bgrkj>"],
    )
    recipients: list[EmailAddress] = Field(min_length=1, max_length=50, description="Envelope recipients")
    size_bytes: int = Field(ge=0, description="Size of the relayed message")
    relay_id: str = Field(
        pattern=r"^[0-9a-f]{16}$",
        description="The relay's id of the message: in the client's `250 ... queued as` reply and the Received header",
        examples=["3f9c2a41d07b5e18"],
    )


class EmailRejected(_Smtp, Event):
    """The relay refused a connection, a sender, a recipient or a message; `smtp_reply`
    is what the client was told."""

    reason: Reason = Field(
        description="outside_private_network, unknown_service, relay_suspended, sender_not_allowed, "
        "from_header_mismatch, marketing_precedence, marketing_list_unsubscribe, "
        "marketing_too_many_recipients, header_injection, bare_lf, bare_cr, message_too_large, "
        "line_too_long, quota_exceeded, upstream_unavailable, upstream_refused",
    )
    smtp_reply: SmtpReply
    stage: Literal["connect", "mail", "rcpt", "data", "upstream"]
    recipients: int = Field(0, ge=0, description="Recipients of the refused message (0 before RCPT)")
    retry_after_seconds: int | None = Field(None, ge=0, description="For quota_exceeded: when a slot frees")
    peer_ip: str | None = Field(None, max_length=45, description="The connecting address")


class EmailQuotaWarning(_Smtp, Event):
    """The service has used 80 % of its rolling hourly quota."""

    used: int = Field(ge=0, examples=[240])
    limit: int = Field(ge=1, examples=[300])
    window_seconds: int = Field(ge=1, examples=[3600])


class RelaySuspended(_Smtp, Event):
    """Repeated marketing mail: the service may no longer connect to the relay until
    support sends `RelaySuspensionLifted`."""

    reason: Reason = Field(examples=["marketing_violations"])
    violations: int = Field(ge=1, description="Violations inside the window", examples=[5])
    window_hours: int = Field(ge=1, examples=[24])


class RelayAccessRestored(_Smtp, Event):
    """The suspension was lifted; the service may send again."""


class RelaySuspensionLiftRejected(_Smtp, Event):
    """`RelaySuspensionLifted` was refused (unknown_service, not_suspended)."""

    reason: Reason


TYPES: tuple[type[Payload], ...] = (
    RelaySuspensionLifted,
    RelayStatus,
    EmailRelayed,
    EmailRejected,
    EmailQuotaWarning,
    RelaySuspended,
    RelayAccessRestored,
    RelaySuspensionLiftRejected,
)
