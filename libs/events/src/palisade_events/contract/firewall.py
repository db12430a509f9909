"""Network firewall (worker `firewall`): per-service rules rendered to nftables on the VM.

The seed: "By default, we only open the ports necessary for the application you have
deployed", "From there you can modify, remove, or add new rules to open a port from your
service to the internet (or just to a specific target IP)", and "Disable firewall will
delete existing rules".

Commands carry the service in the envelope (`service_id`). An accepted change
(`FirewallRulesReplaced`, `FirewallEnabled`, `FirewallDisabled`) is followed by
`FirewallApplyRequested` (the worker asks itself, so the change is recorded even while
the VM is unreachable) and then by `FirewallApplied` or `FirewallApplyFailed`, all with
the command's correlation id. A refused change is `FirewallChangeRejected {reason}` and
nothing is applied.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AwareDatetime, Field

from ..messages import Command, Event, Payload, Query, Reply, StrictModel
from ..types import Reason, ServiceId

OWNER = "firewall"

_CHANGE_REASONS = (
    "unknown_service, version_conflict, firewall_disabled, automation_port_required, port_80_required_for_tls,"
    " too_many_rules, invalid_port, port_out_of_range, port_range_reversed, ports_required, ports_not_allowed_for_icmp,"
    " invalid_icmp_type, icmp_type_requires_icmp, invalid_cidr, no_sources"
)


class _Firewall:
    owner: ClassVar[str] = OWNER


class FirewallRule(StrictModel):
    """One row of the dashboard's firewall table. Bounds are generous on purpose: a bad
    port or CIDR is refused by the worker with its own reason, not parked as invalid."""

    protocol: Literal["tcp", "udp", "icmp"]
    ports: str | None = Field(
        None,
        max_length=32,
        description='tcp/udp only: one port "22" or an ordered range "8000-8100", within 1-65535',
        examples=["22", "8000-8100"],
    )
    icmp_type: str | None = Field(
        None,
        max_length=32,
        description="icmp only, optional (all types when absent): echo-request, echo-reply,"
        " destination-unreachable, time-exceeded, parameter-problem, timestamp-request, timestamp-reply"
        " (IPv4), packet-too-big (IPv6)",
        examples=["echo-request"],
    )
    sources: list[str] | None = Field(
        None,
        max_length=256,
        description="CIDRs or addresses the rule admits; absent means any IPv4 and any IPv6 address."
        " IPv6 is normalised (RFC 5952)",
        examples=[["203.0.113.0/24", "2001:db8::/32"]],
    )


# ------------------------------------------------------------------ commands


class FirewallRulesReplaceRequested(_Firewall, Command):
    """The dashboard's "Apply Changes": the whole rule set, replacing the current one."""

    rules: list[FirewallRule] = Field(max_length=1000, description="At most 500 (after a larger list is refused)")
    expected_version: int = Field(
        ge=0, description="The version the user edited (GetFirewall); another version is a version_conflict"
    )
    acknowledge_tls_impact: bool = Field(
        False,
        description="Close 80/tcp even though the service has TLS domains (their certificates will not renew)",
    )


class FirewallEnableRequested(_Firewall, Command):
    """Enable the firewall with the software's default rules (also restores them when enabled)."""

    acknowledge_tls_impact: bool = Field(False, description="As for FirewallRulesReplaceRequested")


class FirewallDisableRequested(_Firewall, Command):
    """Disable the firewall: its rules are deleted and the VM is open to everything."""


class FirewallApplyRequested(_Firewall, Command):
    """Put the service's current rule set in force on its VM. The worker sends this to
    itself after every accepted change; an operator may send it to re-apply."""

    reason: Literal["changed", "provisioned", "reprovisioned", "reconcile", "operator"] = "operator"


class FirewallRuleView(StrictModel):
    protocol: Literal["tcp", "udp", "icmp"]
    ports: str | None = None
    icmp_type: str | None = None
    sources: list[str] = Field(max_length=1024, description="Normalised; any IPv4 is 0.0.0.0/0, any IPv6 ::/0")


class FirewallState(Reply):
    """A service's firewall: the rule set and what is in force on the VM."""

    service_id: ServiceId
    enabled: bool
    version: int = Field(ge=0)
    rules: list[FirewallRuleView] = Field(max_length=500, description="Merged and sorted; empty when disabled")
    state: Literal["applied", "pending", "failed"] = Field(
        description="applied: the VM enforces this version; pending: an apply is due; failed: the last apply failed"
        " and the VM keeps the ruleset of applied_version"
    )
    applied_version: int | None = None
    applied_checksum: str | None = Field(None, max_length=80)
    applied_at: AwareDatetime | None = None
    port_80_open: bool = Field(description="Of this rule set (what the TLS worker needs)")
    tls_domains: int = Field(ge=0, description="Domains the TLS worker reported for the service")
    last_error: str | None = Field(None, max_length=500)


class GetFirewall(_Firewall, Query):
    """Ask for a service's firewall."""

    reply: ClassVar[type[Reply]] = FirewallState
    service_id: ServiceId


# ------------------------------------------------------------------ events


class FirewallRulesReplaced(_Firewall, Event):
    """A new rule set was accepted; `FirewallApplied` follows once the VM enforces it."""

    version: int = Field(ge=0)
    rule_count: int = Field(ge=0, le=500, description="Rules after merging overlaps and removing duplicates")
    merged: int = Field(ge=0, description="How many requested rules were merged into others or were duplicates")


class FirewallEnabled(_Firewall, Event):
    """The firewall is on with the software's default rules (on provisioning or on request)."""

    version: int = Field(ge=0)
    rule_count: int = Field(ge=0, le=500)
    software: str = Field(max_length=64, description="The catalog entry the defaults came from")


class FirewallDisabled(_Firewall, Event):
    """The firewall is off: its rules are deleted, the VM accepts everything."""

    version: int = Field(ge=0)


class FirewallChangeRejected(_Firewall, Event):
    """A change was refused; nothing changed and nothing was applied."""

    reason: Reason = Field(description=_CHANGE_REASONS)
    detail: str | None = Field(None, max_length=500)
    rule_index: int | None = Field(None, ge=0, description="The refused rule's position in the request")


class FirewallApplied(Event):
    """A rule set is in force in the VM's kernel (applied atomically, read back)."""

    owner: ClassVar[str] = OWNER

    version: int = Field(ge=0, description="Version of the service's rule set")
    checksum: str = Field(max_length=80, description="sha256 of the rendered ruleset", examples=["sha256:9f2c…"])
    rule_count: int = Field(ge=0, le=500)
    port_80_open: bool = Field(
        description="80/tcp reachable from any IPv4 and IPv6 source, or the firewall disabled (ACME HTTP-01 needs it)"
    )


class FirewallApplyFailed(_Firewall, Event):
    """The rule set could not be put in force; the VM keeps its previous ruleset. Transient
    failures (VM unreachable) are retried first and do not produce this event."""

    version: int | None = Field(None, ge=0, description="The version that was not applied")
    reason: Reason = Field(
        description="ruleset_refused, readback_mismatch, host_key_mismatch, authentication_failed,"
        " negotiation_failed, command_failed, unknown_service"
    )
    detail: str | None = Field(None, max_length=500)


TYPES: tuple[type[Payload], ...] = (
    FirewallRulesReplaceRequested,
    FirewallEnableRequested,
    FirewallDisableRequested,
    FirewallApplyRequested,
    GetFirewall,
    FirewallRulesReplaced,
    FirewallEnabled,
    FirewallDisabled,
    FirewallChangeRejected,
    FirewallApplied,
    FirewallApplyFailed,
)
