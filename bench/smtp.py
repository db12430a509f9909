#!/usr/bin/env python
"""SMTP relay benchmark: the Palisade relay against a bare aiosmtpd pass-through relay,
same run, same local sink, same load.

(a) bare: aiosmtpd receiving, relaying each message upstream through the same pooled
    aiosmtplib upstream code the Palisade relay uses (`UpstreamPool`), no policy at all.
    It advertises the same EHLO extensions (PIPELINING), so clients behave the same.
(b) palisade: `python -m palisade_smtp_relay` (the real worker): connect-time lookup of
    the service, sender and header checks, marketing checks, the quota reservation
    (row lock + ring update, one transaction), the upstream relay, and the EmailRelayed
    event + audit record through the outbox, published to RabbitMQ with confirms.

Every process is separate and runs on uvloop, the event loop `palisade run` gives the relay
(until 2026-12 every process ran on asyncio's own loop, which held the sink and the load
generators, and with them the bare relay, back): the sink (aiosmtpd, counts messages), each
relay, and the load generators (asyncio aiosmtplib clients, each bound to its own 127.0.x.y source
address = its own service, one persistent connection each). A round: the generators
connect and warm up, then on "go" every client sends its messages, one recipient each;
the round ends when every client has its 250s and, for Palisade, when the outbox is
empty (publishing the events is part of the work). Throughput = messages / that time.
Rounds alternate bare/palisade (5 of each by default); the median of each is reported, and
the ratio, and each round's ratio to the bare round just before it. On this shared machine the
same relay's CPU per message moves by up to a third from one round to the next (the host's
other guests; its steal, printed per round, is only the visible part), so one round says little.
The per-round ratios are also given over the pairs of rounds in which the host took under 3 %
of the vCPUs (steal) in both.

Then 1,000,000 quota records of 3,334 other services, all inside the current window,
are inserted with one INSERT ... SELECT generate_series, and the rounds are repeated:
the Palisade relay's throughput with them against without them.

Loopback only; bounded loops. Run from the repository root:

    .venv/bin/python bench/smtp.py [--clients 100] [--messages 50] [--rounds 3]

It needs the local RabbitMQ (a vhost of its own is created and deleted) and
PostgreSQL (database palisade_bench). `BENCH_PROFILE=/tmp/relay.prof` runs the Palisade
relay under cProfile. Besides msg/s it prints each relay process's CPU time per message,
which moves much less than throughput when other work shares the machine, and the whole
machine's CPU per message by process (relay, PostgreSQL, RabbitMQ, sink, load generators):
with every process on two cores, the throughput ratio follows the machine's CPU per message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
for src in (REPO, REPO / "libs" / "events" / "src", REPO / "services" / "smtp-relay" / "src"):
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))

import aiosmtplib  # noqa: E402
import asyncpg  # noqa: E402
import uvloop  # noqa: E402
from aiosmtpd.smtp import SMTP, Envelope, Session  # noqa: E402

from bench.procfs import CLK_TCK, machine_ticks, pids, process_ticks, server_of  # noqa: E402

VHOST = "palisade-bench-smtp"
AMQP_URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
DB_URL = os.environ.get("PALISADE_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/palisade_bench")
SCHEMA = "palisade_smtp_relay"
SENDER_DOMAIN = "bench.example"
MAX_SIZE = 10 * 1024 * 1024
QUIET_STEAL_PCT = 3.0  # a round with more host steal than this measures the host as much as the relay
RATIO_TARGET = 0.7
ROWS_TARGET = 0.9
OTHER_RECORDS = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_ip(i: int) -> str:
    return f"127.0.{10 + i // 250}.{1 + i % 250}"


def client_slug(i: int) -> str:
    return f"bench-client-{i}"


def bench_message(sender: str, i: int) -> bytes:
    body = f"Hello,\r\n\r\nYour order 10{i:04d} has shipped. Track it at https://shop.example/t/{i}\r\n"
    body += "This is a transactional notification of a realistic size. " * 12 + "\r\n"
    return (
        f"From: Shop <{sender}>\r\nTo: customer{i}@example.com\r\nSubject: Your order has shipped\r\n"
        f"Message-ID: <order-{i}-{time.time_ns()}@shop.example>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


# =====================================================================  child roles


class _SinkHandler:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        self.count += 1
        return "250 OK"


async def role_sink(port: int) -> None:
    handler = _SinkHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.bench", data_size_limit=MAX_SIZE, loop=loop), "127.0.0.1", port
    )
    print("ready", flush=True)
    await _until_stdin_closes(lambda line: print(f"count {handler.count}", flush=True) if line == "count" else None)
    server.close()


class _BareHandler:
    """Pass-through: every message straight to the sink, nothing else."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def handle_EHLO(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        try:
            await self.pool.send(envelope.mail_from, envelope.rcpt_tos, envelope.original_content, eight_bit=False)
        except Exception:  # noqa: BLE001 - the benchmark counts non-250 replies
            return "451 4.3.0 upstream failed"
        return "250 2.0.0 OK"


