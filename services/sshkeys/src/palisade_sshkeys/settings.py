"""sshkeys settings, from `PALISADE_SSHKEYS_*` (SSH itself: `PALISADE_HOSTCTL_*`, see palisade-hostctl)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SshKeysSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALISADE_SSHKEYS_", extra="ignore")

    max_keys_per_service: int = Field(100, ge=1, le=1000)
    reconcile_after_seconds: float = Field(
        300.0,
        gt=0,
        description="A write still due this long after it was asked for (its message was parked after the retry"
        " ladder) is asked for again",
    )
    reconcile_every_seconds: float = Field(60.0, gt=0, description="How often to look for such writes")
