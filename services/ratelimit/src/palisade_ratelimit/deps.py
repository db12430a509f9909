"""What ratelimit's handlers get from `bootstrap` (ctx.deps)."""

from __future__ import annotations

from dataclasses import dataclass

from palisade_events.cloudflare import CloudflareRanges
from palisade_hostctl import HostPool

from .settings import RateLimitWorkerSettings


@dataclass(frozen=True)
class Deps:
    hosts: HostPool
    cloudflare: CloudflareRanges
    settings: RateLimitWorkerSettings
