"""The MFA worker's definition, found by `palisade run mfa`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files

from palisade_events import WorkerRuntime, WorkerSpec

from . import store
from .crypto import KeyConfigError
from .handlers import HANDLERS, JOBS, Deps
from .mail import Mailer
from .settings import MfaSettings


def spec(settings: MfaSettings | None = None) -> WorkerSpec[Deps]:
    """`settings` defaults to the environment, read when the worker starts (not at import)."""

    @contextlib.asynccontextmanager
    async def bootstrap(rt: WorkerRuntime[Deps]) -> AsyncIterator[Deps]:
        mfa = settings or MfaSettings()
        keys = mfa.keyring()
        async with rt.pool.acquire() as conn:
            missing = await store.key_ids_in_use(conn, rt.clock.now()) - keys.key_ids
        if missing:
            # Starting anyway would fail every login of those accounts one by one.
            raise KeyConfigError(
                f"stored secrets use key ids {sorted(missing)} that are not configured;"
                " add them to PALISADE_MFA_OLD_KEYS"
            )
        yield Deps(settings=mfa, keys=keys, mailer=Mailer(mfa.smtp()))

    return WorkerSpec(
        name="mfa",
        handlers=HANDLERS,
        migrations=files("palisade_mfa") / "migrations",
        bootstrap=bootstrap,
        jobs=JOBS,
    )
