"""The contract: every message type other systems may publish or subscribe to.

Each module holds one owner's types; `CONTRACT` is the registry over all of them.
"""

from __future__ import annotations

from ..messages import Registry
from . import accounts, backup, firewall, lifecycle, mfa, platform, ratelimit, smtp, sshkeys, tls

CONTRACT = Registry()
for _module in (platform, accounts, backup, lifecycle, mfa, smtp, sshkeys, firewall, tls, ratelimit):
    for _cls in _module.TYPES:
        CONTRACT.register(_cls)

# The workers of DESIGN.md and the port each serves /metrics and /healthz on.
METRICS_PORTS: dict[str, int] = {
    "lifecycle": 9401,
    "smtp-relay": 9402,
    "mfa": 9403,
    "sshkeys": 9404,
    "firewall": 9405,
    "tls": 9406,
    "ratelimit": 9407,
}

__all__ = ["CONTRACT", "METRICS_PORTS"]
