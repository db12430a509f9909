"""The firewall rules, pure: judge a rule set, normalise it, render it for nftables,
and judge what the VM's kernel reports back.

A rule admits one protocol (tcp, udp or icmp), one port or port range (tcp/udp) or
one ICMP type (icmp, optional), from a set of source networks (any IPv4 and any
IPv6 by default). A rule set is normalised before anything else looks at it:
duplicates removed, rules that admit the same traffic from different sources or on
overlapping ports merged, rules another rule already covers dropped, and the result
sorted, so equal rule sets render to identical text (and the same checksum).

Everything refused carries its own reason, so the dashboard can say exactly what is
wrong (`RuleSetRefused.reason`, with the offending rule's position when there is one).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any, Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["tcp", "udp", "icmp"]

ANY4 = ipaddress.IPv4Network("0.0.0.0/0")
ANY6 = ipaddress.IPv6Network("::/0")
ANYWHERE: tuple[Network, ...] = (ANY4, ANY6)
MAX_RULES = 500
SSH_PORT = 22
HTTP_PORT = 80

TABLE = "inet palisade"
# The ICMP types a rule may name, and what each is called for IPv4 and IPv6 (None:
# the type does not exist in that family, so the rule admits it from the other only).
ICMP_TYPES: Mapping[str, tuple[str | None, str | None]] = {
    "echo-request": ("echo-request", "echo-request"),
    "echo-reply": ("echo-reply", "echo-reply"),
    "destination-unreachable": ("destination-unreachable", "destination-unreachable"),
    "time-exceeded": ("time-exceeded", "time-exceeded"),
    "parameter-problem": ("parameter-problem", "parameter-problem"),
    "timestamp-request": ("timestamp-request", None),
    "timestamp-reply": ("timestamp-reply", None),
    "packet-too-big": (None, "packet-too-big"),
}
_PROTOCOL_ORDER = {"tcp": 0, "udp": 1, "icmp": 2}
# ASCII digits only: `\d` and int() would read Arabic-Indic or fullwidth "22" as 22, while sources and MFA codes
# refuse look-alike digits; a port is written the one way the dashboard writes it.
_PORTS = re.compile(r"^\s*([0-9]{1,10})\s*(?:-\s*([0-9]{1,10})\s*)?$")


class RuleSetRefused(Exception):  # noqa: N818 - a decision, not an error
    """A rule set the service cannot have; `reason` is machine-readable."""

    def __init__(self, reason: str, detail: str | None = None, rule_index: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.rule_index = rule_index


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def covers(self, other: PortRange) -> bool:
        return self.first <= other.first and other.last <= self.last


@dataclass(frozen=True)
class Rule:
    """A normalised rule: sources collapsed (no network inside another), IPv4 first."""

    protocol: Protocol
    ports: PortRange | None = None  # tcp/udp
    icmp_type: str | None = None  # icmp; None admits every type
    sources: tuple[Network, ...] = ANYWHERE

    def sources_of(self, version: int) -> tuple[Network, ...]:
        return tuple(n for n in self.sources if n.version == version)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "ports": None if self.ports is None else str(self.ports),
            "icmp_type": self.icmp_type,
            "sources": [str(n) for n in self.sources],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rule:
        """A rule as stored (already validated and normalised)."""
        return rule(data["protocol"], data.get("ports"), data.get("icmp_type"), data.get("sources"))


# ---------------------------------------------------------------- judging one rule


def rule(
    protocol: str,
    ports: str | None = None,
    icmp_type: str | None = None,
    sources: Sequence[str] | None = None,
    *,
    index: int | None = None,
) -> Rule:
    """Validate one rule as the dashboard sends it; raises RuleSetRefused."""
    if protocol not in _PROTOCOL_ORDER:
        raise RuleSetRefused("invalid_protocol", f"protocol {protocol!r} is not tcp, udp or icmp", index)
    nets = parse_sources(sources, index=index)
    if protocol == "icmp":
        if ports is not None and ports.strip() != "":
            raise RuleSetRefused("ports_not_allowed_for_icmp", "icmp has types, not ports", index)
        kind = _icmp_type(icmp_type, nets, index)
        return Rule("icmp", None, kind, nets)
    if icmp_type is not None:
        raise RuleSetRefused("icmp_type_requires_icmp", f"an ICMP type on a {protocol} rule", index)
    return Rule(protocol, parse_ports(ports, index=index), None, nets)  # type: ignore[arg-type]


def parse_ports(text: str | None, *, index: int | None = None) -> PortRange:
    """One port ("22") or a range ("8000-8100"), within 1-65535, ordered."""
    if text is None or text.strip() == "":
        raise RuleSetRefused("ports_required", "tcp and udp rules need a port or a range", index)
    m = _PORTS.match(text)
    if m is None:
        raise RuleSetRefused("invalid_port", f"{text[:40]!r} is not a port or a range like 8000-8100", index)
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise RuleSetRefused("port_out_of_range", f"port {port} is outside 1-65535", index)
    if first > last:
        raise RuleSetRefused("port_range_reversed", f"{first}-{last}: the first port is above the last", index)
    return PortRange(first, last)


def parse_source(text: str, *, index: int | None = None) -> Network:
    """A CIDR or a single address; IPv6 comes out in RFC 5952 form (lower case, `::`)."""
    clean = text.strip()
    try:
        net = ipaddress.ip_network(clean, strict=True)
    except ValueError as exc:
        hint = ""
        try:
            wide = ipaddress.ip_network(clean, strict=False)
            hint = f" (did you mean {wide}?)"
        except ValueError:
            pass
        raise RuleSetRefused("invalid_cidr", f"{clean[:60]!r}: {exc}{hint}"[:300], index) from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        # The kernel sees IPv4 clients as IPv4; an IPv4-mapped source would match nothing.
        raise RuleSetRefused("invalid_cidr", f"{clean[:60]!r} is IPv4-mapped: use the IPv4 address", index)
    return net


def parse_sources(sources: Sequence[str] | None, *, index: int | None = None) -> tuple[Network, ...]:
    if sources is None:
        return ANYWHERE
    if not sources:
        raise RuleSetRefused("no_sources", "a rule must admit at least one source (absent means any)", index)
    return collapse(parse_source(s, index=index) for s in sources)


def _icmp_type(text: str | None, sources: tuple[Network, ...], index: int | None) -> str | None:
    if text is None or text.strip() in ("", "any"):
        return None
    kind = text.strip().lower()
    names = ICMP_TYPES.get(kind)
    if names is None:
        raise RuleSetRefused("invalid_icmp_type", f"unknown ICMP type {text[:32]!r}", index)
    versions = {n.version for n in sources}
    if not any(names[0 if v == 4 else 1] for v in versions):
        raise RuleSetRefused("invalid_icmp_type", f"{kind} does not exist for the rule's address family", index)
    return kind


def collapse(nets: Iterable[Network]) -> tuple[Network, ...]:
    """Networks merged (contained and adjacent ones), IPv4 first, each family sorted."""
    nets = list(nets)
    v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return (*sorted(v4), *sorted(v6))


def _within(inner: Network, outer: Sequence[Network]) -> bool:
    """`inner` inside the union of the collapsed `outer` (a collapsed union that covers
    a prefix holds one prefix containing it: siblings would have been merged)."""
    return any(inner.version == o.version and inner.subnet_of(o) for o in outer)  # type: ignore[arg-type]


# ---------------------------------------------------------------- normalising a rule set


def normalize(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """Duplicates removed, overlapping rules merged, covered rules dropped, sorted.
    Admits exactly the traffic the input admits."""
    current = frozenset(rules)
    while True:
        merged = _drop_covered(_merge_ports(_merge_sources(current)))
        if merged == current:
            return tuple(sorted(current, key=_sort_key))
        current = merged


def _merge_sources(rules: frozenset[Rule]) -> frozenset[Rule]:
    """Rules for the same traffic from different sources: one rule with all the sources."""
    groups: dict[tuple[str, PortRange | None, str | None], list[Network]] = defaultdict(list)
    for r in rules:
        groups[(r.protocol, r.ports, r.icmp_type)].extend(r.sources)
    return frozenset(Rule(p, ports, kind, collapse(nets)) for (p, ports, kind), nets in groups.items())  # type: ignore[arg-type]


def _merge_ports(rules: frozenset[Rule]) -> frozenset[Rule]:
    """tcp/udp rules from the same sources whose ranges overlap: one range. (Ranges that
    only touch stay apart, as the user entered them: 18344 and 18345 are two tools.)"""
    out: set[Rule] = set()
    groups: dict[tuple[str, tuple[Network, ...]], list[PortRange]] = defaultdict(list)
    for r in rules:
        if r.ports is None:
            out.add(r)
        else:
            groups[(r.protocol, r.sources)].append(r.ports)
    for (protocol, sources), ranges in groups.items():
        ranges.sort()
        first, last = ranges[0].first, ranges[0].last
        for pr in ranges[1:]:
            if pr.first <= last:
                last = max(last, pr.last)
            else:
                out.add(Rule(protocol, PortRange(first, last), None, sources))  # type: ignore[arg-type]
                first, last = pr.first, pr.last
        out.add(Rule(protocol, PortRange(first, last), None, sources))  # type: ignore[arg-type]
    return frozenset(out)


def _covers(outer: Rule, inner: Rule) -> bool:
    if outer.protocol != inner.protocol:
        return False
    if outer.ports is not None and inner.ports is not None:
        if not outer.ports.covers(inner.ports):
            return False
    elif outer.icmp_type is not None and outer.icmp_type != inner.icmp_type:
        return False
    return all(_within(n, outer.sources) for n in inner.sources)


def _drop_covered(rules: frozenset[Rule]) -> frozenset[Rule]:
    """Rules another rule already admits. Port rules are swept in order of their first
    port: only the earlier ones can cover a rule, and only when one of them reaches its
    last port (disjoint ranges, the usual case, cost no comparison at all)."""
    keep: set[Rule] = set()
    by_protocol: dict[str, list[Rule]] = defaultdict(list)
    for r in rules:
        by_protocol[r.protocol].append(r)
    for protocol, group in by_protocol.items():
        if protocol == "icmp":
            keep.update(r for r in group if not any(o != r and _covers(o, r) for o in group))
            continue
        # Wider ranges first among equal first ports; equal ranges were merged by
        # _merge_sources (or are, on normalize's next round).
        group.sort(key=lambda r: (r.ports.first, -r.ports.last) if r.ports else (0, 0))
        reach = 0  # the highest last port among the rules before
        for k, r in enumerate(group):
            assert r.ports is not None
            if reach < r.ports.last or not any(_covers(o, r) for o in group[:k]):
                keep.add(r)
            reach = max(reach, r.ports.last)
    return frozenset(keep)


def _sort_key(r: Rule) -> tuple[Any, ...]:
    ports = (r.ports.first, r.ports.last) if r.ports else (0, 0)
    nets = tuple((n.version, int(n.network_address), n.prefixlen) for n in r.sources)
    return (_PROTOCOL_ORDER[r.protocol], ports, r.icmp_type or "", nets)


# ---------------------------------------------------------------- judging a rule set


def admits(rules: Iterable[Rule], protocol: str, port: int, sources: Iterable[Network]) -> bool:
    """Whether `protocol`/`port` is open to every address of `sources`."""
    nets = collapse(
        n for r in rules if r.protocol == protocol and r.ports is not None and port in r.ports for n in r.sources
    )
    return all(_within(s, nets) for s in sources)


def port_80_open(enabled: bool, rules: Iterable[Rule]) -> bool:
    """80/tcp reachable from any IPv4 and any IPv6 address (what ACME HTTP-01 needs)."""
    return not enabled or admits(rules, "tcp", HTTP_PORT, ANYWHERE)


@dataclass(frozen=True)
class Decision:
    rules: tuple[Rule, ...]
    merged: int  # requested rules that were merged into others, duplicates or covered


def judge_rule_set(
    requested: Sequence[Mapping[str, Any]],
    *,
    automation_sources: Sequence[Network],
    port_80_was_open: bool,
    tls_domains: int,
    acknowledge_tls_impact: bool,
    max_rules: int = MAX_RULES,
) -> Decision:
    """Validate and normalise a rule set the user wants enforced; raises RuleSetRefused.

    Guards: at most `max_rules` rules; every rule valid; 22/tcp kept open from the
    automation network (Palisade could not reach the VM otherwise); 80/tcp not closed
    while the service has TLS domains unless the user acknowledged it (certificate
    issuance and renewal need it)."""
    if len(requested) > max_rules:
        raise RuleSetRefused("too_many_rules", f"{len(requested)} rules, at most {max_rules}")
    parsed = [
        rule(r["protocol"], r.get("ports"), r.get("icmp_type"), r.get("sources"), index=i)
        for i, r in enumerate(requested)
    ]
    rules = normalize(parsed)
    check_guards(
        rules,
        automation_sources=automation_sources,
        port_80_was_open=port_80_was_open,
        tls_domains=tls_domains,
        acknowledge_tls_impact=acknowledge_tls_impact,
    )
    return Decision(rules, len(parsed) - len(rules))


def check_guards(
    rules: Sequence[Rule],
    *,
    automation_sources: Sequence[Network],
    port_80_was_open: bool,
    tls_domains: int,
    acknowledge_tls_impact: bool,
) -> None:
    if not admits(rules, "tcp", SSH_PORT, automation_sources):
        networks = ", ".join(str(n) for n in automation_sources)
        raise RuleSetRefused(
            "automation_port_required", f"22/tcp must stay open from the automation network {networks}"
        )
    if tls_domains and port_80_was_open and not port_80_open(True, rules) and not acknowledge_tls_impact:
        raise RuleSetRefused(
            "port_80_required_for_tls",
            f"the service has {tls_domains} TLS domain(s): closing 80/tcp to any IPv4/IPv6 address stops certificate"
            " issuance and renewal (send acknowledge_tls_impact to do it anyway)",
        )


# ---------------------------------------------------------------- the catalog of defaults


@dataclass(frozen=True)
class CatalogEntry:
    software: str  # the entry's name ("default" for software the catalog does not list)
    rules: tuple[Rule, ...]


class Catalog:
    """Default rules by software, from the package's `catalog.toml`: 22/tcp always, the
    application's own ports, and the optional automation tool ports it uses."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        tools = data.get("tools", {})
        self.tool_rules = {name: _catalog_rule(t["rule"], f"tools.{name}") for name, t in tools.items()}
        self.entries: dict[str, CatalogEntry] = {}
        for name, entry in data["software"].items():
            rules = [Rule("tcp", PortRange(SSH_PORT, SSH_PORT))]
            rules += [_catalog_rule(text, f"software.{name}") for text in entry.get("ports", [])]
            for tool in entry.get("tools", []):
                if tool not in self.tool_rules:
                    raise ValueError(f"catalog: software.{name} uses unknown tool {tool!r}")
                rules.append(self.tool_rules[tool])
            self.entries[name] = CatalogEntry(name, normalize(rules))
        if "default" not in self.entries:
            raise ValueError("catalog: a [software.default] entry is required")

    def defaults(self, software: str) -> CatalogEntry:
        return self.entries.get(software) or self.entries["default"]

    @classmethod
    def from_text(cls, text: str) -> Catalog:
        return cls(tomllib.loads(text))


