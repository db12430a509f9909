"""The firewall worker's definition, found by `palisade run firewall`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from importlib.resources import files

from palisade_events import WorkerRuntime, WorkerSpec
from palisade_hostctl import HostctlSettings, HostPool

from . import domain
from .deps import Deps
from .handlers import HANDLERS, jobs
from .settings import FirewallSettings


def spec(
    settings: FirewallSettings | None = None,
    hostctl: HostctlSettings | None = None,
    *,
    render: Callable[[bool, Iterable[domain.Rule]], str] = domain.render,
) -> WorkerSpec[Deps]:
    """Settings default to the environment (`PALISADE_FIREWALL_*`, `PALISADE_HOSTCTL_*`);
    the SSH pool is opened when the worker starts. `render` is the ruleset renderer
    (tests replace it to hand the kernel a ruleset it refuses)."""
    own = settings or FirewallSettings()

    @contextlib.asynccontextmanager
    async def bootstrap(rt: WorkerRuntime[Deps]) -> AsyncIterator[Deps]:
        pool = HostPool.from_settings(hostctl or HostctlSettings())
        try:
            yield Deps(
                hosts=pool,
                settings=own,
                catalog=domain.catalog(),
                automation_sources=own.automation_networks(),
                render=render,
            )
        finally:
            await pool.close()

    return WorkerSpec(
        name="firewall",
        handlers=HANDLERS,
        migrations=files("palisade_firewall") / "migrations",
        bootstrap=bootstrap,
        jobs=jobs(own.reconcile_every_seconds, own.reconcile_after_seconds),
    )
