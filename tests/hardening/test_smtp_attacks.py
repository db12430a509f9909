"""The relay under a hostile client speaking raw SMTP from a service's own address: pipelined
floods, parameters and command lines that try to smuggle something, idle and dribbling
sessions. Whatever it sends, nothing is relayed that the rules would refuse, and the relay
keeps serving everyone else."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "services" / "smtp-relay" / "tests"))
from smtp_harness import Sink, relay_status  # type: ignore[import-not-found]  # noqa: E402
from test_smtp_relay import Env, make_env, sink  # type: ignore[import-not-found]  # noqa: E402, F401 - a fixture

from palisade_events.client import PalisadeClient  # noqa: E402
from tests.fixtures import wait_until  # noqa: E402

Reply = tuple[int, str]


class RawSession:
    """SMTP over a bare socket: what a client that ignores the protocol's manners can do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source_ip: str) -> RawSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source_ip, 0))
        session = cls(reader, writer)
        [(code, _)] = await session.replies(1)
        assert code == 220
        return session

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def replies(self, count: int, timeout: float = 10.0) -> list[Reply]:
        out: list[Reply] = []
        async with asyncio.timeout(timeout):
            while len(out) < count:
                lines: list[str] = []
                while True:
                    line = (await self.reader.readline()).decode("utf-8", "replace")
                    if not line:
                        raise ConnectionError(f"closed after {out}")
                    lines.append(line[4:].rstrip("\r\n"))
                    if line[3:4] != "-":
                        break
                out.append((int(line[:3]), lines[-1]))
        return out

    async def closed_by_server(self, timeout: float) -> bytes:
        """Reads until the server closes the connection; what it said last."""
        rest = b""
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(4096):
                rest += chunk
        return rest

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def env(run_worker: Any, client: PalisadeClient, collect: Any, sink: Sink) -> Env:  # noqa: F811 - the imported fixture
    # A one-second idle timeout, so that disconnecting idle clients is quick to prove.
    return await make_env(run_worker, client, collect, sink, smtp_session_timeout=1.0)


async def conversation(env: Env, source_ip: str, *lines: bytes) -> RawSession:
    session = await RawSession.open(env.port, source_ip)
    if lines:
        await session.send(b"".join(lines))
    return session


async def test_a_pipelined_flood_past_50_recipients_relays_nothing(env: Env) -> None:
    a = env.a
    rcpts = [f"u{i}@example.com" for i in range(60)]
    # Everything in one write, the message included, without waiting for a single reply.
    session = await conversation(
        env,
        a.ip,
        b"EHLO app\r\n",
        f"MAIL FROM:<{a.sender}>\r\n".encode(),
        *(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts),
        b"DATA\r\n",
        env.good(a),
        b".\r\nQUIT\r\n",
    )
    replies = await session.replies(1 + 1 + 60 + 1 + 1 + 1)
    session.close()
    codes = [code for code, _ in replies]
    assert codes == [250, 250] + [250] * 50 + [550] * 10 + [354, 550, 221]
    assert all("Marketing mail is not permitted" in text for code, text in replies if code == 550)
    await env.rejected("marketing_too_many_recipients")
    assert not env.sink.messages
    assert (await relay_status(env.client, a.service_id)).quota_used == 0


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("MAIL FROM:<{sender}> X-INJECT=1", 501),  # an unknown MAIL parameter
        ("MAIL FROM:<{sender}> SIZE=abc", 501),
        ("MAIL FROM:<{sender}>\rRCPT TO:<x@example.com>", 501),  # a bare CR inside a command
        ("MAIL FROM:<{sender}>\x00", 501),
        ("MAIL FROM:<{sender}>, <other@example.com>", 501),
        ("RCPT TO:<ops@example.com> NOTIFY=NEVER", 555),  # no DSN here: an unknown RCPT parameter
        ("RCPT TO:<ops@example.com>\x00", 501),
        ("RCPT TO:<ops@example.com>, <all@example.com>", 501),
        ("RCPT TO:<ops@example.com>\rDATA", 555),  # the CR and what follows: no parameter we know
        ("RCPT TO:<" + "x" * 2000 + "@example.com>", 500),  # past the command line limit
    ],
)
async def test_a_parameter_or_command_line_that_smuggles_something_is_refused(
    env: Env, command: str, expected: int
) -> None:
    a = env.a
    session = await conversation(env, a.ip, b"EHLO app\r\n")
    await session.replies(1)
    if command.startswith("RCPT"):
        await session.send(f"MAIL FROM:<{a.sender}>\r\n".encode())
        assert (await session.replies(1))[0][0] == 250
    await session.send(command.format(sender=a.sender).encode("latin-1") + b"\r\n")
    [(code, text)] = await session.replies(1)
    assert code == expected, text
    # The session goes on, and nothing refused became part of a transaction.
    await session.send(b"RSET\r\nQUIT\r\n")
    assert [c for c, _ in await session.replies(2)] == [250, 221]
    session.close()
    assert not env.sink.messages


async def test_a_source_routed_recipient_goes_upstream_as_the_plain_address(env: Env) -> None:
    # RFC 5321 says to accept a source route and ignore it: relaying through the route
    # (@evil.example) would make the relay send where the client chose.
    a = env.a
    out = await env.send(a, ["<@evil.example:ops@example.com>"], env.good(a))
    assert out.code == 250, out
    await wait_until(lambda: bool(env.sink.messages), what="the message upstream")
    [delivered] = env.sink.messages
    assert delivered.rcpt_tos == ["ops@example.com"]


async def test_idle_half_sent_and_chattering_clients_are_cut_off_while_others_are_served(env: Env) -> None:
    a, b = env.a, env.b
    idle = [await conversation(env, a.ip, b"EHLO app\r\n") for _ in range(20)]
    half = [await conversation(env, a.ip, b"EHLO app\r\nMAIL FROM:<") for _ in range(5)]  # never finished
    chatter = await conversation(env, a.ip, b"EHLO app\r\n" + b"NOOP\r\n" * 25)
    bogus = await conversation(env, a.ip, b"EHLO app\r\n" + b"XYZZY\r\n" * 12)

    # Meanwhile a well-behaved service is served as usual.
    out = await env.send(b, ["ops@example.com"], env.good(b))
    assert out.code == 250, out

    noop_replies = (await chatter.closed_by_server(timeout=10)).decode()
    assert noop_replies.split("\r\n").count("250 OK") == 20  # the NOOP limit (COMMAND_CALL_LIMITS)
    assert noop_replies.rstrip().endswith("421 4.7.0 NOOP sent too many times")
    assert "502 5.5.1 Too many unrecognized commands, goodbye." in (await bogus.closed_by_server(timeout=10)).decode()
    # The idle timeout (one second here) closes everything that went quiet, finished or not.
    for session in idle + half:
        await session.closed_by_server(timeout=15)
    assert [m.mail_from for m in env.sink.messages] == [b.sender]