def _catalog_rule(text: str, where: str) -> Rule:
    protocol, _, ports = text.partition(":")
    try:
        return rule(protocol, ports or None)
    except RuleSetRefused as exc:
        raise ValueError(f"catalog: {where}: {text!r}: {exc}") from None


@cache
def catalog() -> Catalog:
    """The catalog shipped with the worker."""
    return Catalog.from_text((files("palisade_firewall") / "catalog.toml").read_text())


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class NftRule:
    """One rule of the chain as the kernel holds it: what a user rule becomes per
    address family (family None: both, no source match)."""

    family: int | None
    sources: tuple[Network, ...] | None  # None: any address of `family`
    protocol: Protocol
    ports: tuple[PortRange, ...] = ()
    icmp_type: str | None = None  # the family's own name


def nft_rules(rules: Iterable[Rule]) -> list[NftRule]:
    """A user rule is one kernel rule, or one per address family when its sources are
    not "anywhere" (nftables matches IPv4 and IPv6 sources with separate expressions)."""
    out: list[NftRule] = []
    for r in rules:
        v4, v6 = r.sources_of(4), r.sources_of(6)
        ports = (r.ports,) if r.ports is not None else ()
        if r.protocol != "icmp" and v4 == (ANY4,) and v6 == (ANY6,):
            out.append(NftRule(None, None, r.protocol, ports))
            continue
        for version, nets, any_net in ((4, v4, ANY4), (6, v6, ANY6)):
            if not nets:
                continue
            sources = None if nets == (any_net,) else nets
            kind = None
            if r.protocol == "icmp" and r.icmp_type is not None:
                kind = ICMP_TYPES[r.icmp_type][0 if version == 4 else 1]
                if kind is None:
                    continue  # the type does not exist in this family
            out.append(NftRule(version, sources, r.protocol, ports, kind))
    return out


