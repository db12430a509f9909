"""What firewall's handlers get from `bootstrap` (ctx.deps)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from palisade_hostctl import HostPool

from .domain import Catalog, Network, Rule
from .settings import FirewallSettings


@dataclass(frozen=True)
class Deps:
    hosts: HostPool
    settings: FirewallSettings
    catalog: Catalog
    automation_sources: tuple[Network, ...]
    # domain.render (enabled, rules) -> ruleset text; replaceable so tests can hand the
    # kernel a ruleset it refuses.
    render: Callable[[bool, Iterable[Rule]], str]
