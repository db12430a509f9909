"""How `palisade firewall set --rule ...` reads a rule (pure)."""

from __future__ import annotations

import pytest
import typer

from palisade_events.contract.firewall import FirewallRule
from palisade_firewall.cli import parse_rule


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("tcp:443:any", FirewallRule(protocol="tcp", ports="443")),
        ("tcp:443", FirewallRule(protocol="tcp", ports="443")),
        ("TCP:8000-8100:any4", FirewallRule(protocol="tcp", ports="8000-8100", sources=["0.0.0.0/0"])),
        ("udp:4242:203.0.113.0/24", FirewallRule(protocol="udp", ports="4242", sources=["203.0.113.0/24"])),
        (
            "udp:53:203.0.113.0/24, 2001:db8::/32",
            FirewallRule(protocol="udp", ports="53", sources=["203.0.113.0/24", "2001:db8::/32"]),
        ),
        ("tcp:22:any6,10.0.0.0/8", FirewallRule(protocol="tcp", ports="22", sources=["::/0", "10.0.0.0/8"])),
        ("icmp:echo-request:any", FirewallRule(protocol="icmp", icmp_type="echo-request")),
        ("icmp::192.0.2.0/24", FirewallRule(protocol="icmp", sources=["192.0.2.0/24"])),
        ("icmp:any", FirewallRule(protocol="icmp")),
        # Left to the worker to refuse with its reason:
        ("tcp:70000", FirewallRule(protocol="tcp", ports="70000")),
        ("icmp:8", FirewallRule(protocol="icmp", icmp_type="8")),
    ],
)
def test_a_rule_is_protocol_ports_sources(text: str, rule: FirewallRule) -> None:
    assert parse_rule(text) == rule


def test_an_unknown_protocol_is_a_usage_error() -> None:
    with pytest.raises(typer.BadParameter):
        parse_rule("sctp:9")
