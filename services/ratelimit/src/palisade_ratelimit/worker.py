"""The ratelimit worker's definition, found by `palisade run ratelimit`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files

from palisade_events import WorkerRuntime, WorkerSpec
from palisade_events.cloudflare import cloudflare_ranges
from palisade_hostctl import HostctlSettings, HostPool

from .deps import Deps
from .handlers import HANDLERS, jobs
from .settings import RateLimitWorkerSettings


def spec(settings: RateLimitWorkerSettings | None = None, hostctl: HostctlSettings | None = None) -> WorkerSpec[Deps]:
    """Settings default to the environment (`PALISADE_RATELIMIT_*`, `PALISADE_HOSTCTL_*`);
    the SSH pool is opened when the worker starts."""
    own = settings or RateLimitWorkerSettings()

    @contextlib.asynccontextmanager
    async def bootstrap(rt: WorkerRuntime[Deps]) -> AsyncIterator[Deps]:
        pool = HostPool.from_settings(hostctl or HostctlSettings())
        try:
            yield Deps(hosts=pool, cloudflare=cloudflare_ranges(), settings=own)
        finally:
            await pool.close()

    return WorkerSpec(
        name="ratelimit",
        handlers=HANDLERS,
        migrations=files("palisade_ratelimit") / "migrations",
        bootstrap=bootstrap,
        jobs=jobs(own.reconcile_every_seconds, own.reconcile_after_seconds),
    )
