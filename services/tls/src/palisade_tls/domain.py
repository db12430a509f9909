"""The TLS worker's pure rules: which domains are acceptable, what DNS must say, when to
check again, when to renew, and the nginx server blocks. No I/O here."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import idna

from palisade_events.cloudflare import CloudflareRanges

MAX_DOMAIN_LENGTH = 253

# The contract's Hostname: LDH labels of 1-63 characters, dot-separated (A-label form).
HOSTNAME = re.compile(r"^([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

CLOUDFLARE_GUIDANCE = (
    "This domain resolves to Cloudflare's proxy (orange cloud), so its certificate cannot be issued and a"
    " proxied connection without further setup fails. Set the DNS record to 'DNS only' (grey cloud); once"
    " the certificate is issued you may turn the proxy back on with the SSL/TLS encryption mode"
    " 'Full (strict)' (for the whole domain, or a Configuration Rule for this hostname)."
)


# ------------------------------------------------------------------ domain checks


class DomainRefused(Exception):  # noqa: N818 - a decision, not an error
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Domain:
    name: str  # A-label form, lowercase, no trailing dot
    display: str  # Unicode form for people


def _bad_character(c: str) -> bool:
    if c.isascii():
        return not (c.isalnum() or c in ".-")
    # Unicode letters are IDNA's business; separators, controls and format characters
    # (line and paragraph separators, zero-width joiners, bidi marks) are never part of a name.
    return unicodedata.category(c)[0] in ("C", "Z")


def check_domain(raw: str, *, platform_domains: Iterable[str]) -> Domain:
    """A domain a user may add, in A-label form; raises DomainRefused with the reason.

    Each refusal has its own reason, checked in this order: domain_empty, domain_is_ip,
    domain_wildcard, domain_invalid_characters (anything that could end or extend an nginx
    directive: whitespace, `;`, braces, quotes, `$`, `#`, `/`, controls...), domain_too_long,
    domain_idna_invalid, domain_not_fully_qualified, domain_platform_reserved.
    """
    text = raw.strip(" \t")
    if not text:
        raise DomainRefused("domain_empty")
    if _is_ip_literal(text):
        raise DomainRefused("domain_is_ip")
    if "*" in text:
        raise DomainRefused("domain_wildcard")
    if any(_bad_character(c) for c in text):
        raise DomainRefused("domain_invalid_characters")
    if text.endswith("."):  # the fully qualified form of the same name
        text = text[:-1]
    if len(text) > MAX_DOMAIN_LENGTH:
        raise DomainRefused("domain_too_long")
    name = _to_a_label(text)
    if len(name) > MAX_DOMAIN_LENGTH:
        raise DomainRefused("domain_too_long")
    labels = name.split(".")
    if len(labels) < 2:
        raise DomainRefused("domain_not_fully_qualified")
    if labels[-1].isdigit():  # 1.2.3 and friends: an address to a browser, never a public name
        raise DomainRefused("domain_is_ip")
    if not HOSTNAME.match(name):
        raise DomainRefused("domain_idna_invalid")
    for reserved in platform_domains:
        if name == reserved or name.endswith("." + reserved):
            raise DomainRefused("domain_platform_reserved")
    return Domain(name, display_name(name))


def _is_ip_literal(text: str) -> bool:
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    candidate = candidate.removesuffix(".")
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _to_a_label(text: str) -> str:
    try:
        mapped = idna.uts46_remap(text, std3_rules=True, transitional=False)
        labels = mapped.split(".")
        if any(not label for label in labels):
            raise DomainRefused("domain_idna_invalid")
        return ".".join(idna.alabel(label).decode("ascii") for label in labels)
    except (idna.IDNAError, UnicodeError, ValueError):
        raise DomainRefused("domain_idna_invalid") from None


def display_name(name: str) -> str:
    """The Unicode form of an A-label name (the name itself when it has no IDN label)."""
    try:
        return idna.decode(name)
    except (idna.IDNAError, UnicodeError, ValueError):
        return name


def platform_hostname(hostname: str) -> str:
    return hostname.strip(".").lower()


# ------------------------------------------------------------------ DNS


@dataclass(frozen=True)
class DnsRecord:
    type: Literal["CNAME", "A", "AAAA"]
    name: str
    value: str


def expected_records(domain: str, hostname: str, ipv4: str | None, ipv6: str | None) -> list[DnsRecord]:
    """What the user should create: a CNAME to the service hostname (preferred: it survives a
    move of the service), or else A/AAAA records to its addresses."""
    records = [DnsRecord("CNAME", domain, hostname)]
    if ipv4:
        records.append(DnsRecord("A", domain, ipv4))
    if ipv6:
        records.append(DnsRecord("AAAA", domain, ipv6))
    return records


@dataclass(frozen=True)
class DnsAnswer:
    """What a lookup of one domain found."""

    cname: str | None = None  # the domain's own CNAME target, lowercase, no trailing dot
    addresses: tuple[str, ...] = ()  # A and AAAA, CNAMEs followed
    error: str | None = None  # the lookup failed (timeout, SERVFAIL); no records is not an error


@dataclass(frozen=True)
class DnsVerdict:
    outcome: Literal["ok", "proxied", "pending"]
    via: Literal["cname", "address"] | None = None
    reason: Literal["no_records", "points_elsewhere", "lookup_failed"] | None = None
    found: tuple[str, ...] = ()


def judge_dns(
    answer: DnsAnswer,
    *,
    hostname: str,
    service_addresses: Iterable[str],
    cloudflare: CloudflareRanges,
) -> DnsVerdict:
    """Whether a domain points at the service: a CNAME to its hostname, or addresses that are
    all the service's (one stray AAAA is enough for a CA to validate against the wrong host)."""
    found = tuple(dict.fromkeys(([answer.cname] if answer.cname else []) + list(answer.addresses)))
    if answer.cname is not None and answer.cname == platform_hostname(hostname):
        return DnsVerdict("ok", via="cname", found=found)
    if not answer.addresses:
        reason: Literal["no_records", "lookup_failed"] = "lookup_failed" if answer.error else "no_records"
        return DnsVerdict("pending", reason=reason, found=found)
    addresses = {_normal_ip(a) for a in answer.addresses}
    if any(cloudflare.contains(a) for a in addresses):
        return DnsVerdict("proxied", found=tuple(sorted(addresses)))
    if addresses <= {_normal_ip(a) for a in service_addresses if a}:
        return DnsVerdict("ok", via="address", found=found)
    return DnsVerdict("pending", reason="points_elsewhere", found=found)


