"""Handing messages to the smarthost over a small pool of kept-open connections.

One message is one SMTP transaction on one pooled connection, step by step (MAIL,
each RCPT, DATA), so that it is all or nothing: if the smarthost refuses any
recipient the transaction is reset and nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import aiosmtplib

from .metrics import UPSTREAM_SECONDS
from .settings import RelaySettings

log = logging.getLogger("palisade.smtp.upstream")

# Idle connections older than this are closed instead of reused: smarthosts drop
# idle clients (Postfix after 300 s), and a dead connection costs a reconnect anyway.
IDLE_SECONDS = 60.0


class UpstreamError(Exception):
    def __init__(self, detail: str, *, permanent: bool, code: int | None = None) -> None:
        super().__init__(detail)
        self.permanent = permanent
        self.code = code


class UpstreamPool:
    def __init__(self, settings: RelaySettings, *, local_hostname: str | None = None) -> None:
        self._host, self._port = settings.upstream()
        self._settings = settings
        self._local_hostname = local_hostname or settings.smtp_hostname
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._slots = asyncio.Semaphore(settings.smarthost_pool_size)
        self._closed = False

    async def send(self, sender: str, recipients: Sequence[str], content: bytes, *, eight_bit: bool) -> None:
        """Deliver or raise UpstreamError (`permanent` when the smarthost said 5xx)."""
        started = time.perf_counter()
        async with self._slots:
            smtp, reused = self._take()
            try:
                if smtp is None:
                    smtp = await self._connect()
                try:
                    await self._transaction(smtp, sender, recipients, content, eight_bit, reused=reused)
                except _StaleConnectionError:
                    # The pooled connection had died while idle; nothing was sent on it.
                    smtp.close()
                    smtp = await self._connect()
                    await self._transaction(smtp, sender, recipients, content, eight_bit, reused=False)
            except aiosmtplib.SMTPResponseException as exc:
                if smtp is not None:
                    await self._reset_or_drop(smtp)
                raise UpstreamError(
                    f"{exc.code} {exc.message}", permanent=500 <= exc.code < 600, code=exc.code
                ) from exc
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if smtp is not None:
                    smtp.close()
                raise UpstreamError(f"{type(exc).__name__}: {exc}", permanent=False) from exc
            except BaseException:
                if smtp is not None:
                    smtp.close()
                raise
            self._give_back(smtp)
        UPSTREAM_SECONDS.observe(time.perf_counter() - started)

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        eight_bit: bool,
        *,
        reused: bool,
    ) -> None:
        options = ["BODY=8BITMIME"] if eight_bit and smtp.supports_extension("8bitmime") else []
        try:
            await smtp.mail(sender, options=options)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            if reused:
                raise _StaleConnectionError from exc
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if reused and exc.code == 421:  # the server closing an idle session
                raise _StaleConnectionError from exc
            raise
        for rcpt in recipients:
            await smtp.rcpt(rcpt)
        await smtp.data(content)

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            local_hostname=self._local_hostname,
            timeout=s.smarthost_timeout,
            start_tls=s.smarthost_starttls,
            tls_context=s.upstream_tls() if s.smarthost_starttls else None,
            username=s.smarthost_username,
            password=s.smarthost_password.get_secret_value() if s.smarthost_password else None,
        )
        await smtp.connect()
        return smtp

    def _take(self) -> tuple[aiosmtplib.SMTP | None, bool]:
        now = time.monotonic()
        while self._idle:
            smtp, since = self._idle.pop()
            if now - since < IDLE_SECONDS and smtp.is_connected:
                return smtp, True
            smtp.close()
        return None, False

    def _give_back(self, smtp: aiosmtplib.SMTP) -> None:
        if self._closed or not smtp.is_connected:
            smtp.close()
        else:
            self._idle.append((smtp, time.monotonic()))

    async def _reset_or_drop(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()
            return
        self._give_back(smtp)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for smtp, _ in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(smtp.quit(), 2)
            smtp.close()


class _StaleConnectionError(Exception):
    pass