async def role_bare_relay(port: int, sink_port: int) -> None:
    import logging

    from palisade_smtp_relay.settings import RelaySettings
    from palisade_smtp_relay.upstream import UpstreamPool

    logging.getLogger("mail.log").setLevel(logging.WARNING)  # as the Palisade relay does
    settings = RelaySettings(smarthost=f"127.0.0.1:{sink_port}", smtp_hostname="bare.bench")
    pool = UpstreamPool(settings)
    handler = _BareHandler(pool)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare.bench", data_size_limit=MAX_SIZE, loop=loop),
        "127.0.0.1",
        port,
        reuse_address=True,
    )
    print("ready", flush=True)
    await _until_stdin_closes(lambda _: None)
    server.close()
    await pool.close()


async def role_load(port: int, first: int, clients: int, messages: int) -> None:
    """`clients` connections (client i = service first+i); on "go", each sends `messages`."""

    async def connect(i: int) -> aiosmtplib.SMTP:
        sender = f"{client_slug(i)}@{SENDER_DOMAIN}"
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=port,
            source_address=(client_ip(i), 0),
            local_hostname=f"client{i}.bench",
            start_tls=False,
            timeout=120,
        )
        await smtp.connect()
        await smtp.sendmail(sender, [f"warmup{i}@example.com"], bench_message(sender, 0))
        return smtp

    async def send_all(i: int, smtp: aiosmtplib.SMTP) -> tuple[int, int]:
        sender = f"{client_slug(i)}@{SENDER_DOMAIN}"
        ok = failed = 0
        for n in range(messages):
            try:
                await smtp.sendmail(sender, [f"customer{n}@example.com"], bench_message(sender, n))
                ok += 1
            except aiosmtplib.SMTPException as exc:
                failed += 1
                if failed == 1:
                    print(f"error {exc!r}", flush=True)
        await smtp.quit()
        return ok, failed

    smtps = await asyncio.gather(*(connect(first + i) for i in range(clients)))
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    assert line.strip() == "go", line
    results = await asyncio.gather(*(send_all(first + i, smtp) for i, smtp in enumerate(smtps)))
    print(f"done {sum(r[0] for r in results)} {sum(r[1] for r in results)}", flush=True)


async def _until_stdin_closes(on_line: Any) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        on_line(line.strip())


# =====================================================================  the coordinator


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process

    async def line(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not raw:
                raise RuntimeError(f"{self.name} exited ({await self.proc.wait()})")
            text = raw.decode().strip()
            if text.startswith("error "):
                print(f"  [{self.name}] {text}")
                continue
            return text

    async def expect(self, word: str, timeout: float = 60) -> str:
        text = await self.line(timeout)
        if not text.startswith(word):
            raise RuntimeError(f"{self.name}: expected {word!r}, got {text!r}")
        return text

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.terminate()
                await self.proc.wait()


async def spawn(name: str, *args: str, env: dict[str, str] | None = None, log: Path | None = None) -> Child:
    out: Any = asyncio.subprocess.PIPE
    if log is not None:
        out = log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=out,
        stderr=asyncio.subprocess.STDOUT if log is not None else None,
        env=env,
    )
    return Child(name, proc)


