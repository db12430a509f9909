"""Settings shared by every worker, read from `PALISADE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .clock import Clock, OffsetFileClock, SystemClock


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALISADE_", extra="ignore")

    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ URL")
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/palisade",
        description="PostgreSQL URL; the database is created if missing",
    )
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(
        None, description="Port of /metrics and /healthz; default is the worker's own port"
    )
    prefetch: int = Field(64, ge=1, le=1000, description="Unacked messages per consumer")
    db_pool_size: int = Field(10, ge=1, le=200)
    retry_delays: list[float] = Field(
        default_factory=lambda: [1.0, 10.0, 60.0],
        description="Retry ladder delays in seconds, then parked",
    )
    outbox_poll_seconds: float = Field(
        1.0, gt=0, description="How often the relay looks for rows left by other processes"
    )
    outbox_grace_seconds: float = Field(
        5.0,
        gt=0,
        description="Rows unpublished this long are the relay's poll's: their writer died or"
        " lost them (it publishes its own at once, from memory, after its commit)",
    )
    outbox_batch: int = Field(200, ge=1, le=5000)
    shutdown_grace_seconds: float = 20.0
    retention_days: int = Field(7, ge=1, description="Published outbox rows and inbox ids older than this are pruned")
    otel_exporter: Literal["none", "otlp", "console"] = "none"
    otel_endpoint: str | None = None
    clock_offset_file: Path | None = Field(
        None, description="Development/test only: shift the worker clock by the seconds in this file"
    )
    log_level: str = "INFO"

    def clock(self) -> Clock:
        if self.clock_offset_file is not None:
            return OffsetFileClock(self.clock_offset_file)
        return SystemClock()
