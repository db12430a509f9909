"""The relay's decisions at each SMTP step, glued to the database, the outbox and
the smarthost. The rules are in `domain`, the SQL in `store`, the SMTP protocol in
`server`.

An SMTP decision is not a bus message, so it gets its transaction from
`WorkerRuntime.transaction()`: a refusal's `EmailRejected` event and audit record,
a relayed message's `EmailRelayed` event, are written there and published by the
runtime's outbox relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from palisade_events import Context, WorkerRuntime
from palisade_events.audit import Outcome
from palisade_events.contract import smtp as contract
from palisade_events.group_commit import GroupCommit

from . import domain, store
from .metrics import EMAILS, REJECTIONS, RESERVATIONS_PER_STATEMENT, SUSPENSIONS
from .settings import RelaySettings
from .upstream import UpstreamError, UpstreamPool

log = logging.getLogger("palisade.smtp.relay")

AUDIT_ACTION = "EmailSubmission"


@dataclass(frozen=True)
class Identity:
    """The service behind an admitted connection."""

    service_id: str
    sender: str  # <slug>@<sender domain>, the only address it may send from


@dataclass
class Submission:
    """What the relay needs of one SMTP transaction."""

    identity: Identity
    peer_ip: str
    helo: str | None
    tls: bool
    mail_from: str
    recipients: Sequence[str]
    content: bytes
    eight_bit: bool


class Relay:
    def __init__(self, rt: WorkerRuntime[Any], settings: RelaySettings, upstream: UpstreamPool) -> None:
        self.rt = rt
        self.settings = settings
        self.upstream = upstream
        self.networks = settings.networks()
        self.bound: tuple[str, int] | None = None  # the listener's address, once started
        self.sessions: set[Any] = set()  # open `server.RelaySession`s
        self._relayed = _RelayedRecords(rt)
        # Started and stopped with the SMTP listener (server.smtp_listener). A 1-tuple per
        # ask: None is GroupCommit's "decide it alone", while a reservation may be None.
        self.reservations: GroupCommit[store.Ask, tuple[store.Reservation | None]] = GroupCommit(
            self._reserve_many, max_batch=100
        )
        self._handovers: set[asyncio.Task[str]] = set()
        self._idle = asyncio.Event()

    def idle_changed(self) -> None:
        if not any(s.busy for s in self.sessions):
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Shutdown: let messages being relayed finish (up to `timeout`), then close
        every session; a client cut off before its reply retries, and nothing it was
        not told about was relayed twice."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(s.busy for s in self.sessions) and loop.time() < deadline:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), deadline - loop.time())
        for session in list(self.sessions):
            session.close()
        if self._handovers:  # messages whose client hung up while they went upstream
            await asyncio.wait(self._handovers, timeout=max(0.0, deadline - loop.time()))

    # ------------------------------------------------------------ decisions

    async def admit(self, peer_ip: str) -> Identity | str:
        """At connect: an Identity, or the reply that refuses the connection."""
        service = None
        if domain.in_networks(peer_ip, self.networks):
            async with self.rt.pool.acquire() as conn:
                service = await store.service_by_ip(conn, peer_ip)
        refusal = domain.refuse_connection(
            peer_ip, self.networks, service is not None, service is not None and service.suspended
        )
        if refusal is not None:
            return await self.refuse(refusal, None if service is None else service.service_id, peer_ip)
        assert service is not None
        return Identity(service.service_id, domain.sender_address(service.slug, self.settings.sender_domain))

    async def check_sender(self, identity: Identity, peer_ip: str, mail_from: str) -> str | None:
        refusal = domain.refuse_envelope_sender(mail_from, identity.sender)
        return None if refusal is None else await self.refuse(refusal, identity.service_id, peer_ip)

    async def check_recipient(self, identity: Identity, peer_ip: str, accepted: int) -> domain.Refusal | None:
        refusal = domain.refuse_recipient(accepted)
        if refusal is not None:
            await self.refuse(refusal, identity.service_id, peer_ip, recipients=accepted + 1)
        return refusal

    async def deliver(self, sub: Submission) -> str:
        """After DATA: screen, reserve quota, hand upstream; the reply to send."""
        sid = sub.identity.service_id
        count = len(sub.recipients)
        screened = domain.screen_message(sub.content, sub.identity.sender)
        if isinstance(screened, domain.Refusal):
            return await self.refuse(screened, sid, sub.peer_ip, recipients=count)

        # The reservation: one statement, which holds the service's row lock while it
        # decides. It writes no event in the common case, so it runs on a pooled
        # connection rather than in `rt.transaction()` and its context. A refusal or the
        # 80 % warning is recorded right after, through `rt.transaction()`.
        reserved_at = self.rt.clock.now()
        reservation = await self._reserve(store.Ask(sid, count, reserved_at))
        if reservation is None:  # deprovisioned while connected
            refusal = domain.Refusal("unknown_service", "554 5.7.1", "Relay access denied: unknown service", "data")
            return await self.refuse(refusal, sid, sub.peer_ip, recipients=count)
        if reservation.decision is None:
            return await self.refuse(domain.refusal_suspended("data"), sid, sub.peer_ip, recipients=count)
        if not reservation.decision.granted:
            refusal = domain.refusal_quota(reservation.decision.retry_after_seconds or 1)
            return await self.refuse(refusal, sid, sub.peer_ip, recipients=count)
        if reservation.decision.warn:
            await self._warn(sid, reservation.decision.used)
        # From here the slots are taken: a client hanging up must not cut the hand-over
        # short (the message may be upstream already), so it finishes on its own.
        handover = asyncio.create_task(self._hand_over(sub, screened, reserved_at))
        self._handovers.add(handover)
        handover.add_done_callback(self._handover_done)
        return await asyncio.shield(handover)

    async def _reserve(self, ask: store.Ask) -> store.Reservation | None:
        """Reservations that arrive while one is being decided share the next statement
        (store.reserve_many: one round trip and one commit for all); a lone one goes alone."""
        grouped = await self.reservations.submit(ask)
        if grouped is not None:
            return grouped[0]
        async with self.rt.pool.acquire() as conn:
            found = await store.reserve(conn, ask.service_id, ask.count, ask.now)
        RESERVATIONS_PER_STATEMENT.observe(1)
        return found

    async def _reserve_many(self, asks: list[store.Ask]) -> list[tuple[store.Reservation | None]]:
        async with self.rt.pool.acquire() as conn:
            found = await store.reserve_many(conn, asks)
        RESERVATIONS_PER_STATEMENT.observe(len(asks))
        return [(r,) for r in found]

    def _handover_done(self, task: asyncio.Task[str]) -> None:
        self._handovers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hand-over failed: %r", task.exception())

    async def _hand_over(self, sub: Submission, screened: domain.Screened, reserved_at: datetime) -> str:
        """Relay upstream with the slots reserved at `reserved_at`; give them back if
        the smarthost does not take the message."""
        sid = sub.identity.service_id
        count = len(sub.recipients)
        relay_id = uuid.uuid4().hex[:16]
        message_id = screened.message_id
        added_id = None
        if message_id is None:
            added_id = message_id = f"<{relay_id}.{sub.identity.sender}>"
        trace = domain.trace_headers(
            helo=sub.helo,
            peer_ip=sub.peer_ip,
            hostname=self.settings.smtp_hostname,
            relay_id=relay_id,
            when=reserved_at,
            tls=sub.tls,
            add_message_id=added_id,
        )
        try:
            await self.upstream.send(sub.identity.sender, sub.recipients, trace + sub.content, eight_bit=sub.eight_bit)
        except UpstreamError as exc:
            log.warning("upstream did not take %s's message: %s", sid, exc)
            refusal = domain.refusal_upstream(exc.permanent, exc.code)
            async with self.rt.transaction() as ctx:
                await store.release(ctx.db, sid, reserved_at, count)
                await self._record(ctx, refusal, sid, sub.peer_ip, count, outcome="failed")
            self._count(refusal)
            return refusal.reply

        relayed = contract.EmailRelayed(
            message_id_header=message_id[:255],
            recipients=list(sub.recipients),
            size_bytes=len(sub.content),
            relay_id=relay_id,
        )
        try:
            await self._relayed.record(relayed, sid)
        except Exception:
            # The smarthost has the message: a 4xx now would make the client send it twice.
            log.exception("relayed %s for %s but could not record it", relay_id, sid)
        EMAILS.labels("relayed").inc()
        log.debug("relayed %s for %s to %d recipient(s)", relay_id, sid, count)
        return f"250 2.0.0 OK queued as {relay_id}"

    async def _warn(self, service_id: str, used: int) -> None:
        """EmailQuotaWarning, once: only the reservation that reached 80 % sends it."""
        try:
            async with self.rt.transaction() as ctx:
                await ctx.emit(
                    contract.EmailQuotaWarning(
                        used=used, limit=domain.QUOTA_LIMIT, window_seconds=int(domain.QUOTA_WINDOW.total_seconds())
                    ),
                    service_id=service_id,
                )
        except Exception:
            log.exception("quota warning for %s not recorded", service_id)

    # ------------------------------------------------------------ refusals

    async def refuse(
        self, refusal: domain.Refusal, service_id: str | None, peer_ip: str, *, recipients: int = 0
    ) -> str:
        """Record a refusal (event, audit, metrics, a violation when it is marketing
        mail) and return the reply."""
        async with self.rt.transaction() as ctx:
            await self._record(ctx, refusal, service_id, peer_ip, recipients)
        self._count(refusal)
        return refusal.reply

    async def _record(
        self,
        ctx: Context[Any],
        refusal: domain.Refusal,
        service_id: str | None,
        peer_ip: str,
        recipients: int,
        *,
        outcome: Outcome = "rejected",
    ) -> None:
        code = refusal.code
        await ctx.emit(
            contract.EmailRejected(
                reason=refusal.reason,
                smtp_reply=code,
                stage=refusal.stage,
                recipients=recipients,
                retry_after_seconds=refusal.retry_after_seconds,
                peer_ip=peer_ip,
            ),
            service_id=service_id,
        )
        await ctx.audit(
            AUDIT_ACTION,
            outcome,
            refusal.reason,
            service_id=service_id,
            detail={
                "stage": refusal.stage,
                "smtp_reply": code,
                "recipients": recipients,
                "peer_ip": peer_ip,
                "retry_after_seconds": refusal.retry_after_seconds,
            },
        )
        log.info("%s %s from %s (%s): %s", outcome, refusal.stage, peer_ip, service_id or "-", refusal.reply)
        if refusal.marketing and service_id is not None:
            await self._violation(ctx, service_id, ctx.now())

    async def _violation(self, ctx: Context[Any], service_id: str, now: datetime) -> None:
        violations, suspended = await store.record_violation(ctx.db, service_id, now)
        if not suspended:
            return
        await ctx.emit(
            contract.RelaySuspended(
                reason="marketing_violations",
                violations=violations,
                window_hours=int(domain.VIOLATION_WINDOW.total_seconds() // 3600),
            ),
            service_id=service_id,
        )
        await ctx.audit(
            "RelaySuspension",
            "accepted",
            "marketing_violations",
            service_id=service_id,
            detail={"violations": violations},
        )
        ctx.after_commit(SUSPENSIONS.inc)
        log.warning("suspended relay access of %s after %d marketing violations", service_id, violations)

    @staticmethod
    def _count(refusal: domain.Refusal) -> None:
        EMAILS.labels("deferred" if refusal.code.startswith("4") else "rejected").inc()
        REJECTIONS.labels(refusal.reason).inc()


class _RelayedRecords:
    """Records relayed messages (their `EmailRelayed` events), many per statement.

    A session whose message the smarthost took waits here before it answers 250;
    while one batch is written, the messages finished meanwhile gather for the
    next. The records are the batch's only write, so a batch is one INSERT that
    commits by itself (`WorkerRuntime.emit_committed`). Each message is recorded
    before its client hears 250; the waiters are released at the commit, not at
    the publisher confirms (the runtime's GroupCommit resolves only once its
    commit function returns, which here includes publishing the batch).

    A relayed message gets no audit record of its own: `EmailRelayed` is the
    record of the acceptance, while every refusal, suspension and lifted
    suspension is audited. (An audit record per relayed email doubled the
    outbox rows and publishes per message, and would put up to 7,200 routine
    entries a day per service into the stream that is read for decisions.)"""

    def __init__(self, rt: WorkerRuntime[Any]) -> None:
        self._rt = rt
        self._pending: list[tuple[contract.EmailRelayed, str, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, event: contract.EmailRelayed, service_id: str) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, service_id, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="smtp-relayed-records")
        await done

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []

            def recorded(batch: list[tuple[contract.EmailRelayed, str, asyncio.Future[None]]] = batch) -> None:
                for _, _, done in batch:
                    if not done.done():
                        done.set_result(None)

            try:
                # Committed is recorded: the sessions answer 250 then, while the events'
                # publisher confirms come (the next batch still waits for them, in order).
                await self._rt.emit_committed([(event, sid) for event, sid, _ in batch], committed=recorded)
            except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