async def start_palisade_relay(port: int, sink_port: int, log: Path) -> Child:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "PYTHONUNBUFFERED": "1",
        "PALISADE_AMQP_URL": AMQP_URL,
        "PALISADE_DATABASE_URL": DB_URL,
        "PALISADE_METRICS_PORT": "0",
        "PALISADE_SMTP_LISTEN": f"127.0.0.1:{port}",
        "PALISADE_SMTP_HOSTNAME": "palisade.bench",
        "PALISADE_PRIVATE_NETWORK": "127.0.0.0/16",
        "PALISADE_SENDER_DOMAIN": SENDER_DOMAIN,
        "PALISADE_SMARTHOST": f"127.0.0.1:{sink_port}",
        "PALISADE_LOG_LEVEL": "INFO",
    }
    profile = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
    child = await spawn("palisade", *profile, "-m", "palisade_smtp_relay", env=env, log=log)
    deadline = time.monotonic() + 60
    while "smtp-relay ready" not in (text := await asyncio.to_thread(log.read_text, errors="replace")):
        if child.proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Palisade relay did not start:\n{text[-3000:]}")
        await asyncio.sleep(0.1)
    return child


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=False, capture_output=True, timeout=120)


@contextlib.asynccontextmanager
async def bench_state() -> AsyncIterator[asyncpg.Connection]:
    """A vhost and a clean relay schema in palisade_bench, removed afterwards."""
    rabbitmqctl("delete_vhost", VHOST)
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    from palisade_events.db import ensure_database

    await ensure_database(DB_URL)
    conn = await asyncpg.connect(DB_URL)
    if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('palisade-bench-smtp'))"):
        await conn.close()
        raise SystemExit("another bench/smtp.py is running against this database")
    await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    try:
        yield conn
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await conn.close()
        rabbitmqctl("delete_vhost", VHOST)


async def provision_clients(conn: asyncpg.Connection, clients: int) -> None:
    # The projection as ServiceProvisioned would leave it; the bus path is not what is measured.
    await conn.executemany(
        f"INSERT INTO {SCHEMA}.services (service_id, slug, private_ip, provisioned_at) VALUES ($1, $2, $3, now())",
        [(f"svc-{client_slug(i)}", client_slug(i), client_ip(i)) for i in range(clients)],
    )


async def reset_quota(conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"UPDATE {SCHEMA}.services SET sends = '{{}}', last_send_at = NULL WHERE service_id LIKE 'svc-bench-client-%'"
    )


