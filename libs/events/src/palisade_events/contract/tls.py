"""Custom domains and automated TLS (worker `tls`).

The seed: "To activate HTTPS / TLS / SSL on your service you must indicate the domain
name(s) ... You must create a CNAME record pointing to `<service hostname>`.
Alternatively, you can create an A record pointing to IP ..." and "Once propagated SSL
should work instantly on your service. The certificate will be automatically generated
and renewed."

Every service has one certificate (ACME, HTTP-01) whose names are its domains: the
service's own hostname first (it resolves by construction and cannot be removed), then
the custom domains whose DNS points at the service. Commands carry the service in the
envelope (`service_id`). A domain moves through `pending_dns` (DNS not pointing here
yet, re-checked with back-off), `proxied` (behind Cloudflare's proxy), `blocked` (port 80
closed), `issuing`, `active` (on the served certificate) or `failed`.

The firewall projects `DomainAccepted` / `DomainReleased` (it refuses to close port 80
while a service has TLS domains).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from ..messages import Command, Event, Payload, Query, Reply, StrictModel
from ..types import Hostname, Reason, ServiceId

OWNER = "tls"

DomainState = Literal["pending_dns", "proxied", "blocked", "issuing", "active", "failed"]
DomainKind = Literal["hostname", "custom"]

RawDomain = Annotated[
    str,
    # Generous on purpose: a malformed or too-long domain is refused by the worker with its
    # own reason (`DomainRejected`), not parked as an invalid message.
    StringConstraints(max_length=2000),
    Field(description="A domain as the user typed it (Unicode or A-label)", examples=["shop.example.com"]),
]
Serial = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{1,64}$"),
    Field(description="Certificate serial number, lowercase hex", examples=["4f3a2b9c1d0e"]),
]
Detail = Annotated[str, StringConstraints(max_length=500)]

_REJECTION_REASONS = (
    "domain_empty, domain_is_ip, domain_wildcard, domain_invalid_characters, domain_too_long, domain_idna_invalid,"
    " domain_not_fully_qualified, domain_platform_reserved, domain_already_added, too_many_domains, unknown_service"
)


class _Tls:
    owner: ClassVar[str] = OWNER


class DnsRecord(StrictModel):
    """A DNS record the user must create (or that was found)."""

    type: Literal["CNAME", "A", "AAAA"]
    name: Hostname
    value: str = Field(max_length=253, examples=["redis-bgrkj-u76.vm.example.net", "23.88.47.208"])


# ------------------------------------------------------------------ commands


class DomainAdded(_Tls, Command):
    """The user added a domain ("Manage SSL Domains": type it and press enter)."""

    domain: RawDomain


class DomainRemoved(_Tls, Command):
    """The user removed a domain; its server block goes at once, the certificate is reissued without it."""

    domain: RawDomain


class CertificateRenewalRequested(_Tls, Command):
    """Renew the service's certificate now (back-off is reset; the CA's Retry-After still holds).
    With `domain`, that domain is also given another chance: re-checked at once if its DNS
    was pending or it had failed."""

    domain: RawDomain | None = None


class SslResetRequested(_Tls, Command):
    """The seed's "reset SSL_DATA folder": set the current certificate aside and issue afresh
    (new key, new order), with back-off and failed domains reset."""


class CertificateIssueRequested(_Tls, Command):
    """Obtain (or renew) the service's certificate if it is due. The worker sends this to
    itself when the domain set changes, a renewal or retry comes due, or port 80 reopens;
    an operator may send it. A request that finds nothing due does nothing."""

    reason: Literal[
        "domains_changed", "renewal", "retry", "port_80_opened", "renew_requested", "reset", "reprovisioned", "operator"
    ] = Field("operator", description="renew_requested and reset issue even when nothing is due")


class TlsConfigApplyRequested(_Tls, Command):
    """Write the service's certificate, key and nginx server blocks to its VM (nginx -t, reload).
    Sent by the worker to itself after an issuance or a domain removal; an operator may send it."""

    reason: Literal["certificate_issued", "domains_changed", "reprovisioned", "reconcile", "operator"] = "operator"


# ------------------------------------------------------------------ query


class DomainInfo(StrictModel):
    domain: Hostname = Field(description="A-label form, as used in DNS and the certificate")
    display: str = Field(max_length=253, description="Unicode form (U-label) for people")
    kind: DomainKind
    state: DomainState
    expected_records: list[DnsRecord] = Field(
        max_length=3, description="What DNS must say: a CNAME to the service hostname, or A/AAAA to its addresses"
    )
    next_dns_check_at: AwareDatetime | None = None
    not_after: AwareDatetime | None = Field(None, description="Expiry of the served certificate naming this domain")
    last_error: Detail | None = None


class CertificateInfo(StrictModel):
    serial: Serial
    domains: list[Hostname] = Field(max_length=100)
    not_before: AwareDatetime
    not_after: AwareDatetime
    renew_at: AwareDatetime


class DomainList(Reply):
    """A service's domains, its certificate and what comes next."""

    service_id: ServiceId
    hostname: Hostname
    port_80_open: bool
    domains: list[DomainInfo] = Field(max_length=100)
    certificate: CertificateInfo | None = None
    next_attempt_at: AwareDatetime | None = Field(None, description="Next issuance or renewal attempt")
    failures: int = Field(0, ge=0, description="Consecutive failed issuance attempts")
    last_error: Detail | None = None


