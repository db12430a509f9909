"""The smtp-relay worker's definition, found by `palisade run smtp-relay`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files

from palisade_events import WorkerRuntime, WorkerSpec

from .handlers import HANDLERS, jobs
from .relay import Relay
from .server import smtp_listener
from .settings import RelaySettings
from .upstream import UpstreamPool

NAME = "smtp-relay"


def spec(settings: RelaySettings | None = None) -> WorkerSpec[Relay]:
    """The worker; its SMTP settings come from the environment unless given."""
    relay_settings = settings if settings is not None else RelaySettings()

    @contextlib.asynccontextmanager
    async def bootstrap(rt: WorkerRuntime[Relay]) -> AsyncIterator[Relay]:
        upstream = UpstreamPool(relay_settings)
        try:
            yield Relay(rt, relay_settings, upstream)
        finally:
            await upstream.close()

    return WorkerSpec(
        name=NAME,
        handlers=HANDLERS,
        migrations=files("palisade_smtp_relay") / "migrations",
        bootstrap=bootstrap,
        services=(smtp_listener,),
        jobs=jobs(relay_settings.quota_gauge_seconds),
    )
