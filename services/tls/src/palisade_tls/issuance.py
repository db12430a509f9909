"""One certificate order, end to end: the ACME account, the challenge files on the VM, the
self-check, the CA. What to order and what to do with the outcome is the handler's business."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime

import httpx

from palisade_events.db import Connection
from palisade_events.secrets import Keyring
from palisade_hostctl import Host

from . import store
from .acme_client import AccountGone, AcmeSession, Challenge, Issued, new_private_key
from .dns import Resolver
from .settings import TlsSettings
from .vm import VmPaths, place_challenges, remove_challenges

log = logging.getLogger("palisade.tls")


def account_aad(directory_url: str) -> bytes:
    return f"palisade-tls/acme-account/{directory_url}".encode()


def certificate_key_aad(service_id: str, serial: str) -> bytes:
    return f"palisade-tls/certificate-key/{service_id}/{serial}".encode()


class Accounts:
    """The worker's ACME account at the configured CA: created once (its key encrypted at
    rest), then loaded. Creation happens under an advisory lock inside the caller's
    transaction, so replicas never create two."""

    def __init__(self, settings: TlsSettings, keys: Keyring) -> None:
        self.settings = settings
        self.keys = keys
        self._known: tuple[bytes, str] | None = None  # (key, account URL) once loaded

    def _session(self, key_pem: bytes, uri: str | None) -> AcmeSession:
        return AcmeSession(
            self.settings.acme_directory,
            key_pem,
            uri,
            ca_bundle=self.settings.acme_ca_bundle,
            timeout=self.settings.acme_request_timeout_seconds,
        )

    async def session(self, db: Connection, now: datetime) -> AcmeSession:
        if self._known is not None:
            return self._session(*self._known)
        url = self.settings.acme_directory
        account = await store.get_account(db, url)
        if account is None:
            account = await store.get_account(db, url, lock=True)
        if account is not None and account.account_uri:
            key_pem = self.keys.decrypt(account.key_id, account.key_ciphertext, account_aad(url))
            self._known = (key_pem, account.account_uri)
            return self._session(key_pem, account.account_uri)
        key_pem = new_private_key()
        session = self._session(key_pem, None)
        try:
            uri = await session.register(self.settings.acme_contact_email)
        except BaseException:
            session.close()
            raise
        await self._save(db, key_pem, uri, now)
        log.info("created the ACME account %s at %s", uri, url)
        return session

    async def register_again(self, db: Connection, session: AcmeSession, now: datetime) -> None:
        """The CA no longer knows the account (e.g. it was reset): register the same key again."""
        key_pem = self._known[0] if self._known else None
        uri = await session.register(self.settings.acme_contact_email)
        if key_pem is not None:
            await self._save(db, key_pem, uri, now)

    async def _save(self, db: Connection, key_pem: bytes, uri: str, now: datetime) -> None:
        url = self.settings.acme_directory
        key_id, blob = self.keys.encrypt(key_pem, account_aad(url))
        await store.save_account(db, url, uri, key_id, blob, now)
        self._known = (key_pem, uri)


async def self_check(
    challenges: Sequence[Challenge],
    *,
    resolver: Resolver,
    http: httpx.AsyncClient,
    timeout: float,
) -> dict[str, str]:
    """Fetch every challenge URL the way the CA will (the domain's addresses from DNS, port
    80, its Host header) until each answers with its key authorization; the domains that
    did not by `timeout`, with what they answered. nginx may take a moment after a reload."""

    async def check(challenge: Challenge) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.02
        while True:
            problem = await _fetch_once(challenge, resolver, http)
            if problem is None:
                return None
            if loop.time() + delay > deadline:
                return problem
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    results = await asyncio.gather(*(check(c) for c in challenges))
    return {c.domain: problem for c, problem in zip(challenges, results, strict=True) if problem is not None}


async def _fetch_once(challenge: Challenge, resolver: Resolver, http: httpx.AsyncClient) -> str | None:
    answer = await resolver.lookup(challenge.domain)
    if not answer.addresses:
        return f"no address for {challenge.domain}" + (f" ({answer.error})" if answer.error else "")
    for address in answer.addresses:
        host = f"[{address}]" if ":" in address else address
        try:
            response = await http.get(f"http://{host}:80{challenge.path}", headers={"Host": challenge.domain})
        except httpx.HTTPError as exc:
            return f"{address}: {type(exc).__name__}"
        if response.status_code != 200:
            return f"{address}: HTTP {response.status_code}"
        if response.text.strip() != challenge.key_authorization:
            return f"{address}: wrong content"
    return None


async def obtain(
    session: AcmeSession,
    domains: Sequence[str],
    key_pem: bytes,
    *,
    host: Host,
    paths: VmPaths,
    resolver: Resolver,
    http: httpx.AsyncClient,
    settings: TlsSettings,
) -> Issued:
    """Order a certificate for `domains`: the challenge files go into the VM's web root,
    the URLs are self-checked, then the CA validates and issues. The files are removed
    afterwards whatever happened."""
    placed: list[Challenge] = []

    async def place(challenges: list[Challenge]) -> None:
        placed.extend(challenges)
        await place_challenges(host, paths, challenges)

    async def check(challenges: list[Challenge]) -> dict[str, str]:
        return await self_check(challenges, resolver=resolver, http=http, timeout=settings.self_check_timeout_seconds)

    try:
        return await session.obtain(
            domains, key_pem, place=place, self_check=check, poll_timeout=settings.acme_poll_timeout_seconds
        )
    finally:
        if placed:
            with contextlib.suppress(Exception):  # leftovers are harmless: tokens are single-use
                await remove_challenges(host, paths, placed)


__all__ = ["AccountGone", "Accounts", "certificate_key_aad", "new_private_key", "obtain", "self_check"]