# The chain's fixed head, before the user's rules.
BASE_RULES = (
    "ct state vmap { invalid : drop, established : accept, related : accept }",
    'iifname "lo" accept',
    # Without neighbour discovery IPv6 stops working; hop limit 255 = from the link itself.
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } ip6 hoplimit 255"
    " accept",
    "icmp type echo-request accept",
    "icmpv6 type echo-request accept",
)
HEADER = "# Managed by Palisade (firewall worker): replaced as a whole, loaded with `nft -f` as one transaction.\n"
_ENABLED = (
    "# The table is created if missing, deleted and built again in that transaction: the kernel\n"
    "# switches from the previous ruleset to this one at once, and no other table is touched.\n"
)
_DISABLED = "# The firewall is disabled: the table is deleted (if it exists) and the VM accepts everything.\n"


def _set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def render_nft_rule(r: NftRule) -> str:
    parts: list[str] = []
    if r.sources is not None:
        parts.append(f"{'ip' if r.family == 4 else 'ip6'} saddr {_set([str(n) for n in r.sources])}")
    elif r.family is not None and r.protocol != "icmp":
        parts.append(f"meta nfproto {'ipv4' if r.family == 4 else 'ipv6'}")
    if r.protocol == "icmp":
        if r.icmp_type is not None:
            parts.append(f"{'icmp' if r.family == 4 else 'icmpv6'} type {r.icmp_type}")
        else:
            parts.append(f"meta l4proto {'icmp' if r.family == 4 else 'ipv6-icmp'}")
    else:
        parts.append(f"{r.protocol} dport {_set([str(p) for p in r.ports])}")
    parts.append("accept")
    return " ".join(parts)


