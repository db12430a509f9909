"""Cloudflare's published edge ranges, from the data file checked into this package.

Two workers need them: the rate-limit worker trusts `CF-Connecting-IP` only from a
connection out of these ranges (otherwise anyone could choose the address they are
limited as), and the TLS worker recognises a domain whose DNS points at Cloudflare.
The file (`data/cloudflare_ranges.json`) is never fetched at run time; it says when it
was last compared with https://www.cloudflare.com/ips-v4 and /ips-v6.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from dataclasses import dataclass
from datetime import date
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class CloudflareRanges:
    as_of: date  # when the lists were last compared with Cloudflare's
    source: str
    ipv4: tuple[ipaddress.IPv4Network, ...]
    ipv6: tuple[ipaddress.IPv6Network, ...]

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return (*self.ipv4, *self.ipv6)

    def contains(self, address: str | IPAddress) -> bool:
        """Whether `address` is one of Cloudflare's (an IPv4-mapped IPv6 address counts as its IPv4)."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if isinstance(ip, ipaddress.IPv4Address):
            return any(ip in net for net in self.ipv4)
        return any(ip in net for net in self.ipv6)


def parse_cloudflare_ranges(text: str | bytes) -> CloudflareRanges:
    """The ranges from the file's JSON; ValueError when anything is off (a range that is
    not a network address, a private range, an empty list, a missing date)."""
    data: Any = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("cloudflare ranges: expected a JSON object")
    try:
        as_of = date.fromisoformat(str(data["as_of"]))
        ipv4 = tuple(_public(ipaddress.IPv4Network, v) for v in data["ipv4"])
        ipv6 = tuple(_public(ipaddress.IPv6Network, v) for v in data["ipv6"])
    except KeyError as exc:
        raise ValueError(f"cloudflare ranges: missing {exc}") from None
    if not ipv4 or not ipv6:
        raise ValueError("cloudflare ranges: both lists must have ranges")
    return CloudflareRanges(as_of=as_of, source=str(data.get("source", "")), ipv4=ipv4, ipv6=ipv6)


N = TypeVar("N", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _public(kind: type[N], value: object) -> N:
    if not isinstance(value, str):
        raise ValueError(f"cloudflare ranges: {value!r} is not a string")
    try:
        net = kind(value, strict=True)  # a host part set is a typo, not a range
    except ValueError as exc:
        raise ValueError(f"cloudflare ranges: {exc}") from None
    if not net.is_global:
        raise ValueError(f"cloudflare ranges: {value} is not a public range")
    return net


def load_cloudflare_ranges(path: Path | None = None) -> CloudflareRanges:
    """The ranges of `path`, or of the file shipped in this package."""
    if path is not None:
        return parse_cloudflare_ranges(path.read_bytes())
    return cloudflare_ranges()


@functools.cache
def cloudflare_ranges() -> CloudflareRanges:
    """The ranges shipped in this package (read once)."""
    return parse_cloudflare_ranges((files("palisade_events") / "data" / "cloudflare_ranges.json").read_bytes())


__all__ = ["CloudflareRanges", "cloudflare_ranges", "load_cloudflare_ranges", "parse_cloudflare_ranges"]
