"""The sshkeys worker's definition, found by `palisade run sshkeys`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files

from palisade_events import WorkerRuntime, WorkerSpec
from palisade_hostctl import HostctlSettings, HostPool

from .deps import Deps
from .handlers import HANDLERS, jobs
from .settings import SshKeysSettings


def spec(settings: SshKeysSettings | None = None, hostctl: HostctlSettings | None = None) -> WorkerSpec[Deps]:
    """Settings default to the environment (`PALISADE_SSHKEYS_*`, `PALISADE_HOSTCTL_*`);
    the SSH pool and the automation key are opened when the worker starts."""
    own = settings or SshKeysSettings()

    @contextlib.asynccontextmanager
    async def bootstrap(rt: WorkerRuntime[Deps]) -> AsyncIterator[Deps]:
        pool = HostPool.from_settings(hostctl or HostctlSettings())
        key = pool.automation_key
        kind, blob = key.export_public_key("openssh").decode().split()[:2]
        try:
            yield Deps(
                hosts=pool,
                automation_line=f"{kind} {blob}",
                automation_fingerprint=key.get_fingerprint("sha256"),
                settings=own,
            )
        finally:
            await pool.close()

    return WorkerSpec(
        name="sshkeys",
        handlers=HANDLERS,
        migrations=files("palisade_sshkeys") / "migrations",
        bootstrap=bootstrap,
        jobs=jobs(own.reconcile_every_seconds, own.reconcile_after_seconds),
    )