class GetDomains(_Tls, Query):
    """Ask for a service's domains and their states."""

    reply: ClassVar[type[Reply]] = DomainList
    service_id: ServiceId


# ------------------------------------------------------------------ events


class DomainAccepted(_Tls, Event):
    """A domain passed the checks and is recorded for the service (it needs port 80 open)."""

    domain: Hostname


class DomainReleased(_Tls, Event):
    """A domain was removed from the service."""

    domain: Hostname


class DomainRejected(_Tls, Event):
    """A domain was refused; nothing was recorded and nothing written to the VM."""

    domain: str = Field(max_length=300, description="The input, cut to 300 characters")
    reason: Reason = Field(description=_REJECTION_REASONS)


class DomainRemovalRejected(_Tls, Event):
    """A removal was refused (unknown_service, unknown_domain, hostname_not_removable)."""

    domain: str = Field(max_length=300)
    reason: Reason


class CertificateRenewalRejected(_Tls, Event):
    """A renewal request was refused (unknown_service, unknown_domain)."""

    domain: str | None = Field(None, max_length=300)
    reason: Reason


class SslResetRejected(_Tls, Event):
    """A reset was refused (unknown_service)."""

    reason: Reason


class DomainDnsPending(_Tls, Event):
    """The domain's DNS does not point at the service yet; it is re-checked with back-off
    (1 minute growing to 1 hour) for up to 7 days."""

    domain: Hostname
    reason: Literal["no_records", "points_elsewhere", "lookup_failed"]
    expected_records: list[DnsRecord] = Field(max_length=3)
    found: list[str] = Field(max_length=20, description="Addresses or CNAME target found")
    next_check_at: AwareDatetime


class DomainDnsVerified(_Tls, Event):
    """The domain's DNS points at the service."""

    domain: Hostname
    via: Literal["cname", "address"]


class DomainProxied(_Tls, Event):
    """The domain resolves to Cloudflare's proxy (orange cloud): the service cannot prove it
    owns the name. Re-checked like pending DNS."""

    domain: Hostname
    addresses: list[str] = Field(max_length=20)
    guidance: str = Field(max_length=1000)


class DomainBlocked(_Tls, Event):
    """The domain's DNS is right but its certificate cannot be obtained: port 80 is closed
    on the service's firewall. Issued as soon as a `FirewallApplied` opens it."""

    domain: Hostname
    reason: Literal["port_80_closed"]


