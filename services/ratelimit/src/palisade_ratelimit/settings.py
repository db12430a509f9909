"""ratelimit settings, from `PALISADE_RATELIMIT_*` (SSH itself: `PALISADE_HOSTCTL_*`, see palisade-hostctl)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RateLimitWorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALISADE_RATELIMIT_", extra="ignore")

    upstream: str = Field(
        "127.0.0.1:8080",
        pattern=r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$",
        description="host:port where a service's application listens, seen from its VM's nginx; the default"
        " server on port 80 proxies there",
    )
    cache_max_size: str = Field(
        "256m", pattern=r"^[0-9]{1,6}[kmg]?$", description="Most disk the output cache may use on a VM"
    )
    reconcile_after_seconds: float = Field(
        300.0,
        gt=0,
        description="An apply still due this long after it was asked for (its message was parked after the retry"
        " ladder) is asked for again",
    )
    reconcile_every_seconds: float = Field(60.0, gt=0, description="How often to look for such applies")