async def insert_other_services(conn: asyncpg.Connection, records: int) -> tuple[int, int, float]:
    """`records` send times of other services, all inside the current window, in one statement:
    full rings of 300 (the most a ring holds), the last one partial."""
    per = 300
    services = -(-records // per)
    started = time.perf_counter()
    await conn.execute(
        f"""
        INSERT INTO {SCHEMA}.services (service_id, slug, private_ip, provisioned_at, sends, last_send_at)
        SELECT 'svc-bench-other-' || g, 'bench-other-' || g,
               '10.' || (g / 65536) || '.' || (g / 256 % 256) || '.' || (g % 256), now(),
               ARRAY(SELECT now() - make_interval(secs => 3500 * random())
                     FROM generate_series(1, least({per}, {records} - (g - 1) * {per})) ORDER BY 1),
               now()
        FROM generate_series(1, {services}) AS g
        """
    )
    took = time.perf_counter() - started
    await settle(conn)
    total = await conn.fetchval(
        f"SELECT sum(cardinality(sends)) FROM {SCHEMA}.services WHERE service_id LIKE 'svc-bench-other-%'"
        " AND last_send_at > now() - interval '1 hour'"
    )
    return services, int(total), took


async def delete_other_services(conn: asyncpg.Connection) -> None:
    await conn.execute(f"DELETE FROM {SCHEMA}.services WHERE service_id LIKE 'svc-bench-other-%'")
    await settle(conn)


async def settle(conn: asyncpg.Connection) -> None:
    """Measure the state, not the bulk write that made it: vacuum, statistics, checkpoint."""
    await conn.execute(f"VACUUM ANALYZE {SCHEMA}.services")
    await conn.execute("CHECKPOINT")


async def outbox_drained(conn: asyncpg.Connection, deadline: float) -> None:
    """Poll (another process's table) until every outbox row is published."""
    query = f"SELECT count(*) FROM {SCHEMA}.outbox WHERE published_at IS NULL"
    while time.monotonic() < deadline:
        if not await conn.fetchval(query):
            return
        await asyncio.sleep(0.005)
    raise RuntimeError("the outbox was not drained in time")


@dataclass
class RoundResult:
    rate: float  # messages per second
    machine_ms: dict[str, float]  # CPU time per message of every process on the machine, by role
    steal_pct: float  # of the round's vCPU time, taken by the host for other guests

    @property
    def cpu_ms(self) -> float:
        """CPU time of the relay process per message."""
        return self.machine_ms["relay"]


ROLES = ("relay", "postgres", "rabbitmq", "sink", "load", "other")


def machine_cpu(roles: dict[int, str]) -> dict[int, tuple[str, float]]:
    """Every process's user + system seconds so far, with its role: the given pids by name,
    PostgreSQL's and RabbitMQ's processes by their program, the rest 'other'."""
    found: dict[int, tuple[str, float]] = {}
    for pid in pids():
        got = process_ticks(pid)
        if got is not None:
            comm, ticks = got
            found[pid] = (roles.get(pid) or server_of(comm) or "other", ticks / CLK_TCK)
    return found


def machine_cpu_spent(before: dict[int, tuple[str, float]], *later: dict[int, tuple[str, float]]) -> dict[str, float]:
    """Seconds by role from the `before` reading to the last later reading each process is in
    (the load generators exit once done, before the outbox is drained)."""
    spent = dict.fromkeys(ROLES, 0.0)
    last: dict[int, tuple[str, float]] = {}
    for reading in later:
        last.update(reading)
    for pid, (role, seconds) in last.items():
        spent[role] += seconds - (before[pid][1] if pid in before and before[pid][0] == role else 0.0)
    return spent


def host_steal_seconds() -> float:
    """Seconds so far that the hypervisor ran something else while a vCPU of this machine had
    work (steal, summed over the vCPUs). It slows a round without showing in any process's CPU
    time, so each round reports it: rounds with much of it are not comparable."""
    return machine_ticks()[1] / CLK_TCK


async def run_round(
    port: int,
    relay_pid: int,
    sink_pid: int,
    clients: int,
    messages: int,
    generators: int,
    conn: asyncpg.Connection | None,
) -> RoundResult:
    """One round against the relay on `port`."""
    per = [clients // generators + (1 if g < clients % generators else 0) for g in range(generators)]
    firsts = [sum(per[:g]) for g in range(generators)]
    gens = [
        await spawn(f"load{g}", str(SCRIPT), "--role", "load", "--port", str(port),
                    "--first", str(firsts[g]), "--clients", str(per[g]), "--messages", str(messages))
        for g in range(generators)
    ]  # fmt: skip
    try:
        for g in gens:
            await g.expect("ready", 120)
        roles = {relay_pid: "relay", sink_pid: "sink", **{g.proc.pid: "load" for g in gens}}
        machine_before = await asyncio.to_thread(machine_cpu, roles)
        steal_before = host_steal_seconds()
        started = time.perf_counter()
        for g in gens:
            g.send("go")
        ok = failed = 0
        for g in gens:
            _, a, b = (await g.expect("done", 600)).split()
            ok, failed = ok + int(a), failed + int(b)
        machine_done = await asyncio.to_thread(machine_cpu, roles)
        if conn is not None:  # publishing the events is part of the work
            await outbox_drained(conn, time.monotonic() + 120)
        elapsed = time.perf_counter() - started
        stolen = host_steal_seconds() - steal_before
        machine = machine_cpu_spent(machine_before, machine_done, await asyncio.to_thread(machine_cpu, roles))
    finally:
        for g in gens:
            await g.stop()
    expected = clients * messages
    if ok != expected or failed:
        raise RuntimeError(f"{ok} of {expected} messages accepted, {failed} refused")
    return RoundResult(
        expected / elapsed,
        {k: 1000 * v / expected for k, v in machine.items()},
        100 * stolen / (elapsed * (os.cpu_count() or 1)),
    )


async def main(args: argparse.Namespace) -> int:
    if args.clients * (args.messages + 1) > 0 and args.messages + 1 > 300:
        raise SystemExit("--messages must stay below 300: every client is one service with a 300/h quota")
    tmp = REPO / ".run" / "bench-smtp"
    tmp.mkdir(parents=True, exist_ok=True)
    sink_port, bare_port, palisade_port = free_port(), free_port(), free_port()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; {args.clients} clients "
          f"(one service each, {args.generators} load processes) x {args.messages} messages, one recipient each; "
          f"{args.rounds} rounds, each: bare, Palisade, then both again with 1,000,000 quota records of other"
          " services in the window")  # fmt: skip
    async with bench_state() as conn:
        sink = await spawn("sink", str(SCRIPT), "--role", "sink", "--port", str(sink_port))
        await sink.expect("ready")
        bare = await spawn("bare", str(SCRIPT), "--role", "bare-relay", "--port", str(bare_port),
                           "--sink-port", str(sink_port))  # fmt: skip
        await bare.expect("ready")
        palisade = await start_palisade_relay(palisade_port, sink_port, tmp / "palisade-relay.log")
        try:
            await provision_clients(conn, args.clients)
            results: dict[str, list[RoundResult]] = {}
            relays = (("bare", bare_port, bare.proc.pid), ("palisade", palisade_port, palisade.proc.pid))
            for r in range(args.rounds):
                # Interleaved, so that what else the machine does weighs on both alike.
                for phase in ("", "+1M"):
                    if phase:
                        services, records, took = await insert_other_services(conn, OTHER_RECORDS)
                        if r == 0:
                            print(f"  ({records:,} quota records of {services:,} other services inserted in the"
                                  f" window by one INSERT ... SELECT generate_series in {took:.1f} s)")  # fmt: skip
                    for name, port, pid in relays:
                        await reset_quota(conn)
                        res = await run_round(
                            port, pid, sink.proc.pid, args.clients, args.messages, args.generators,
                            conn if name == "palisade" else None,
                        )  # fmt: skip
                        results.setdefault(name + phase, []).append(res)
                        print(f"  round {r + 1} {name + phase:>12}: {res.rate:8.1f} msg/s, relay CPU "
                              f"{res.cpu_ms:5.2f} ms/msg, machine {sum(res.machine_ms.values()):5.2f}, "
                              f"host steal {res.steal_pct:4.1f} %")  # fmt: skip
                    if phase:
                        await delete_other_services(conn)
            sink.send("count")
            delivered = int((await sink.expect("count")).split()[1])
            batching = await reservations_per_statement(tmp / "palisade-relay.log")
        finally:
            await palisade_stop(palisade)
            await bare.stop()
            await sink.stop()

    def med(key: str, attr: str = "rate") -> float:
        return float(statistics.median(getattr(x, attr) for x in results[key]))

    ratio = med("palisade") / med("bare")
    ratio_1m = med("palisade+1M") / med("palisade")
    print()
    print(f"bare aiosmtpd pass-through relay  {med('bare'):8.1f} msg/s   relay CPU {med('bare', 'cpu_ms'):5.2f} ms/msg"
          f"   (medians of {args.rounds} rounds)")  # fmt: skip
    print(f"Palisade relay                    {med('palisade'):8.1f} msg/s   relay CPU "
          f"{med('palisade', 'cpu_ms'):5.2f} ms/msg")  # fmt: skip
    print(f"ratio Palisade / bare             {ratio:8.2f}   (target >= {RATIO_TARGET})")
    print(f"  the same from CPU per message     {med('bare', 'cpu_ms') / med('palisade', 'cpu_ms'):6.2f}"
          "   (what one relay process can do when it has a core to itself)")  # fmt: skip
    # Each Palisade round over the bare round just before it, with the more of the two's steal.
    rounds = zip(results["palisade"], results["bare"], strict=True)
    pairs = [(p.rate / b.rate, max(p.steal_pct, b.steal_pct)) for p, b in rounds]
    paired = sorted(r for r, _ in pairs)
    quiet = sorted(r for r, steal in pairs if steal < QUIET_STEAL_PCT)
    print(f"  per round (each Palisade round over the bare round just before it): "
          f"{', '.join(f'{x:.2f}' for x in paired)}; median {statistics.median(paired):.2f}")  # fmt: skip
    print(f"  over the {len(quiet)} pairs in which the host took under {QUIET_STEAL_PCT:g} % of the vCPUs"
          f" in both rounds: {', '.join(f'{x:.2f}' for x in quiet) or '-'}"
          + (f"; median {statistics.median(quiet):.2f}" if quiet else ""))  # fmt: skip
    for key in ("bare", "palisade"):
        by_role = {role: statistics.median(x.machine_ms[role] for x in results[key]) for role in ROLES}
        print(f"  machine CPU per message, {key + ':':9} {sum(by_role.values()):5.2f} ms  ("
              + ", ".join(f"{role} {ms:.2f}" for role, ms in by_role.items()) + ")")  # fmt: skip
    print(f"Palisade relay, 1M records        {med('palisade+1M'):8.1f} msg/s   relay CPU "
          f"{med('palisade+1M', 'cpu_ms'):5.2f} ms/msg   (bare meanwhile: {med('bare+1M'):.1f} msg/s)")  # fmt: skip
    print(f"ratio with / without 1M records   {ratio_1m:8.2f}   (target >= {ROWS_TARGET})")
    print(f"  the same from CPU per message     {med('palisade', 'cpu_ms') / med('palisade+1M', 'cpu_ms'):6.2f}")
    print(f"host steal, median of the rounds   bare {med('bare', 'steal_pct'):.1f} %, Palisade "
          f"{med('palisade', 'steal_pct'):.1f} %   (vCPU time the hypervisor gave to other guests)")  # fmt: skip
    print(f"load average at the end           {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
          f"   (other work on the machine moves msg/s)")  # fmt: skip
    print(f"messages the sink received        {delivered:,}")
    print(f"reservations per statement        {batching}   (the relay's palisade_smtp_reservations_per_statement)")
    return 0 if ratio >= RATIO_TARGET and ratio_1m >= ROWS_TARGET else 1


async def reservations_per_statement(log: Path) -> str:
    """Mean reservations per database statement over the whole run, from the relay's metrics."""
    found = re.search(r"metrics on (http://\S+/metrics)", await asyncio.to_thread(log.read_text, errors="replace"))
    if found is None:
        return "unknown (no metrics address in the relay's log)"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(found.group(1), timeout=10).read().decode())
    values = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^palisade_smtp_reservations_per_statement_(sum|count) (\S+)$", text, re.M)
    }
    if not values.get("count"):
        return "none observed"
    return f"{values['sum'] / values['count']:.2f} on average, {values['count']:,.0f} statements"


async def palisade_stop(child: Child) -> None:
    if child.proc.returncode is None:
        child.proc.terminate()
        try:
            await asyncio.wait_for(child.proc.wait(), 30)
        except TimeoutError:
            child.proc.kill()
            await child.proc.wait()


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("main", "sink", "bare-relay", "load"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sink-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=100, help="concurrent clients, one service each")
    p.add_argument("--messages", type=int, default=50, help="messages per client and round (< 300)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per relay and phase")
    p.add_argument("--generators", type=int, default=2, help="load generator processes")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse(sys.argv[1:])
    # Every process on the event loop `palisade run` gives the relay (uvloop): the bare relay
    # gets the same advantage, the sink and the load generators are not the bottleneck.
    if ns.role == "sink":
        uvloop.run(role_sink(ns.port))
    elif ns.role == "bare-relay":
        uvloop.run(role_bare_relay(ns.port, ns.sink_port))
    elif ns.role == "load":
        uvloop.run(role_load(ns.port, ns.first, ns.clients, ns.messages))
    else:
        sys.exit(asyncio.run(main(ns)))
