"""Cloudflare's ranges from the shipped data file (used by the rate-limit and TLS workers)."""

from __future__ import annotations

import ipaddress
import json
from datetime import date
from pathlib import Path

import pytest

from palisade_events.cloudflare import cloudflare_ranges, load_cloudflare_ranges, parse_cloudflare_ranges


def test_the_shipped_file_has_the_published_ranges_and_its_date() -> None:
    ranges = cloudflare_ranges()
    assert ranges.as_of <= date.today()
    assert "cloudflare.com/ips-v4" in ranges.source
    assert len(ranges.ipv4) == 15
    assert len(ranges.ipv6) == 7
    assert ipaddress.ip_network("104.16.0.0/13") in ranges.ipv4
    assert ipaddress.ip_network("2606:4700::/32") in ranges.ipv6
    assert ranges.networks == (*ranges.ipv4, *ranges.ipv6)
    # No two ranges overlap (a sign of a typo in a refresh).
    for family in (ranges.ipv4, ranges.ipv6):
        for i, a in enumerate(family):
            assert not any(a.overlaps(b) for b in family[i + 1 :]), a


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("173.245.48.1", True),
        ("104.23.255.255", True),
        ("104.32.0.0", False),
        ("2606:4700:10::6816:1", True),
        ("::ffff:162.158.1.1", True),  # IPv4-mapped, as a dual-stack socket reports it
        ("10.213.0.1", False),
        ("2001:db8::1", False),
    ],
)
def test_contains(address: str, inside: bool) -> None:
    assert cloudflare_ranges().contains(address) is inside
    assert cloudflare_ranges().contains(ipaddress.ip_address(address)) is inside


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ipv4": ["173.245.48.1/20"]}, "host bits"),
        ({"ipv4": ["10.0.0.0/8"]}, "not a public range"),
        ({"ipv4": ["2606:4700::/32"]}, "octets"),  # an IPv6 range in the IPv4 list
        ({"ipv6": []}, "both lists"),
        ({"as_of": "yesterday"}, "isoformat"),
        ({"ipv4": [42]}, "not a string"),
    ],
)
def test_a_broken_file_is_refused(change: dict[str, object], message: str) -> None:
    data = {"as_of": "2026-01-31", "ipv4": ["173.245.48.0/20"], "ipv6": ["2606:4700::/32"], **change}
    with pytest.raises(ValueError, match=message):
        parse_cloudflare_ranges(json.dumps(data))
    with pytest.raises(ValueError, match="missing"):
        parse_cloudflare_ranges(json.dumps({"ipv4": [], "ipv6": []}))


def test_another_file_can_be_loaded(tmp_path: Path) -> None:
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps({"as_of": "2026-01-31", "ipv4": ["198.41.128.0/17"], "ipv6": ["2400:cb00::/32"]}))
    ranges = load_cloudflare_ranges(path)
    assert (ranges.as_of, ranges.contains("198.41.200.1"), ranges.contains("173.245.48.1")) == (
        date(2026, 1, 31),
        True,
        False,
    )
    assert load_cloudflare_ranges() is cloudflare_ranges()
