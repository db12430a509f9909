"""firewall settings, from `PALISADE_FIREWALL_*` (SSH itself: `PALISADE_HOSTCTL_*`, see palisade-hostctl)."""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .domain import ANYWHERE, Network


class FirewallSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALISADE_FIREWALL_", extra="ignore")

    automation_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [str(n) for n in ANYWHERE],
        description="The automation network: where Palisade's SSH comes from. While a firewall is enabled,"
        " 22/tcp must stay open from all of it. Comma-separated CIDRs or a JSON list; default any IPv4 and any IPv6",
    )
    max_rules: int = Field(500, ge=1, le=500, description="Rules per service")
    reconcile_after_seconds: float = Field(
        300.0,
        gt=0,
        description="An apply still due this long after it was asked for (its message was parked after the retry"
        " ladder) is asked for again",
    )
    reconcile_every_seconds: float = Field(60.0, gt=0, description="How often to look for such applies")

    @field_validator("automation_sources", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
        return value

    @field_validator("automation_sources")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one automation network")
        return [str(ipaddress.ip_network(v.strip(), strict=True)) for v in value]

    def automation_networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(v) for v in self.automation_sources)
