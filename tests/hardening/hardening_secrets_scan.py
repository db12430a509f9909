"""A pytest plugin (root conftest.py) for the whole suite: every secret a worker makes in this
process is recorded where it is made (MFA email codes, TOTP secrets, recovery codes; TLS account
and certificate keys), every log record is kept, and at the end of the session the event and
audit logs of the session's vhost (the `palisade.events.log` / `palisade.audit.log` streams, which
receive everything) and the log records are searched for them, and for any PEM private key.
A hit fails the session (an error at the last test's teardown).

Limits, said plainly: workers run as subprocesses by a few CLI tests are not seen; log records are
those the loggers' levels let through; six-digit codes are searched in event and audit values only
(in free log text a six-digit number matches some code by chance too often)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ahocorasick  # type: ignore[import-not-found]  # the package ships no stubs
import aio_pika
import pytest

PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
SIX_DIGITS = re.compile(r"(?<![0-9A-Za-z])[0-9]{6}(?![0-9A-Za-z])")  # a whole six-digit token
TIMESTAMP_INSIDE = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?")


@dataclass
class Secrets:
    long: set[str] = field(default_factory=set)  # searched as substrings everywhere
    codes: set[str] = field(default_factory=set)  # six digits: whole values in events and audit records
    logs: list[str] = field(default_factory=list)
    _matcher: Any = None  # Aho-Corasick automaton of `long`, rebuilt when `long` has grown
    _matcher_size: int = -1

    def keep(self, value: str) -> None:
        self.long.add(value)
        if "-" in value:  # recovery codes are shown with a dash and typed without
            self.long.add(value.replace("-", ""))

    def keep_all(self, values: Iterable[str]) -> None:
        for value in values:
            self.keep(value)

    def keep_pem(self, pem: bytes) -> None:
        # The key's base64 lines: any 48-character piece of them would be a leak.
        for line in pem.decode().splitlines():
            if not line.startswith("-----") and len(line) >= 48:
                self.long.add(line[:48])

    def long_in(self, text: str) -> set[str]:
        """The long secrets inside `text`, in one pass over it whatever their number: a whole
        suite records thousands of them and reads tens of thousands of records, so searching
        for each secret in turn (or compiling a pattern per code) took hours."""
        if not self.long:
            return set()
        if self._matcher_size != len(self.long):  # the sets only grow
            matcher = ahocorasick.Automaton()
            for secret in self.long:
                matcher.add_word(secret, secret)
            matcher.make_automaton()
            self._matcher, self._matcher_size = matcher, len(self.long)
        return {secret for _, secret in self._matcher.iter(text)}

    def codes_in(self, value: str) -> set[str]:
        return set(SIX_DIGITS.findall(value)) & self.codes


SEEN = Secrets()


def findings_in_body(body: bytes, where: str, secrets: Secrets = SEEN) -> list[str]:
    text = body.decode("utf-8", "replace")
    found = [f"{where}: PEM private key"] if PEM_PRIVATE.search(text) else []
    found += [f"{where}: secret {s[:6]}…" for s in secrets.long_in(text)]
    with contextlib.suppress(ValueError):
        document = json.loads(text)
        kind = document.get("type", "?") if isinstance(document, dict) else "?"
        for path, value in _strings(document):
            # Fractional seconds are six digits too: timestamps, whole or inside a text, are not codes.
            for code in secrets.codes_in(TIMESTAMP_INSIDE.sub(" ", value)):
                masked = value.replace(code, "######")[:120]
                found.append(f"{where}: code {code[:2]}… in {kind} {path}: {masked!r}")
    return found


def findings_in_logs(lines: Iterable[str], secrets: Secrets = SEEN) -> list[str]:
    found = []
    for line in lines:
        if PEM_PRIVATE.search(line):
            found.append(f"log: PEM private key: {line[:80]}")
        found += [f"log: secret {s[:6]}…: {line[:80]}" for s in secrets.long_in(line)]
    return found


def _strings(node: Any, path: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")


# ------------------------------------------------------------------ recording at the source


def _recording(fn: Callable[..., Any], keep: Callable[[Any], None]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        keep(result)
        return result

    wrapper.__palisade_recording__ = True  # type: ignore[attr-defined]
    return wrapper


def _patch(module: Any, name: str, keep: Callable[[Any], None]) -> None:
    fn = getattr(module, name)
    if not getattr(fn, "__palisade_recording__", False):
        setattr(module, name, _recording(fn, keep))


def _install_recorders() -> None:
    with contextlib.suppress(ImportError):
        from palisade_mfa import domain as mfa

        _patch(mfa, "new_email_code", lambda code: SEEN.codes.add(code))
        _patch(mfa, "new_totp_secret", SEEN.keep)
        _patch(mfa, "new_recovery_codes", SEEN.keep_all)
    with contextlib.suppress(ImportError):
        from palisade_tls import acme_client, handlers, issuance

        for module in (acme_client, issuance, handlers):
            _patch(module, "new_private_key", SEEN.keep_pem)


class _LogKeeper(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("mail.log"):
            return  # aiosmtpd: the tests' own mail sinks, which are meant to receive the codes
        try:
            SEEN.logs.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to fail on
            return


_KEEPER = _LogKeeper(logging.DEBUG)


def pytest_configure(config: pytest.Config) -> None:
    _install_recorders()
    logging.getLogger().addHandler(_KEEPER)


def pytest_unconfigure(config: pytest.Config) -> None:
    logging.getLogger().removeHandler(_KEEPER)


# ------------------------------------------------------------------ the scan at the end


async def read_stream(url: str, exchange: str, stream: str) -> list[bytes]:
    """Everything in `stream` up to a marker published now through `exchange` (bound with #)."""
    marker = str(uuid.uuid4())
    bodies: list[bytes] = []
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.get_exchange(exchange, ensure=False)
        await ex.publish(aio_pika.Message(b"{}", message_id=marker), "hardening.ScanMarker", mandatory=False)
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue(stream, ensure=False)
        # The marker is in the stream already (confirmed), so reading ends; the timeout only guards a bug.
        async with asyncio.timeout(120), queue.iterator(arguments={"x-stream-offset": "first"}) as it:
            async for message in it:
                await message.ack()
                if message.message_id == marker:
                    break
                bodies.append(message.body)
    finally:
        await connection.close()
    return bodies


@pytest.fixture(scope="session", autouse=True)
async def secrets_never_leave(session_isolation: str) -> AsyncIterator[Secrets]:
    """Torn down before the session's vhost is deleted: scans what the whole session produced."""
    from palisade_events.topology import AUDIT_EXCHANGE, AUDIT_LOG, EVENTS_EXCHANGE, EVENTS_LOG
    from tests.fixtures import AMQP_URL

    yield SEEN
    if not (SEEN.long or SEEN.codes):
        return  # no secret-bearing worker ran in this session
    found: list[str] = []
    for exchange, stream in ((EVENTS_EXCHANGE, EVENTS_LOG), (AUDIT_EXCHANGE, AUDIT_LOG)):
        try:
            bodies = await read_stream(AMQP_URL, exchange, stream)
        except aio_pika.exceptions.ChannelClosed:
            continue  # no worker ever declared the logs in this session
        found += [f for b in bodies for f in findings_in_body(b, stream)]
    found += findings_in_logs(SEEN.logs)
    assert not found, f"secrets left the workers: {sorted(set(found))[:20]}"