class DomainFailed(_Tls, Event):
    """The domain was given up on: DNS never pointed here within 7 days, or the CA refused it.
    `CertificateRenewalRequested {domain}` or removing and adding it again retries."""

    domain: Hostname
    reason: Literal["dns_not_configured", "proxied", "validation_failed", "self_check_failed", "rejected_by_ca"]
    detail: Detail | None = None


class CertificateIssued(_Tls, Event):
    """The CA issued the service's certificate; `TlsConfigApplied` follows once nginx serves it."""

    domains: list[Hostname] = Field(min_length=1, max_length=100)
    not_before: AwareDatetime
    not_after: AwareDatetime
    serial: Serial
    renewal: bool = Field(description="A certificate was already served for this service")


_FAILURE_REASONS = Literal[
    "validation_failed", "self_check_failed", "rate_limited", "ca_error", "ca_unreachable", "port_80_closed",
    "vm_error",
]  # fmt: skip


class CertificateRenewalFailed(_Tls, Event):
    """An attempt to renew (or replace) the served certificate failed; the current one is
    still served. The next attempt backs off (1 minute doubling to 6 hours, never before
    the CA's Retry-After)."""

    domains: list[Hostname] = Field(max_length=100)
    reason: _FAILURE_REASONS
    detail: Detail | None = None
    attempt: int = Field(ge=1)
    next_attempt_at: AwareDatetime
    current_serial: Serial
    current_not_after: AwareDatetime


class CertificateIssuanceFailed(_Tls, Event):
    """An attempt to obtain the service's first certificate failed; backs off like renewals."""

    domains: list[Hostname] = Field(max_length=100)
    reason: _FAILURE_REASONS
    detail: Detail | None = None
    attempt: int = Field(ge=1)
    next_attempt_at: AwareDatetime


class CertificateExpiringSoon(_Tls, Event):
    """The served certificate has less than 7 days left (renewal keeps failing)."""

    serial: Serial
    domains: list[Hostname] = Field(max_length=100)
    not_after: AwareDatetime
    seconds_left: int


class SslReset(_Tls, Event):
    """The current certificate was set aside (kept, no longer used); a fresh one is being issued."""

    set_aside_serial: Serial | None = None


class TlsConfigApplied(_Tls, Event):
    """The VM's nginx serves the service's server blocks (validated with nginx -t, reloaded)."""

    serial: Serial | None = Field(None, description="The certificate nginx serves, if any")
    https_domains: list[Hostname] = Field(max_length=100, description="Names served over HTTPS")
    http_domains: list[Hostname] = Field(max_length=100, description="Names waiting for a certificate (HTTP only)")
    checksum: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the server blocks file")
    changed: bool


class TlsConfigApplyFailed(_Tls, Event):
    """The VM could not be written or nginx refused the configuration; the previous
    configuration stays in force. Unreachable VMs are retried first."""

    reason: Reason = Field(
        description="nginx_config_invalid, nginx_reload_failed, host_key_mismatch, authentication_failed,"
        " command_failed, unknown_service"
    )
    detail: Detail | None = None


TYPES: tuple[type[Payload], ...] = (
    DomainAdded,
    DomainRemoved,
    CertificateRenewalRequested,
    SslResetRequested,
    CertificateIssueRequested,
    TlsConfigApplyRequested,
    GetDomains,
    DomainAccepted,
    DomainReleased,
    DomainRejected,
    DomainRemovalRejected,
    CertificateRenewalRejected,
    SslResetRejected,
    DomainDnsPending,
    DomainDnsVerified,
    DomainProxied,
    DomainBlocked,
    DomainFailed,
    CertificateIssued,
    CertificateRenewalFailed,
    CertificateIssuanceFailed,
    CertificateExpiringSoon,
    SslReset,
    TlsConfigApplied,
    TlsConfigApplyFailed,
)
