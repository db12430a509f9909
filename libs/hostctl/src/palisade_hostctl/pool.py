"""Verified SSH connections, one per host, shared by the worker's handlers.

Per host: one connection (asyncssh multiplexes sessions over it), opened on
first use, closed after `idle_close_seconds` without a session; at most
`max_sessions_per_host` sessions at once (a semaphore: the rest wait their
turn). Connecting retries with back-off on connection errors only; a host key
the server cannot prove, or a refused automation key, fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shlex
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .errors import (
    AuthenticationFailed,
    CommandTimeout,
    HostKeyMismatch,
    HostUnreachable,
    NegotiationFailed,
)
from .identity import HostIdentity
from .layout import LayoutResolver, real_vm_layout
from .metrics import COMMAND_SECONDS, CONNECTS, SESSIONS_IN_USE

if TYPE_CHECKING:
    from .host import Host
    from .settings import HostctlSettings

log = logging.getLogger("palisade.hostctl")

# `timeout -s KILL` kills its process group, itself included: the session reports
# signal KILL (asyncssh: -9), or 137 when a shell in between reports it.
_KILLED = (-9, 128 + 9)
_BACKSTOP_SECONDS = 5.0


@dataclass
class HostStats:
    """What the pool did with one host (tests and debugging read it)."""

    in_flight: int = 0
    peak_in_flight: int = 0
    sessions: int = 0
    connects: int = 0
    connect_attempts: int = 0
    connected: bool = False


@dataclass(frozen=True)
class RawResult:
    exit_status: int
    stdout: bytes
    stderr: bytes


class _VerifyingClient(asyncssh.SSHClient):
    """Only records the key a server presented when it was *not* the trusted one,
    so the mismatch error can name both fingerprints. It never trusts it."""

    def __init__(self) -> None:
        self.presented: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.presented = key
        return False


class _Slot:
    def __init__(self, identity: HostIdentity, limit: int) -> None:
        self.identity = identity
        self.sessions = asyncio.Semaphore(limit)
        self.connecting = asyncio.Lock()
        self.conn: asyncssh.SSHClientConnection | None = None
        self.stats = HostStats()
        self.idle: asyncio.TimerHandle | None = None
        self.path_locks: dict[str, asyncio.Lock] = {}


class HostPool:
    def __init__(
        self,
        client_keys: Sequence[asyncssh.SSHKey],
        *,
        username: str = "root",
        max_sessions_per_host: int = 4,
        idle_close_seconds: float = 60.0,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        connect_attempts: int = 3,
        retry_backoff_seconds: float = 0.5,
        keepalive_seconds: float = 15.0,
        layouts: LayoutResolver = real_vm_layout,
    ) -> None:
        if not client_keys:
            raise ValueError("a HostPool needs the automation key to log in with")
        if not 1 <= max_sessions_per_host <= 10:
            # sshd's MaxSessions defaults to 10 per connection, and the pool keeps one connection per host.
            raise ValueError("max_sessions_per_host must be between 1 and 10")
        if connect_attempts < 1:
            raise ValueError("connect_attempts must be at least 1")
        self._client_keys = list(client_keys)
        self.username = username
        self.max_sessions_per_host = max_sessions_per_host
        self.idle_close_seconds = idle_close_seconds
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.connect_attempts = connect_attempts
        self.retry_backoff_seconds = retry_backoff_seconds
        self.keepalive_seconds = keepalive_seconds
        self.layouts = layouts
        self._slots: dict[HostIdentity, _Slot] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._in_flight_total = 0
        self.peak_in_flight_total = 0
        self._closed = False

    @classmethod
    def from_settings(cls, settings: HostctlSettings, *, layouts: LayoutResolver | None = None) -> HostPool:
        return cls(
            [settings.automation_key()],
            username=settings.username,
            max_sessions_per_host=settings.max_sessions_per_host,
            idle_close_seconds=settings.idle_close_seconds,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            connect_attempts=settings.connect_attempts,
            retry_backoff_seconds=settings.retry_backoff_seconds,
            keepalive_seconds=settings.keepalive_seconds,
            layouts=layouts or settings.layouts(),
        )

    # ------------------------------------------------------------------ public

    @property
    def automation_key(self) -> asyncssh.SSHKey:
        """The key the pool logs in with (its public half is on every VM)."""
        return self._client_keys[0]

    def host(self, identity: HostIdentity) -> Host:
        """A handle for one host (cheap; the connection is shared)."""
        from .host import Host

        return Host(self, identity, self.layouts(identity))

    def stats(self, identity: HostIdentity) -> HostStats:
        slot = self._slots.get(identity)
        if slot is None:
            return HostStats()
        slot.stats.connected = slot.conn is not None and not slot.conn.is_closed()
        return slot.stats

    async def close(self) -> None:
        self._closed = True
        for slot in self._slots.values():
            if slot.idle is not None:
                slot.idle.cancel()
                slot.idle = None
            self._close_connection(slot)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def __aenter__(self) -> HostPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ sessions

    def _slot(self, identity: HostIdentity) -> _Slot:
        slot = self._slots.get(identity)
        if slot is None:
            slot = self._slots[identity] = _Slot(identity, self.max_sessions_per_host)
        return slot

    def path_lock(self, identity: HostIdentity, path: str) -> asyncio.Lock:
        """One replace of a given file at a time (within this process)."""
        locks = self._slot(identity).path_locks
        lock = locks.get(path)
        if lock is None:
            lock = locks[path] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _session_slot(self, slot: _Slot) -> AsyncIterator[None]:
        if self._closed:
            raise RuntimeError("HostPool is closed")
        async with slot.sessions:
            if slot.idle is not None:
                slot.idle.cancel()
                slot.idle = None
            slot.stats.in_flight += 1
            slot.stats.sessions += 1
            slot.stats.peak_in_flight = max(slot.stats.peak_in_flight, slot.stats.in_flight)
            self._in_flight_total += 1
            self.peak_in_flight_total = max(self.peak_in_flight_total, self._in_flight_total)
            SESSIONS_IN_USE.inc()
            try:
                yield
            finally:
                SESSIONS_IN_USE.dec()
                self._in_flight_total -= 1
                slot.stats.in_flight -= 1
                if slot.stats.in_flight == 0 and slot.conn is not None and not self._closed:
                    slot.idle = asyncio.get_running_loop().call_later(
                        self.idle_close_seconds, self._close_if_idle, slot
                    )

    def _close_if_idle(self, slot: _Slot) -> None:
        slot.idle = None
        if slot.stats.in_flight == 0:
            self._close_connection(slot)

    def _close_connection(self, slot: _Slot) -> None:
        conn, slot.conn = slot.conn, None
        if conn is None:
            return
        conn.close()
        task = asyncio.get_running_loop().create_task(conn.wait_closed())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _connection(self, slot: _Slot) -> asyncssh.SSHClientConnection:
        async with slot.connecting:
            if slot.conn is not None and not slot.conn.is_closed():
                return slot.conn
            slot.conn = None
            slot.conn = await self._connect(slot)
            return slot.conn

    async def _connect(self, slot: _Slot) -> asyncssh.SSHClientConnection:
        ident = slot.identity
        delay = self.retry_backoff_seconds
        last: BaseException | None = None
        for attempt in range(1, self.connect_attempts + 1):
            slot.stats.connect_attempts += 1
            client = _VerifyingClient()
            try:
                conn = await asyncssh.connect(
                    ident.host,
                    ident.port,
                    username=self.username,
                    client_factory=_factory(client),
                    client_keys=self._client_keys,
                    known_hosts=([ident.key], [], []),
                    connect_timeout=self.connect_timeout,
                    keepalive_interval=self.keepalive_seconds,
                    keepalive_count_max=3,
                    config=None,
                    agent_path=None,
                    password_auth=False,
                    kbdint_auth=False,
                    gss_auth=False,
                    host_based_auth=False,
                    ignore_encrypted=True,
                )
            except asyncssh.HostKeyNotVerifiable:
                CONNECTS.labels("host_key_mismatch").inc()
                raise _mismatch(ident, client.presented) from None
            except asyncssh.PermissionDenied as exc:
                CONNECTS.labels("auth_failed").inc()
                raise AuthenticationFailed(f"{ident} refused the automation key: {exc}", host=str(ident)) from None
            except asyncssh.KeyExchangeFailed as exc:
                if "host key" in str(exc).lower():
                    # The server has no key of the projected key's type: it is not the host we know.
                    CONNECTS.labels("host_key_mismatch").inc()
                    raise _mismatch(ident, None, detail=str(exc)) from None
                CONNECTS.labels("negotiation_failed").inc()
                raise NegotiationFailed(f"no common algorithms with {ident}: {exc}", host=str(ident)) from None
            except (OSError, TimeoutError, asyncssh.Error) as exc:
                CONNECTS.labels("unreachable").inc()
                last = exc
                if attempt < self.connect_attempts:
                    log.info("connect to %s failed (%s); attempt %d in %.2fs", ident, exc, attempt + 1, delay)
                    await asyncio.sleep(delay * random.uniform(1.0, 1.5))
                    delay *= 3
                continue
            CONNECTS.labels("ok").inc()
            slot.stats.connects += 1
            return conn
        raise HostUnreachable(
            f"cannot reach {ident} after {self.connect_attempts} attempts: {_describe(last)}", host=str(ident)
        )

    async def run(
        self,
        identity: HostIdentity,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        operation: str | None = None,
    ) -> RawResult:
        """Run argv (quoted with shlex.join for the remote shell) in one session."""
        if isinstance(argv, str | bytes):
            raise TypeError("argv must be a list of arguments, not a command string")
        if not argv:
            raise ValueError("argv is empty")
        op = operation or argv[0]
        slot = self._slot(identity)
        limit = self.command_timeout if timeout is None else timeout
        # The limit is enforced on the VM: closing the channel does not stop a command,
        # and sshd refuses signal requests for root sessions. `timeout` kills the
        # command's whole process group; the client-side limit is only a backstop.
        command = shlex.join(["timeout", "-s", "KILL", f"{limit:g}", *argv])
        started = time.perf_counter()
        with trace.get_tracer("palisade.hostctl").start_as_current_span(
            f"ssh {op}",
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "ssh",
                "server.address": identity.host,
                "server.port": identity.port,
                "palisade.ssh.operation": op,
            },
        ) as span:
            try:
                async with self._session_slot(slot):
                    begun = time.monotonic()
                    result = await self._run_in_session(slot, command, input, limit + _BACKSTOP_SECONDS)
                    if result.exit_status in _KILLED and time.monotonic() - begun >= limit:
                        raise CommandTimeout(f"{identity}: {op} timed out after {limit:g}s", host=str(identity))
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            finally:
                COMMAND_SECONDS.observe(time.perf_counter() - started)
            span.set_attribute("process.exit.code", result.exit_status)
            return result

    async def _run_in_session(self, slot: _Slot, command: str, input: bytes | None, limit: float) -> RawResult:
        ident = slot.identity
        process: asyncssh.SSHClientProcess[bytes] | None = None
        conn = await self._connection(slot)  # connecting has its own timeouts and retries
        try:
            async with asyncio.timeout(limit):
                try:
                    process = await conn.create_process(command, encoding=None)
                except asyncssh.ChannelOpenError:
                    # The pooled connection went away before the command started
                    # (e.g. sshd restarted): one more try on a fresh connection.
                    if slot.conn is conn:
                        self._close_connection(slot)
                    conn = await self._connection(slot)
                    process = await conn.create_process(command, encoding=None)
                stdout, stderr = await process.communicate(input)
        except TimeoutError:
            if process is not None:
                with contextlib.suppress(Exception):
                    process.send_signal("KILL")
                process.close()
            raise CommandTimeout(f"{ident}: command timed out after {limit:g}s", host=str(ident)) from None
        except (asyncssh.ChannelOpenError, asyncssh.DisconnectError, OSError) as exc:
            if slot.conn is conn:
                self._close_connection(slot)
            raise HostUnreachable(f"{ident}: connection lost: {_describe(exc)}", host=str(ident)) from None
        status = process.returncode
        if status is None:
            # The channel closed without an exit status: the connection died under it.
            if slot.conn is conn:
                self._close_connection(slot)
            raise HostUnreachable(f"{ident}: connection lost before the command reported its exit", host=str(ident))
        return RawResult(exit_status=status, stdout=stdout or b"", stderr=stderr or b"")


def _mismatch(ident: HostIdentity, presented: asyncssh.SSHKey | None, detail: str = "") -> HostKeyMismatch:
    shown = presented.get_fingerprint("sha256") if presented is not None else None
    what = f"it presented {presented.get_algorithm()} {shown}" if presented is not None else detail
    return HostKeyMismatch(
        f"host key mismatch for {ident}: expected {ident.algorithm} {ident.fingerprint}, {what}; not logging in",
        host=str(ident),
        expected=ident.fingerprint,
        presented=shown,
    )


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _factory(client: _VerifyingClient) -> Callable[[], _VerifyingClient]:
    return lambda: client


def load_private_key(path: Path) -> asyncssh.SSHKey:
    """The automation key (OpenSSH or PEM private key file, unencrypted)."""
    return asyncssh.read_private_key(str(path))
