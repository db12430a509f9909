"""A service's web policy, pure: the rate limit and output cache settings, and the nginx
configuration they render to.

Two files on the VM, both owned by this worker:

- the http-level file (`conf.d/palisade-ratelimit.conf`): the client's real address
  (`CF-Connecting-IP`, trusted only from Cloudflare's ranges), the request zone, the
  cache path, the maps the server directives use, and a default server on port 80
  that proxies to the application (so the policy holds before any TLS server block
  exists, and for requests no server name matches);
- the per-server snippet (`snippets/palisade-ratelimit.conf`) that the TLS worker's
  server blocks include: `limit_req`, the 429 and its Retry-After, the cache.

Every name the snippet uses (zones, variables) is declared by the http-level file
whatever the policy, so any snippet ever written stays valid against any http-level
file of the same service: the two files can be replaced one after the other.

Burst semantics (measured with nginx 1.22): nginx admits `burst + 1` rapid requests
(the first, then `burst` more), so an allowance of exactly n rapid requests is
`burst=n-1 nodelay`; after that one more request is admitted every period/n.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Literal

from palisade_events.cloudflare import CloudflareRanges
from palisade_events.contract.ratelimit import (
    ACME_CHALLENGE_PREFIX,
    MAX_REQUESTS,
    MAX_TTL_SECONDS,
    NGINX_HTTP_CONF,
    NGINX_SERVER_SNIPPET,
)
from palisade_hostctl import Layout

Per = Literal["second", "minute"]
PERIOD_SECONDS: dict[str, int] = {"second": 1, "minute": 60}
CACHE_DIR = "/var/cache/nginx/palisade-ratelimit"
ZONE_SIZE = "10m"  # ~160,000 client addresses (64 bytes of state each)
CACHE_KEYS_ZONE_SIZE = "10m"  # ~80,000 cached responses
CACHED_STATUSES = "200 301 302 404"

# Service ids are `[A-Za-z0-9][A-Za-z0-9_.-]*` (the contract); nothing else may reach a directive.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UPSTREAM = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$")
_SIZE = re.compile(r"^[0-9]{1,6}[kmg]?$")


@dataclass(frozen=True)
class RateLimit:
    requests: int = 150
    per: Per = "minute"
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must be 1-{MAX_REQUESTS}: {self.requests}")
        if self.per not in PERIOD_SECONDS:
            raise ValueError(f"per must be second or minute: {self.per!r}")

    @property
    def burst(self) -> int:
        """nginx admits burst + 1 rapid requests, so n of them need burst = n - 1."""
        return self.requests - 1

    @property
    def refill_seconds(self) -> float:
        """After the allowance is spent, one more request passes this often."""
        return PERIOD_SECONDS[self.per] / self.requests

    @property
    def retry_after_seconds(self) -> int:
        """Retry-After of a 429: when the next request will pass (whole seconds, at least 1)."""
        return max(1, math.ceil(self.refill_seconds))

    @property
    def nginx_rate(self) -> str:
        return f"{self.requests}r/{'s' if self.per == 'second' else 'm'}"

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        return (
            f"{self.requests} requests per {self.per} per client IP: {self.requests} at once,"
            f" then one more every {_seconds(self.refill_seconds)} s"
        )


@dataclass(frozen=True)
class OutputCache:
    ttl_seconds: int = 3
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"ttl_seconds must be 0-{MAX_TTL_SECONDS}: {self.ttl_seconds}")

    @property
    def active(self) -> bool:
        return self.enabled and self.ttl_seconds > 0

    def describe(self) -> str:
        if not self.active:
            return "off"
        return f"GET and HEAD responses reused for {self.ttl_seconds} s"


@dataclass(frozen=True)
class WebPolicy:
    rate_limit: RateLimit = field(default_factory=RateLimit)
    output_cache: OutputCache = field(default_factory=OutputCache)


DEFAULT_POLICY = WebPolicy()  # the seed: 150 requests per minute per IP; GET cached 3 seconds


@dataclass(frozen=True)
class Site:
    """What the configuration needs to know besides the policy: the service, where its
    application listens on the VM, and where the files go (from the host's layout)."""

    service_id: str
    upstream: str  # host:port of the application, seen from the VM's nginx
    ipv6: bool  # the service has an IPv6 address: the default server listens on [::]:80 too
    http_conf_path: str
    snippet_path: str
    cache_dir: str
    cache_max_size: str = "256m"

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.service_id):
            raise ValueError(f"service id not usable as an nginx zone name: {self.service_id!r}")
        if not _UPSTREAM.match(self.upstream):
            raise ValueError(f"upstream must be host:port: {self.upstream!r}")
        if not _SIZE.match(self.cache_max_size):
            raise ValueError(f"cache size must be like 256m: {self.cache_max_size!r}")
        for path in (self.http_conf_path, self.snippet_path, self.cache_dir):
            if not posixpath.isabs(path) or not re.fullmatch(r"[A-Za-z0-9_./-]+", path):
                raise ValueError(f"unusable path in nginx configuration: {path!r}")

    @property
    def limit_zone(self) -> str:
        return self.service_id

    @property
    def cache_zone(self) -> str:
        return f"{self.service_id}-cache"


def site_for(service_id: str, layout: Layout, *, upstream: str, ipv6: bool, cache_max_size: str = "256m") -> Site:
    """The service's site on a VM with `layout` (real VM paths, or a test VM's)."""
    return Site(
        service_id=service_id,
        upstream=upstream,
        ipv6=ipv6,
        http_conf_path=layout.path(NGINX_HTTP_CONF),
        snippet_path=layout.path(NGINX_SERVER_SNIPPET),
        cache_dir=layout.path(CACHE_DIR),
        cache_max_size=cache_max_size,
    )