def render_nftables(rules: Iterable[Rule]) -> str:
    """The whole ruleset file for an enabled firewall: one table `inet palisade`, its
    input chain at filter priority with policy drop, the fixed head, then one kernel
    rule per user rule (per address family when restricted to sources)."""
    lines = [
        (HEADER + _ENABLED).rstrip("\n"),
        f"table {TABLE}",
        f"delete table {TABLE}",
        f"table {TABLE} {{",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        *(f"\t\t{line}" for line in BASE_RULES),
        *(f"\t\t{render_nft_rule(r)}" for r in nft_rules(rules)),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_disabled() -> str:
    """The ruleset file for a disabled firewall: Palisade's table deleted (if it exists)."""
    return f"{HEADER}{_DISABLED}table {TABLE}\ndelete table {TABLE}\n"


def render(enabled: bool, rules: Iterable[Rule]) -> str:
    return render_nftables(rules) if enabled else render_disabled()


def checksum(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- reading the kernel back


class UnexpectedRuleset(Exception):  # noqa: N818 - named for what happened
    """What the kernel holds is not what was rendered."""


def compare_with_kernel(listing: Mapping[str, Any] | None, enabled: bool, rules: Iterable[Rule]) -> None:
    """Compare `nft -j list table inet palisade` (None: no such table) with the rule set;
    raises UnexpectedRuleset saying what differs."""
    if not enabled:
        if listing is not None:
            raise UnexpectedRuleset("the firewall is disabled but table inet palisade exists")
        return
    if listing is None:
        raise UnexpectedRuleset("table inet palisade does not exist")
    items = listing.get("nftables", [])
    chains = [i["chain"] for i in items if "chain" in i]
    others = [k for i in items for k in i if k not in ("metainfo", "table", "chain", "rule")]
    if others:
        raise UnexpectedRuleset(f"unexpected objects in the table: {sorted(set(others))}")
    if len(chains) != 1:
        raise UnexpectedRuleset(f"expected one chain, found {len(chains)}")
    chain = chains[0]
    head = (chain.get("name"), chain.get("type"), chain.get("hook"), chain.get("prio"), chain.get("policy"))
    if head != ("input", "filter", "input", 0, "drop"):
        raise UnexpectedRuleset(f"chain is {head}, expected input/filter/input/0/drop")
    kernel = [i["rule"]["expr"] for i in items if "rule" in i]
    expected = nft_rules(rules)
    if len(kernel) != len(BASE_RULES) + len(expected):
        raise UnexpectedRuleset(f"{len(kernel)} rules in the chain, expected {len(BASE_RULES) + len(expected)}")
    for position, (exprs, want) in enumerate(zip(kernel[len(BASE_RULES) :], expected, strict=True)):
        got = parse_kernel_rule(exprs)
        if _canonical(got) != _canonical(want):
            raise UnexpectedRuleset(
                f"rule {position}: kernel has {render_nft_rule(got)!r}, expected {render_nft_rule(want)!r}"
            )


def _canonical(r: NftRule) -> tuple[Any, ...]:
    ports = _merge_ranges(r.ports)
    return (r.family, None if r.sources is None else collapse(r.sources), r.protocol, ports, r.icmp_type)


def _merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    out: list[PortRange] = []
    for pr in sorted(ranges):
        if out and pr.first <= out[-1].last + 1:
            out[-1] = PortRange(out[-1].first, max(out[-1].last, pr.last))
        else:
            out.append(pr)
    return tuple(out)


def parse_kernel_rule(exprs: Sequence[Mapping[str, Any]]) -> NftRule:
    """The user-rule shapes Palisade renders, from nft's JSON; anything else is unexpected."""
    family: int | None = None
    sources: tuple[Network, ...] | None = None
    protocol: str | None = None
    ports: tuple[PortRange, ...] = ()
    icmp_type: str | None = None
    verdict = None
    for e in exprs:
        if "accept" in e:
            verdict = "accept"
            continue
        m = e.get("match")
        if m is None or m.get("op") != "==":
            raise UnexpectedRuleset(f"unexpected expression {e}")
        left, right = m["left"], m["right"]
        if "meta" in left:
            key = left["meta"]["key"]
            if key == "nfproto" and right in ("ipv4", "ipv6"):
                family = 4 if right == "ipv4" else 6
            elif key == "l4proto" and right in ("icmp", "ipv6-icmp"):
                protocol, family = "icmp", 4 if right == "icmp" else 6
            else:
                raise UnexpectedRuleset(f"unexpected meta match {m}")
        elif "payload" in left:
            proto, field = left["payload"]["protocol"], left["payload"]["field"]
            if field == "saddr" and proto in ("ip", "ip6"):
                family = 4 if proto == "ip" else 6
                sources = _kernel_networks(right)
            elif field == "dport" and proto in ("tcp", "udp"):
                protocol, ports = proto, _kernel_ports(right)
            elif field == "type" and proto in ("icmp", "icmpv6"):
                protocol, family, icmp_type = "icmp", 4 if proto == "icmp" else 6, str(right)
            else:
                raise UnexpectedRuleset(f"unexpected payload match {m}")
        else:
            raise UnexpectedRuleset(f"unexpected match {m}")
    if verdict != "accept" or protocol is None:
        raise UnexpectedRuleset(f"not an accept rule of a protocol: {exprs}")
    return NftRule(family, sources, protocol, ports, icmp_type)  # type: ignore[arg-type]


def _elements(value: Any) -> list[Any]:
    if isinstance(value, dict) and "set" in value:
        return list(value["set"])
    return [value]


def _kernel_networks(value: Any) -> tuple[Network, ...]:
    nets: list[Network] = []
    for el in _elements(value):
        if isinstance(el, str):
            nets.append(ipaddress.ip_network(el))
        elif "prefix" in el:
            nets.append(ipaddress.ip_network(f"{el['prefix']['addr']}/{el['prefix']['len']}"))
        elif "range" in el:
            low, high = (ipaddress.ip_address(a) for a in el["range"])
            nets.extend(ipaddress.summarize_address_range(low, high))
        else:
            raise UnexpectedRuleset(f"unexpected address element {el}")
    return collapse(nets)


def _kernel_ports(value: Any) -> tuple[PortRange, ...]:
    out = []
    for el in _elements(value):
        if isinstance(el, int):
            out.append(PortRange(el, el))
        elif isinstance(el, dict) and "range" in el:
            out.append(PortRange(int(el["range"][0]), int(el["range"][1])))
        else:
            raise UnexpectedRuleset(f"unexpected port element {el}")
    return tuple(out)
