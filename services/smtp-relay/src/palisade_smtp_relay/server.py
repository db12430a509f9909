"""The SMTP side: aiosmtpd sessions whose every decision is `Relay`'s.

aiosmtpd gives EHLO, SIZE, 8BITMIME, STARTTLS (when a certificate is configured),
dot-unstuffing and the size and line-length limits; the session below adds the
connect-time check (before the greeting), PIPELINING and ENHANCEDSTATUSCODES in the
EHLO reply, and turns aiosmtpd's own size and line-length refusals into audited
ones. aiosmtpd is pinned (1.4.6): two private methods are overridden, `_handle_client`
because aiosmtpd has no hook before its greeting, `_getaddr` for speed (see there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from palisade_events import WorkerRuntime

from . import domain
from .metrics import SESSION_SECONDS
from .relay import Identity, Relay, Submission

log = logging.getLogger("palisade.smtp.server")

# aiosmtpd logs every command line at INFO and message lines at DEBUG; bodies and
# whatever a client types after AUTH must not reach the logs.
logging.getLogger("mail.log").setLevel(logging.WARNING)

# Commands per session. What a mail costs is generous (the hour's whole quota fits several
# times over one connection); the commands that cost nothing and only keep a session alive are
# few, so a client cannot hold a connection open forever by chattering (aiosmtpd resets its
# idle timeout at every valid command). Past a limit: 421 4.7.0 and the connection closes.
COMMAND_CALL_LIMITS = {"NOOP": 20, "HELP": 10, "VRFY": 10, "EXPN": 10, "EHLO": 10, "HELO": 10, "*": 1000}


class RelaySession(SMTP):
    """One client connection."""

    def __init__(self, relay: Relay, hooks: RelayHooks, **kwargs: Any) -> None:
        super().__init__(hooks, **kwargs)
        self.relay = relay
        self.identity: Identity | None = None  # kept here: STARTTLS replaces `session`
        self.peer_ip = ""
        self.pending: domain.Refusal | None = None  # a refusal that sticks to the current transaction
        self.busy = False
        self._opened = time.monotonic()
        self._counted = False

    async def _handle_client(self) -> None:
        assert self.session is not None
        assert self.transport is not None
        self.peer_ip = domain.normalize_ip(str(self.transport.get_extra_info("peername")[0]))
        self.relay.sessions.add(self)
        try:
            admitted = await self.relay.admit(self.peer_ip)
        except Exception:
            log.exception("connection from %s: admission check failed", self.peer_ip)
            admitted = "421 4.3.0 Service temporarily unavailable; try again later"
        if isinstance(admitted, str):
            # RFC 5321 3.1: a server may answer the connection with 554 instead of 220.
            await self.push(admitted)
            self.transport.close()
            return
        self.identity = admitted
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        if not self._counted:
            self._counted = True
            SESSION_SECONDS.observe(time.monotonic() - self._opened)
            self.relay.sessions.discard(self)
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        builtin = _BUILTIN_REFUSALS.get(status) if isinstance(status, str) else None
        if builtin is not None and self.identity is not None:
            refusal = builtin(self.relay)
            assert self.envelope is not None
            status = await self.relay.refuse(
                refusal, self.identity.service_id, self.peer_ip, recipients=len(self.envelope.rcpt_tos)
            )
        await super().push(status)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd reads every MAIL and RCPT address with the email package's full RFC 5322
        # parser and defines a typing.Protocol class on each call: ~40 us a command, about a
        # tenth of the relay's CPU per message. Nearly every client sends <local@host>, which
        # one regular expression reads the same way; any other form still gets the parser.
        plain = domain.plain_path(arg)
        if plain is None or (self.local_part_limit and len(plain[0].rpartition("@")[0]) > self.local_part_limit):
            return super()._getaddr(arg)
        return plain


# aiosmtpd's own refusals, which it sends without calling a hook.
_BUILTIN_REFUSALS = {
    "552 Error: message size exceeds fixed maximum message size": lambda relay: domain.refusal_too_large(
        relay.settings.smtp_max_message_bytes, "mail"
    ),
    "552 Error: Too much mail data": lambda relay: domain.refusal_too_large(
        relay.settings.smtp_max_message_bytes, "data"
    ),
    "500 Line too long (see RFC5321 4.5.3.1.6)": lambda relay: domain.refusal_line_too_long(),
}


class RelayHooks:
    """aiosmtpd's handler: each hook asks `Relay` and answers with its reply."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook names
        self, server: RelaySession, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # No AUTH for clients: access is decided by the private address at connect.
        out = [r for r in responses[:-1] if not r.startswith("250-AUTH")]
        return [*out, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(  # noqa: N802
        self, server: RelaySession, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        assert server.identity is not None
        server.pending = None
        refused = await self.relay.check_sender(server.identity, server.peer_ip, address)
        if refused is not None:
            return refused
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(  # noqa: N802
        self, server: RelaySession, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        assert server.identity is not None
        if server.pending is not None:
            return server.pending.reply
        refusal = await self.relay.check_recipient(server.identity, server.peer_ip, len(envelope.rcpt_tos))
        if refusal is not None:
            server.pending = refusal  # the whole message is refused at DATA too
            return refusal.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_RSET(self, server: RelaySession, session: Session, envelope: Envelope) -> str:  # noqa: N802
        # aiosmtpd sends what this returns: returning nothing made every RSET a 451 "local error".
        server.pending = None
        return "250 2.0.0 OK"

    async def handle_DATA(self, server: RelaySession, session: Session, envelope: Envelope) -> str:  # noqa: N802
        assert server.identity is not None
        if server.pending is not None:
            reply = server.pending.reply
            server.pending = None
            return reply
        content = envelope.original_content
        assert isinstance(content, bytes)
        assert envelope.mail_from is not None
        server.busy = True
        try:
            return await self.relay.deliver(
                Submission(
                    identity=server.identity,
                    peer_ip=server.peer_ip,
                    helo=session.host_name,
                    tls=session.ssl is not None,
                    mail_from=envelope.mail_from,
                    recipients=list(envelope.rcpt_tos),
                    content=content,
                    eight_bit="BODY=8BITMIME" in envelope.mail_options,
                )
            )
        finally:
            server.busy = False
            self.relay.idle_changed()

    async def handle_exception(self, error: Exception) -> str:
        # The database or the broker went away mid-decision: nothing was relayed.
        log.error("SMTP session failed: %r", error)
        return "451 4.3.0 Local error; try again later"


@contextlib.asynccontextmanager
async def smtp_listener(rt: WorkerRuntime[Relay]) -> AsyncIterator[None]:
    """The SMTP server, run beside the bus consumer (`WorkerSpec.services`)."""
    relay = rt.deps
    settings = relay.settings
    hooks = RelayHooks(relay)
    tls = settings.server_tls()
    loop = asyncio.get_running_loop()

    def session() -> RelaySession:
        return RelaySession(
            relay,
            hooks,
            data_size_limit=settings.smtp_max_message_bytes,
            hostname=settings.smtp_hostname,
            ident="Palisade smtp-relay",
            tls_context=tls,
            timeout=settings.smtp_session_timeout,
            command_call_limit=COMMAND_CALL_LIMITS,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            loop=loop,
        )

    host, port = settings.listen()
    relay.reservations.start()
    server = await loop.create_server(session, host, port, reuse_address=True)
    relay.bound = server.sockets[0].getsockname()[:2]
    log.info("SMTP relay listening on %s:%d", *relay.bound)
    try:
        yield
    finally:
        server.close()
        await relay.drain(rt.settings.shutdown_grace_seconds)
        await server.wait_closed()
        await relay.reservations.stop()
