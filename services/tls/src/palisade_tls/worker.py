"""The TLS worker's definition, found by `palisade run tls`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files

import httpx

from palisade_events import WorkerRuntime, WorkerSpec
from palisade_events.cloudflare import load_cloudflare_ranges
from palisade_events.secrets import KeyConfigError
from palisade_hostctl import HostctlSettings, HostPool

from .deps import Deps
from .dns import Resolver
from .handlers import HANDLERS, jobs, refresh_gauges
from .issuance import Accounts
from .settings import TlsSettings


def spec(settings: TlsSettings | None = None, hostctl: HostctlSettings | None = None) -> WorkerSpec[Deps]:
    """Settings default to the environment (`PALISADE_TLS_*`, `PALISADE_ACME_DIRECTORY`,
    `PALISADE_HOSTCTL_*`); the SSH pool, the keys and the HTTP client are opened when the
    worker starts, and the CA is first contacted by the first issuance."""
    own = settings or TlsSettings()

    @contextlib.asynccontextmanager
    async def bootstrap(rt: WorkerRuntime[Deps]) -> AsyncIterator[Deps]:
        keys = own.keyring()
        async with rt.pool.acquire() as conn:
            in_use = {
                r["key_id"]
                for r in await conn.fetch("SELECT key_id FROM certificates UNION SELECT key_id FROM acme_accounts")
            }
        if missing := in_use - keys.key_ids:
            raise KeyConfigError(
                f"stored keys are encrypted under key ids {sorted(missing)} that are not configured;"
                " add them to PALISADE_TLS_OLD_KEYS"
            )
        pool = HostPool.from_settings(hostctl or HostctlSettings())
        http = httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=httpx.Timeout(3.0))
        deps = Deps(
            settings=own,
            hosts=pool,
            keys=keys,
            resolver=Resolver(own.dns_servers, own.dns_port, own.dns_timeout_seconds),
            cloudflare=load_cloudflare_ranges(own.cloudflare_ranges_file),
            accounts=Accounts(own, keys),
            http=http,
        )
        try:
            async with rt.pool.acquire() as conn:
                await refresh_gauges(conn)
            yield deps
        finally:
            await http.aclose()
            await pool.close()

    return WorkerSpec(
        name="tls",
        handlers=HANDLERS,
        migrations=files("palisade_tls") / "migrations",
        bootstrap=bootstrap,
        jobs=jobs(own),
    )
