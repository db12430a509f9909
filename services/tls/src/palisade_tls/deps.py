"""What the TLS worker's handlers get from `bootstrap` (ctx.deps)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

from palisade_events.cloudflare import CloudflareRanges
from palisade_events.secrets import Keyring
from palisade_hostctl import HostPool

from .dns import Resolver
from .issuance import Accounts
from .settings import TlsSettings


@dataclass
class Deps:
    settings: TlsSettings
    hosts: HostPool
    keys: Keyring
    resolver: Resolver
    cloudflare: CloudflareRanges
    accounts: Accounts
    http: httpx.AsyncClient  # the challenge self-check
    random: random.Random = field(default_factory=random.Random)  # renewal jitter