@dataclass(frozen=True)
class RenderedConfig:
    http_conf: str
    server_snippet: str

    @property
    def checksum(self) -> str:
        digest = hashlib.sha256()
        for text in (self.http_conf, self.server_snippet):
            data = text.encode()
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
        return digest.hexdigest()


def render(policy: WebPolicy, site: Site, cloudflare: CloudflareRanges) -> RenderedConfig:
    """Both files, as text. Pure: the same inputs give the same bytes."""
    server = _server_directives(policy, site)
    return RenderedConfig(
        http_conf=_http_conf(policy, site, cloudflare, server),
        server_snippet=_snippet(site, server),
    )


def _header(site: Site, what: str, policy: WebPolicy) -> list[str]:
    return [
        f"# Managed by Palisade (ratelimit) for service {site.service_id}: {what}.",
        "# Rewritten on every change of the service's web policy; edits here are lost.",
        f"# Rate limit: {policy.rate_limit.describe()}.",
        f"# Output cache: {policy.output_cache.describe()}.",
    ]


def _http_conf(policy: WebPolicy, site: Site, cloudflare: CloudflareRanges, server: list[str]) -> str:
    limit = policy.rate_limit
    acme = ACME_CHALLENGE_PREFIX.replace(".", r"\.")
    lines = [
        *_header(site, "the http-level zones, cache path, real client address and default server", policy),
        "",
        f"# The client's address: CF-Connecting-IP, but only on connections from Cloudflare's ranges"
        f" (as of {cloudflare.as_of.isoformat()}),",
        "# so that visitors behind Cloudflare do not share one limit and nobody else can choose theirs.",
        *(f"set_real_ip_from {net};" for net in cloudflare.networks),
        "real_ip_header CF-Connecting-IP;",
        "",
        f"# ACME HTTP-01 challenges ({ACME_CHALLENGE_PREFIX}) are never limited nor cached,",
        "# whichever location serves them: an empty key is not counted.",
        "map $uri $palisade_rl_acme {",
        "    default 0;",
        f"    ~^{acme} 1;",
        "}",
        "map $palisade_rl_acme $palisade_rl_key {",
        "    default $binary_remote_addr;",
        '    1 "";',
        "}",
        f"limit_req_zone $palisade_rl_key zone={site.limit_zone}:{ZONE_SIZE} rate={limit.nginx_rate};",
        "",
        "# Retry-After on the 429s nginx itself answers (not on an application's own 429).",
        'map "$status:$upstream_status" $palisade_rl_retry_after {',
        '    default "";',
        f'    "429:" {limit.retry_after_seconds};',
        "}",
        "",
        "# The output cache: not for requests with Authorization or cookies, nor the ACME path;",
        "# not storing what the application marks private, no-store or no-cache.",
        f"proxy_cache_path {site.cache_dir} levels=1:2 keys_zone={site.cache_zone}:{CACHE_KEYS_ZONE_SIZE}"
        f" max_size={site.cache_max_size} inactive=10m use_temp_path=off;",
        'map "$palisade_rl_acme:$http_authorization:$http_cookie" $palisade_rl_cache_skip {',
        "    default 1;",
        '    "0::" 0;',
        "}",
        "map $upstream_http_cache_control $palisade_rl_private {",
        "    default 0;",
        "    ~*(private|no-store|no-cache) 1;",
        "}",
        "",
        "# The default server on port 80: the application behind this policy, for requests no",
        "# other server block names (and for every request until the TLS worker's exist).",
        "server {",
        "    listen 80 default_server;",
    ]
    if site.ipv6:
        lines.append("    listen [::]:80 default_server;")
    lines += [
        "",
        *(f"    {line}" if line else "" for line in server),
        "",
        "    location / {",
        f"        proxy_pass http://{site.upstream};",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        "        proxy_set_header Host $host;",
        "        proxy_set_header X-Real-IP $remote_addr;",
        "        proxy_set_header X-Forwarded-For $remote_addr;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _server_directives(policy: WebPolicy, site: Site) -> list[str]:
    """What every server of the service carries (the snippet; inlined in the default server)."""
    limit, cache = policy.rate_limit, policy.output_cache
    lines = [f"# Rate limit: {limit.describe()}."]
    if limit.enabled:
        lines += [
            f"limit_req zone={site.limit_zone} burst={limit.burst} nodelay;",
            "limit_req_status 429;",
            "add_header Retry-After $palisade_rl_retry_after always;",
        ]
    lines += ["", f"# Output cache: {cache.describe()}."]
    if cache.active:
        lines += [
            f"proxy_cache {site.cache_zone};",
            "proxy_cache_key $scheme$host$request_uri;",
            "proxy_cache_methods GET HEAD;",
            f"proxy_cache_valid {CACHED_STATUSES} {cache.ttl_seconds}s;",
            "proxy_ignore_headers Cache-Control Expires X-Accel-Expires;",
            "proxy_cache_bypass $palisade_rl_cache_skip;",
            "proxy_no_cache $palisade_rl_cache_skip $palisade_rl_private;",
            "proxy_cache_lock on;",
            "proxy_cache_use_stale updating;",
            "add_header X-Cache-Status $upstream_cache_status always;",
        ]
    else:
        lines.append("proxy_cache off;")
    return lines


def _snippet(site: Site, server: list[str]) -> str:
    lines = [
        f"# Managed by Palisade (ratelimit) for service {site.service_id}: the per-server snippet.",
        "# Included in every server {} of the service (the TLS worker's blocks), at server level or in",
        "# the location that proxies to the application.",
        "# Rewritten on every change of the service's web policy; edits here are lost.",
        "",
        *server,
    ]
    return "\n".join(lines) + "\n"


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")