def _normal_ip(address: str) -> str:
    return str(ipaddress.ip_address(address))


def dns_recheck_delay(checks_done: int, initial: float, maximum: float) -> timedelta:
    """1 minute after the first check, doubling, at most 1 hour (defaults)."""
    return timedelta(seconds=min(initial * 2 ** min(checks_done, 32), maximum))


# ------------------------------------------------------------------ issuance timing


def retry_delay(failures: int, initial: float, maximum: float) -> timedelta:
    """After the n-th consecutive failure: 1 minute, 2, 4, ... at most 6 hours (defaults)."""
    return timedelta(seconds=min(initial * 2 ** min(max(failures - 1, 0), 32), maximum))


def next_attempt_after_failure(
    now: datetime, failures: int, retry_after: datetime | None, initial: float, maximum: float
) -> datetime:
    """The back-off, but never before the CA said to come back."""
    at = now + retry_delay(failures, initial, maximum)
    return max(at, retry_after) if retry_after is not None else at


def renewal_time(
    issued_at: datetime,
    not_before: datetime,
    not_after: datetime,
    *,
    left: float,
    jitter: float,
    draw: float,
) -> datetime:
    """When a third (`left`) of the certificate's lifetime remains, up to `jitter` of the
    lifetime earlier (`draw` in [0, 1) picks where), so that many certificates issued
    together are not renewed together.

    Measured from when the worker obtained the certificate, by the worker's clock: a
    certificate is never "due" the moment it arrives because the worker's clock and the
    CA's disagree (with the CA's clock this is `not_after - left * lifetime`)."""
    lifetime = not_after - not_before
    return issued_at + lifetime * (1 - left) - lifetime * (jitter * draw)


# ------------------------------------------------------------------ nginx


@dataclass(frozen=True)
class ServerBlocks:
    """Everything the server blocks of one service depend on."""

    service_id: str
    https_names: tuple[str, ...]  # on the served certificate, and still the service's
    http_names: tuple[str, ...]  # the service's, waiting for a certificate
    serial: str | None
    certificate: str | None  # VM path of the full chain
    certificate_key: str | None
    acme_webroot: str
    upstream: str
    snippet: str | None  # VM path of the rate-limit worker's per-server snippet


