"""The pure firewall rules: validation with its reasons, normalisation, the guards, the
catalog, rendering (golden files, checked by nft itself) and the read-back comparison."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palisade_firewall import domain
from palisade_firewall.domain import ANY4, ANY6, ANYWHERE, PortRange, Rule, RuleSetRefused
from palisade_firewall.settings import FirewallSettings

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PALISADE_UPDATE_GOLDEN") == "1"


def net(text: str) -> domain.Network:
    return ipaddress.ip_network(text)


def refused(call: Any, *args: Any, **kwargs: Any) -> RuleSetRefused:
    with pytest.raises(RuleSetRefused) as info:
        call(*args, **kwargs)
    return info.value


def judge(rules: list[dict[str, Any]], **kw: Any) -> domain.Decision:
    options: dict[str, Any] = {
        "automation_sources": ANYWHERE,
        "port_80_was_open": True,
        "tls_domains": 0,
        "acknowledge_tls_impact": False,
    }
    options.update(kw)
    return domain.judge_rule_set(rules, **options)


SSH: dict[str, Any] = {"protocol": "tcp", "ports": "22"}


# ---------------------------------------------------------------- one rule


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"protocol": "tcp", "ports": "0"}, "port_out_of_range"),
        ({"protocol": "tcp", "ports": "65536"}, "port_out_of_range"),
        ({"protocol": "udp", "ports": "1-70000"}, "port_out_of_range"),
        ({"protocol": "tcp", "ports": "8100-8000"}, "port_range_reversed"),
        ({"protocol": "tcp", "ports": "http"}, "invalid_port"),
        ({"protocol": "tcp", "ports": "22,80"}, "invalid_port"),
        ({"protocol": "tcp", "ports": "-5"}, "invalid_port"),
        ({"protocol": "tcp"}, "ports_required"),
        ({"protocol": "udp", "ports": " "}, "ports_required"),
        ({"protocol": "icmp", "ports": "8"}, "ports_not_allowed_for_icmp"),
        ({"protocol": "tcp", "ports": "22", "icmp_type": "echo-request"}, "icmp_type_requires_icmp"),
        ({"protocol": "icmp", "icmp_type": "ping"}, "invalid_icmp_type"),
        ({"protocol": "icmp", "icmp_type": "packet-too-big", "sources": ["10.0.0.0/8"]}, "invalid_icmp_type"),
        ({"protocol": "tcp", "ports": "22", "sources": ["10.0.0.300/8"]}, "invalid_cidr"),
        ({"protocol": "tcp", "ports": "22", "sources": ["10.0.0.0/33"]}, "invalid_cidr"),
        ({"protocol": "tcp", "ports": "22", "sources": ["example.com"]}, "invalid_cidr"),
        ({"protocol": "tcp", "ports": "22", "sources": ["2001:db8::/129"]}, "invalid_cidr"),
        ({"protocol": "tcp", "ports": "22", "sources": ["::ffff:192.0.2.1"]}, "invalid_cidr"),
        ({"protocol": "tcp", "ports": "22", "sources": []}, "no_sources"),
    ],
)
def test_an_invalid_rule_is_refused_with_its_reason_and_position(rule: dict[str, Any], reason: str) -> None:
    exc = refused(judge, [SSH, rule])
    assert (exc.reason, exc.rule_index) == (reason, 1)


def test_host_bits_are_refused_with_the_network_meant() -> None:
    exc = refused(judge, [SSH, {"protocol": "tcp", "ports": "5432", "sources": ["10.1.2.3/24"]}])
    assert exc.reason == "invalid_cidr"
    assert "did you mean 10.1.2.0/24" in (exc.detail or "")


def test_ports_and_ranges_are_read_as_written() -> None:
    assert domain.parse_ports("22") == PortRange(22, 22)
    assert domain.parse_ports(" 8000 - 8100 ") == PortRange(8000, 8100)
    assert domain.parse_ports("1-65535") == PortRange(1, 65535)
    assert str(PortRange(8000, 8100)) == "8000-8100"
    assert str(PortRange(443, 443)) == "443"


def test_ipv6_sources_come_out_in_rfc5952_form() -> None:
    r = domain.rule(
        "tcp", "443", sources=["2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:DB8:AA:0:0:0:0:0/48", "fe80::/10"]
    )
    assert [str(n) for n in r.sources] == ["2001:db8::1/128", "2001:db8:aa::/48", "fe80::/10"]
    assert domain.rule("tcp", "22", sources=["192.0.2.7"]).sources == (net("192.0.2.7/32"),)
    assert domain.rule("tcp", "22").sources == (ANY4, ANY6)  # absent sources: anywhere


def test_icmp_rules_name_a_type_or_admit_every_type() -> None:
    assert domain.rule("icmp").icmp_type is None
    assert domain.rule("icmp", icmp_type="any").icmp_type is None
    assert domain.rule("icmp", icmp_type=" Echo-Request ").icmp_type == "echo-request"
    assert domain.rule("icmp", icmp_type="timestamp-request").icmp_type == "timestamp-request"  # IPv4 sources in it


# ---------------------------------------------------------------- normalising


def test_duplicates_are_removed_and_overlapping_rules_merged() -> None:
    decision = judge(
        [
            SSH,
            SSH,
            {"protocol": "tcp", "ports": "22", "sources": ["10.0.0.0/8"]},  # inside "anywhere"
            {"protocol": "tcp", "ports": "8000-8100"},
            {"protocol": "tcp", "ports": "8050-8200"},  # overlaps: one range
            {"protocol": "tcp", "ports": "8150"},  # inside it
            {"protocol": "udp", "ports": "8000-8100"},  # another protocol
            {"protocol": "udp", "ports": "53", "sources": ["10.0.0.0/16"]},
            {
                "protocol": "udp",
                "ports": "53",
                "sources": ["10.1.0.0/16", "2001:db8::/32"],
            },  # same port: sources merged
            {"protocol": "icmp", "icmp_type": "echo-request", "sources": ["192.0.2.0/24"]},
            {"protocol": "icmp", "sources": ["192.0.2.0/24"]},  # every type covers echo-request
        ]
    )
    assert [r.to_json() for r in decision.rules] == [
        {"protocol": "tcp", "ports": "22", "icmp_type": None, "sources": ["0.0.0.0/0", "::/0"]},
        {"protocol": "tcp", "ports": "8000-8200", "icmp_type": None, "sources": ["0.0.0.0/0", "::/0"]},
        {"protocol": "udp", "ports": "53", "icmp_type": None, "sources": ["10.0.0.0/15", "2001:db8::/32"]},
        {"protocol": "udp", "ports": "8000-8100", "icmp_type": None, "sources": ["0.0.0.0/0", "::/0"]},
        {"protocol": "icmp", "ports": None, "icmp_type": None, "sources": ["192.0.2.0/24"]},
    ]
    assert decision.merged == 6


def test_ranges_that_only_touch_stay_apart_as_entered() -> None:
    rules = domain.normalize([domain.rule("tcp", "18344"), domain.rule("tcp", "18345"), domain.rule("tcp", "18346")])
    assert [str(r.ports) for r in rules] == ["18344", "18345", "18346"]


_ports = st.integers(1, 40).flatmap(lambda a: st.tuples(st.just(a), st.integers(a, a + 6)))
_v4 = st.builds(
    lambda o, p: str(ipaddress.ip_network(f"10.0.{o}.0/{p}", strict=False)),
    st.integers(0, 3),
    st.sampled_from([22, 23, 24, 25]),
)
_v6 = st.builds(
    lambda o, p: str(ipaddress.ip_network(f"2001:db8:0:{o:x}00::/{p}", strict=False)),
    st.integers(0, 3),
    st.sampled_from([54, 55, 56]),
)
_rules = st.lists(
    st.builds(
        lambda proto, ports, srcs: domain.rule(proto, f"{ports[0]}-{ports[1]}", sources=srcs or None),
        st.sampled_from(["tcp", "udp"]),
        _ports,
        st.lists(st.one_of(_v4, _v6), max_size=3),
    ),
    max_size=12,
)
_probe_addresses = [ipaddress.ip_address(a) for a in ("10.0.0.1", "10.0.1.200", "10.0.3.9", "10.9.0.1")] + [
    ipaddress.ip_address(a) for a in ("2001:db8:0:100::1", "2001:db8:0:2ff::1", "2001:db8:1::1")
]


def _admitted(rules: tuple[Rule, ...] | list[Rule], proto: str, port: int, address: Any) -> bool:
    return any(
        r.protocol == proto and r.ports is not None and port in r.ports and any(address in n for n in r.sources)
        for r in rules
    )


@settings(max_examples=200, deadline=None)
@given(_rules)
def test_normalising_admits_exactly_the_same_traffic_and_is_stable(rules: list[Rule]) -> None:
    normal = domain.normalize(rules)
    assert domain.normalize(normal) == normal
    assert domain.normalize(reversed(rules)) == normal
    assert len(normal) <= len(set(rules))
    for proto in ("tcp", "udp"):
        for port in range(1, 48):
            for address in _probe_addresses:
                assert _admitted(normal, proto, port, address) == _admitted(rules, proto, port, address)


# ---------------------------------------------------------------- the guards


def test_at_most_500_rules() -> None:
    rules = [SSH] + [{"protocol": "tcp", "ports": str(10000 + 2 * i)} for i in range(499)]
    assert len(judge(rules).rules) == 500
    exc = refused(judge, [*rules, {"protocol": "udp", "ports": "9"}])
    assert (exc.reason, exc.rule_index) == ("too_many_rules", None)


def test_22_tcp_must_stay_open_from_the_automation_network() -> None:
    assert refused(judge, [{"protocol": "tcp", "ports": "443"}]).reason == "automation_port_required"
    assert refused(judge, [{"protocol": "udp", "ports": "22"}]).reason == "automation_port_required"
    # Default automation network: anywhere, so 22 cannot be restricted at all.
    only_v4 = [{"protocol": "tcp", "ports": "22", "sources": ["0.0.0.0/0"]}]
    assert refused(judge, only_v4).reason == "automation_port_required"
    assert judge([{"protocol": "tcp", "ports": "1-1024"}]).rules  # a range holding 22 will do
    # A configured automation network: 22 may be restricted as long as it stays in.
    automation = (net("10.0.0.0/8"), net("fd00::/8"))
    mine = {"protocol": "tcp", "ports": "22", "sources": ["203.0.113.7"]}
    assert refused(judge, [mine], automation_sources=automation).reason == "automation_port_required"
    both = [mine, {"protocol": "tcp", "ports": "22", "sources": ["10.0.0.0/9", "10.128.0.0/9", "fd00::/8"]}]
    assert judge(both, automation_sources=automation).rules[0].sources == (
        net("10.0.0.0/8"),
        net("203.0.113.7/32"),
        net("fd00::/8"),
    )
    half = [mine, {"protocol": "tcp", "ports": "22", "sources": ["10.0.0.0/9", "fd00::/8"]}]
    assert refused(judge, half, automation_sources=automation).reason == "automation_port_required"


def test_80_tcp_cannot_be_closed_while_the_service_has_tls_domains_unless_acknowledged() -> None:
    closed = [SSH, {"protocol": "tcp", "ports": "443"}]
    exc = refused(judge, closed, tls_domains=2)
    assert exc.reason == "port_80_required_for_tls"
    assert "2 TLS domain" in (exc.detail or "")
    assert judge(closed, tls_domains=2, acknowledge_tls_impact=True).rules
    assert judge(closed, tls_domains=0).rules  # no domains: nothing to protect
    assert judge(closed, tls_domains=2, port_80_was_open=False).rules  # not closing: it was closed already
    # Open from a few sources only is closed for Let's Encrypt.
    narrow = [SSH, {"protocol": "tcp", "ports": "80", "sources": ["0.0.0.0/0"]}]
    assert refused(judge, narrow, tls_domains=1).reason == "port_80_required_for_tls"
    wide = [SSH, {"protocol": "tcp", "ports": "80", "sources": ["0.0.0.0/1", "128.0.0.0/1", "::/0"]}]
    assert judge(wide, tls_domains=1).rules


def test_port_80_open_means_from_any_ipv4_and_ipv6_or_the_firewall_disabled() -> None:
    assert domain.port_80_open(True, [domain.rule("tcp", "80")])
    assert domain.port_80_open(True, [domain.rule("tcp", "1-1000")])
    assert not domain.port_80_open(True, [domain.rule("tcp", "80", sources=["0.0.0.0/0"])])
    assert not domain.port_80_open(True, [domain.rule("udp", "80")])
    assert not domain.port_80_open(True, [])
    assert domain.port_80_open(False, [])


# ---------------------------------------------------------------- the catalog


def test_the_catalog_gives_every_software_22_tcp_and_its_own_ports() -> None:
    catalog = domain.catalog()
    for entry in catalog.entries.values():
        assert entry.rules[0] == domain.rule("tcp", "22"), entry.software
        assert domain.normalize(entry.rules) == entry.rules
    # The seed's screenshot of a Redis service, and its table of automation ports.
    redis = {(r.protocol, str(r.ports)) for r in catalog.defaults("redis").rules}
    assert redis == {
        ("tcp", "22"),
        ("udp", "4242"),
        ("tcp", "23647"),
        ("tcp", "24814"),
        ("tcp", "18445"),
        ("tcp", "18345"),
        ("tcp", "18346"),
        ("tcp", "18344"),
    }
    assert {t: str(r.ports) for t, r in catalog.tool_rules.items()} == {
        "nebula": "4242",
        "vscode": "18345",
        "open-terminal": "18374",
        "file-explorer": "18346",
        "tail-logs": "18445",
        "terminal": "18344",
    }
    assert catalog.defaults("some-new-software").software == "default"
    assert domain.port_80_open(True, catalog.defaults("wordpress").rules)


def test_a_broken_catalog_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match="unknown tool"):
        domain.Catalog.from_text('[software.default]\ntools = ["nope"]\n')
    with pytest.raises(ValueError, match="port_out_of_range"):
        domain.Catalog.from_text('[software.default]\nports = ["tcp:99999"]\n')
    with pytest.raises(ValueError, match="default"):
        domain.Catalog.from_text('[software.redis]\nports = ["tcp:1"]\n')


def test_the_automation_network_setting_reads_cidrs() -> None:
    assert FirewallSettings().automation_networks() == ANYWHERE
    custom = FirewallSettings(automation_sources="10.0.0.0/8, fd00::/8")
    assert custom.automation_networks() == (net("10.0.0.0/8"), net("fd00::/8"))
    assert FirewallSettings(automation_sources='["10.1.0.0/16"]').automation_sources == ["10.1.0.0/16"]
    with pytest.raises(ValueError, match="has host bits set"):
        FirewallSettings(automation_sources="10.0.0.1/8")


# ---------------------------------------------------------------- rendering


MIXED: list[dict[str, Any]] = [
    {"protocol": "tcp", "ports": "22"},
    {"protocol": "tcp", "ports": "80"},
    {"protocol": "tcp", "ports": "443", "sources": ["0.0.0.0/0"]},
    {"protocol": "tcp", "ports": "8443", "sources": ["::/0"]},
    {"protocol": "tcp", "ports": "5432", "sources": ["203.0.113.0/24", "198.51.100.7", "2001:DB8::/32"]},
    {"protocol": "tcp", "ports": "8000-8100", "sources": ["10.0.0.0/8", "::/0"]},
    {"protocol": "udp", "ports": "4242", "sources": ["203.0.113.0/24"]},
    {"protocol": "udp", "ports": "51820"},
    {"protocol": "icmp", "sources": ["192.0.2.0/24"]},
    {"protocol": "icmp", "icmp_type": "timestamp-request"},
    {"protocol": "icmp", "icmp_type": "packet-too-big", "sources": ["2001:db8::/32"]},
]


def _cases() -> dict[str, str]:
    return {
        "redis_defaults.nft": domain.render_nftables(domain.catalog().defaults("redis").rules),
        "mixed.nft": domain.render_nftables(judge(MIXED).rules),
        "disabled.nft": domain.render_disabled(),
    }


@pytest.mark.parametrize("name", ["redis_defaults.nft", "mixed.nft", "disabled.nft"])
def test_rendering_matches_the_golden_file(name: str) -> None:
    text = _cases()[name]
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text(), f"re-run with PALISADE_UPDATE_GOLDEN=1 and review the diff of {name}"


def test_the_rendered_ruleset_has_one_table_policy_drop_and_one_rule_per_user_rule() -> None:
    rules = judge(MIXED).rules
    text = domain.render_nftables(rules)
    assert text.count("table inet palisade {") == 1
    assert "type filter hook input priority filter; policy drop;" in text
    assert "flush ruleset" not in text
    assert [line for line in text.splitlines() if line.startswith("table ")] == [
        "table inet palisade",
        "table inet palisade {",
    ]
    # A rule restricted to sources of both families is one kernel rule per family.
    user = text.split("icmpv6 type echo-request accept\n", 1)[1].splitlines()[:-2]
    assert len(user) == len(domain.nft_rules(rules)) == len(rules) + 2
    assert "\t\tip saddr { 198.51.100.7/32, 203.0.113.0/24 } tcp dport 5432 accept" in user
    assert "\t\tip6 saddr 2001:db8::/32 tcp dport 5432 accept" in user


def _nft(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """nft in a throwaway network namespace of its own (root; nothing on the host changes)."""
    return subprocess.run(["unshare", "--net", *argv], input=stdin, capture_output=True, text=True, timeout=30)


@pytest.mark.root
def test_nft_accepts_every_golden_file() -> None:
    for name in ("redis_defaults.nft", "mixed.nft", "disabled.nft"):
        checked = _nft("nft", "-c", "-f", str(GOLDEN / name))
        assert checked.returncode == 0, f"{name}: {checked.stderr}"


def _load_and_list(text: str) -> dict[str, Any]:
    script = "nft -f - && nft -j list table inet palisade"
    out = _nft("sh", "-c", script, stdin=text)
    assert out.returncode == 0, out.stderr
    listing: dict[str, Any] = json.loads(out.stdout)
    return listing


@pytest.mark.root
def test_what_the_kernel_holds_is_compared_with_the_rule_set() -> None:
    rules = judge(MIXED).rules
    listing = _load_and_list(domain.render_nftables(rules))
    domain.compare_with_kernel(listing, True, rules)  # equal

    other = judge([*MIXED[:6], {"protocol": "udp", "ports": "4243", "sources": ["203.0.113.0/24"]}, *MIXED[7:]]).rules
    with pytest.raises(domain.UnexpectedRuleset, match="udp dport 4242"):
        domain.compare_with_kernel(listing, True, other)
    fewer = rules[:-1]
    with pytest.raises(domain.UnexpectedRuleset, match="rules in the chain"):
        domain.compare_with_kernel(listing, True, fewer)
    with pytest.raises(domain.UnexpectedRuleset, match="disabled"):
        domain.compare_with_kernel(listing, False, ())
    with pytest.raises(domain.UnexpectedRuleset, match="does not exist"):
        domain.compare_with_kernel(None, True, rules)
    domain.compare_with_kernel(None, False, ())

    tampered = domain.render_nftables(rules).replace("policy drop", "policy accept")
    with pytest.raises(domain.UnexpectedRuleset, match="expected input/filter/input/0/drop"):
        domain.compare_with_kernel(_load_and_list(tampered), True, rules)
    # nft shows a set of adjacent prefixes as an address range: still the same sources.
    ranged = [SSH, {"protocol": "tcp", "ports": "5432", "sources": ["10.0.0.0/24", "10.0.1.0/25"]}]
    ranged_rules = judge(ranged).rules
    domain.compare_with_kernel(_load_and_list(domain.render_nftables(ranged_rules)), True, ranged_rules)


def test_checksums_are_of_the_rendered_text() -> None:
    text = domain.render_nftables(domain.catalog().defaults("redis").rules)
    assert domain.checksum(text).startswith("sha256:")
    assert len(domain.checksum(text)) == len("sha256:") + 64
    assert domain.checksum(text) != domain.checksum(domain.render_disabled())
    assert Rule.from_json(domain.rule("tcp", "22", sources=["10.0.0.0/8"]).to_json()) == Rule(
        "tcp", PortRange(22, 22), None, (net("10.0.0.0/8"),)
    )