def include_if_present(path: str) -> str:
    """An include of `path` that is no error when the file is missing: nginx treats a pattern
    with `[` as a glob, and a glob may match nothing (`.../x.con[f]` matches only x.conf)."""
    head, last = path[:-1], path[-1]
    return f"{head}[{last}]"


_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")
_SAFE_UPSTREAM = re.compile(r"^https?://[A-Za-z0-9.\[\]:-]+(:[0-9]{1,5})?(/[A-Za-z0-9._/-]*)?$")


def _check_inputs(blocks: ServerBlocks) -> None:
    # Names were checked when they were accepted; this guards the renderer itself, so that
    # nothing it is given can end a directive early.
    for name in (*blocks.https_names, *blocks.http_names):
        if not HOSTNAME.match(name):
            raise ValueError(f"not a hostname: {name!r}")
    for path in (blocks.certificate, blocks.certificate_key, blocks.acme_webroot, blocks.snippet):
        if path is not None and not _SAFE_PATH.match(path):
            raise ValueError(f"unsafe path for nginx: {path!r}")
    if not _SAFE_UPSTREAM.match(blocks.upstream):
        raise ValueError(f"unsafe upstream for nginx: {blocks.upstream!r}")
    if blocks.https_names and (blocks.certificate is None or blocks.certificate_key is None):
        raise ValueError("HTTPS names need a certificate")


def _names(names: Sequence[str]) -> str:
    return " ".join(names)


def render_server_blocks(blocks: ServerBlocks) -> str:
    """The service's nginx server blocks (included at http level).

    - port 80 for names on the certificate: the ACME challenge path from the web root, every
      other request redirected to HTTPS;
    - port 80 for names still waiting for a certificate: the challenge path, and the
      application over plain HTTP meanwhile (as the VM's default server would serve it);
    - port 443 for the names on the certificate, proxying to the application.
    The rate-limit worker's snippet is included where the application is served (not on the
    challenge path, which the CA must always reach), when the file exists.
    """
    _check_inputs(blocks)
    challenge = [
        "    location ^~ /.well-known/acme-challenge/ {",
        f"        root {blocks.acme_webroot};",
        "        default_type text/plain;",
        "        try_files $uri =404;",
        "    }",
    ]
    proxy = [
        "    location / {",
        *([f"        include {include_if_present(blocks.snippet)};"] if blocks.snippet else []),
        f"        proxy_pass {blocks.upstream};",
        "        proxy_http_version 1.1;",
        "        proxy_set_header Host $host;",
        "        proxy_set_header X-Real-IP $remote_addr;",
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
        "        proxy_set_header Upgrade $http_upgrade;",
        "        proxy_set_header Connection $palisade_tls_connection;",
        "    }",
    ]
    listen_80 = ["    listen 80;", "    listen [::]:80;"]
    out = [
        f"# Managed by Palisade (tls worker) for service {blocks.service_id}. Do not edit: it is rewritten.",
        f"# Certificate: {blocks.serial or 'none yet'}",
        "",
        "map $http_upgrade $palisade_tls_connection {",
        "    default upgrade;",
        "    '' close;",
        "}",
    ]
    if blocks.https_names:
        out += [
            "",
            "server {",
            *listen_80,
            f"    server_name {_names(blocks.https_names)};",
            "",
            *challenge,
            "",
            "    location / {",
            "        return 301 https://$host$request_uri;",
            "    }",
            "}",
        ]
    if blocks.http_names:
        out += [
            "",
            "# No certificate for these names yet.",
            "server {",
            *listen_80,
            f"    server_name {_names(blocks.http_names)};",
            "",
            *challenge,
            "",
            *proxy,
            "}",
        ]
    if blocks.https_names:
        out += [
            "",
            "server {",
            "    listen 443 ssl http2;",
            "    listen [::]:443 ssl http2;",
            f"    server_name {_names(blocks.https_names)};",
            "",
            f"    ssl_certificate {blocks.certificate};",
            f"    ssl_certificate_key {blocks.certificate_key};",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
            "    ssl_prefer_server_ciphers off;",
            "    ssl_session_timeout 1d;",
            "    ssl_session_cache shared:palisade_tls:10m;",
            "    ssl_session_tickets off;",
            "",
            *proxy,
            "}",
        ]
    return "\n".join(out) + "\n"
