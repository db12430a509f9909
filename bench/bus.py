#!/usr/bin/env python
"""Bus benchmark: the Palisade runtime against a raw aio-pika worker, same broker, same queue type.

(a) raw: a worker process that consumes a command from a quorum queue, publishes an
    event with a publisher confirm (mandatory, persistent), then acks. No database.
(b) palisade: a worker process running `WorkerRuntime` with the probe worker's types and
    migrations (tests/backbone/probe.py) and a handler that does what the issue measures:
    inbox insert, one state-row update, the event (and the command's audit record)
    through the outbox and its relay. The handler leaves its update for the COMMIT
    (`Context.write_at_commit`, as the lifecycle worker's last writes do: a batch's updates
    then take one round trip); `--awaited-write` awaits it in the handler instead. The handler
    touches only the database, so the worker group-commits (WorkerSpec.group_commit, as the
    lifecycle worker does): messages the broker hands over together share one transaction;
    `--per-message` measures one transaction per message. (The probe's own handler also reads
    its failure switch and writes an effect row, for the tests; `--probe-handler` measures that one.)

Both workers run in their own process (the load generator does not share their event
loop), with the runtime's prefetch, and are driven over stdin (`resume`/`pause`/`stop`).

(0) floor: no worker at all. The collector takes the commands straight from a quorum queue
    of their own, at the latency run's rate. What is left is what every worker's latency
    includes and cannot go under: the load generator, the broker's quorum queue and the
    collector, and the share of the two cores they take at that rate. `--no-floor` skips it.

Throughput: N commands are published (with confirms) into the worker's queue while its
consumer is cancelled; then the consumer is started and the time until the N-th event
reached a collector queue is measured. That is the worker's drain rate: the load
generator does nothing but count events meanwhile.

Before each measured run the bench takes a PostgreSQL checkpoint (`settle_database`): it
recycles the WAL segments the previous run filled as the next ones, as a running server's
periodic checkpoints do, so no commit has to make one mid-run; each run prints how many were
made anyway ("WAL segments made").

Latency: commands are published at a steady 0.5 x the measured (b) throughput for a few
seconds; each command's `n` maps to its send time, each event carries the same `n`, so
latency = command publish -> event received by the collector. Each run also prints the CPU
per message of the worker, PostgreSQL, RabbitMQ and the load generator: at a steady rate
every part costs more per message than in a drain (fewer messages share each wake-up).

The load generator publishes each command as `palisade_events.amqp.Publisher` does (the
frames `palisade publish` and the workers send: persistent, mandatory, confirmed), and the
collector consumes every arm's events, over one lean connection (bench/lean_amqp.py): they
stand in for other machines but run on the two cores the workers use, and through Publisher
and an aio-pika consumer they took 0.32-0.38 ms of CPU per message at the latency run's rate,
against 0.14-0.18 ms now. Since 2026-12-05; the drain rates measured before that were lower
(the collector's share of the machine bounded them too), and the latency rate with them.

Run from the repository root:  .venv/bin/python bench/bus.py [--count 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EVENTS_SRC = REPO / "libs" / "events" / "src"
SCRIPT = Path(__file__).resolve()
sys.path[:0] = [p for p in (str(REPO), str(EVENTS_SRC)) if p not in sys.path]

import aio_pika  # noqa: E402
import asyncpg  # noqa: E402
import uvloop  # noqa: E402  (both workers on the loop `palisade run` uses)
from aio_pika.abc import (  # noqa: E402
    AbstractChannel,
    AbstractIncomingMessage,
    DeliveryMode,
)

from bench.lean_amqp import LeanAmqp, LeanAmqpError  # noqa: E402
from bench.procfs import CLK_TCK, machine_ticks, pids, process_ticks, runqueue_wait_ms, server_of  # noqa: E402
from palisade_events import Context, RuntimeSettings, WorkerRuntime, new_envelope  # noqa: E402
from palisade_events.amqp import connect  # noqa: E402
from palisade_events.db import schema_name  # noqa: E402
from palisade_events.messages import encode  # noqa: E402
from palisade_events.runtime import freeze_startup_heap  # noqa: E402
from palisade_events.topology import (  # noqa: E402
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    dead_queue,
    declare_exchanges,
    retry_queue,
    work_queue,
)
from tests.backbone.probe import probe_spec, probe_types  # noqa: E402

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/palisade_bench"
RATIO_TARGET = 0.5
P99_TARGET_MS = 25.0


# =====================================================================  workers (child processes)


async def _control_loop(
    handlers: dict[str, Callable[[], Awaitable[str]]],
) -> None:
    """Read one command per line from stdin, answer `ok <command> [detail]` on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := await reader.readline():
        cmd, _, arg = line.decode().strip().partition(" ")
        if cmd == "stop":
            return
        if cmd == "cpu":
            ru = resource.getrusage(resource.RUSAGE_SELF)
            print(f"ok cpu {ru.ru_utime + ru.ru_stime:.4f}", flush=True)
            continue
        if cmd == "profile":
            detail = _profile(arg)
            print(f"ok profile {detail}", flush=True)
            continue
        handler = handlers.get(cmd)
        if handler is None:
            print(f"error unknown command {cmd!r}", flush=True)
            continue
        print(f"ok {cmd} {await handler()}", flush=True)


_profiler: Any = None


def _profile(arg: str) -> str:
    """`profile on` starts cProfile in the worker; `profile <path>` stops it and dumps the stats."""
    global _profiler
    import cProfile

    if arg == "on":
        _profiler = cProfile.Profile()
        _profiler.enable()
        return "on"
    if _profiler is not None:
        _profiler.disable()
        _profiler.dump_stats(arg)
        _profiler = None
    return arg


STATE_ROW_UPDATE = (
    "INSERT INTO service_state (service_id, handled) VALUES ($1, 1)"
    " ON CONFLICT (service_id) DO UPDATE SET handled = service_state.handled + 1"
)


def one_state_row_update(types: Any, *, awaited: bool = False) -> Callable[[Any, Context[None]], Awaitable[None]]:
    async def on_command(cmd: Any, ctx: Context[None]) -> None:
        # The state row of the command's service, as a real worker's handler updates it.
        if awaited:
            await ctx.db.execute(STATE_ROW_UPDATE, ctx.service_id or "")
        else:
            ctx.write_at_commit(STATE_ROW_UPDATE, ctx.service_id or "")
        await ctx.emit(types.ProbeDone(n=cmd.n))

    return on_command


async def palisade_worker(
    name: str,
    amqp_url: str,
    database_url: str,
    *,
    probe_handler: bool = False,
    group_commit: bool = True,
    awaited_write: bool = False,
) -> None:
    """The probe worker under the real runtime, started with its consumer cancelled."""
    spec, types = probe_spec(name)
    if not probe_handler:
        handler = one_state_row_update(types, awaited=awaited_write)
        spec = dataclasses.replace(spec, handlers={**spec.handlers, types.ProbeCommand: handler})
    # Its handler only touches the database, like the lifecycle worker's, which group-commits too.
    spec = dataclasses.replace(spec, group_commit=group_commit)
    # Everything else (prefetch, pool size, outbox batch) comes from PALISADE_* or the defaults.
    settings = RuntimeSettings(amqp_url=amqp_url, database_url=database_url, metrics_port=0)
    rt = WorkerRuntime(spec, settings)
    await rt.start(consume=False)
    freeze_startup_heap()  # as `palisade run` does once its worker started

    async def resume() -> str:
        await rt.resume()
        return ""

    async def pause() -> str:
        await rt.pause()
        return ""

    try:
        await _control_loop({"resume": resume, "pause": pause})
    finally:
        await rt.stop()


async def raw_worker(name: str, amqp_url: str, prefetch: int) -> None:
    """Consume a command, publish an event with a confirm, ack. Nothing else."""
    cmd_key = probe_types(name).ProbeCommand.routing_key()
    event_key = probe_types(name).ProbeDone.routing_key()
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        pub = await connection.channel(publisher_confirms=True, on_return_raises=True)
        events = await pub.get_exchange(EVENTS_EXCHANGE, ensure=False)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        await declare_exchanges(channel)
        queue = await channel.declare_queue(work_queue(name), durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(COMMANDS_EXCHANGE, cmd_key)
        freeze_startup_heap()  # the same process hygiene as the Palisade worker's

        async def on_message(message: AbstractIncomingMessage) -> None:
            event = aio_pika.Message(
                message.body,  # the envelope carries `n`, which is all the collector reads
                message_id=str(uuid.uuid4()),
                type="ProbeDone",
                correlation_id=message.message_id,
                content_type="application/json",
                delivery_mode=DeliveryMode.PERSISTENT,
                headers={},
            )
            await events.publish(event, event_key, mandatory=True, timeout=10)
            await message.ack()

        tag: list[str] = []

        async def resume() -> str:
            if not tag:
                tag.append(await queue.consume(on_message, no_ack=False))
            return ""

        async def pause() -> str:
            if tag:
                await queue.cancel(tag.pop())
            return ""

        await _control_loop({"resume": resume, "pause": pause})
    finally:
        await connection.close()


async def no_worker() -> None:
    """The floor's stand-in: a process that answers the driver and does nothing, so the floor
    runs through the same driver as the workers (the collector consumes the commands itself)."""

    async def nothing() -> str:
        return ""

    await _control_loop({"resume": nothing, "pause": nothing})


# =====================================================================  the load generator


class WorkerProc:
    """A worker child process driven over its stdin/stdout."""

    def __init__(self, kind: str, name: str, args: argparse.Namespace) -> None:
        self.kind = kind
        self.name = name
        self._args = args
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 60.0) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(EVENTS_SRC), os.environ.get("PYTHONPATH", "")]),
            "PALISADE_LOG_LEVEL": os.environ.get("PALISADE_LOG_LEVEL", "WARNING"),
        }
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--worker",
            self.kind,
            "--name",
            self.name,
            "--amqp-url",
            self._args.amqp_url,
            "--database-url",
            self._args.database_url,
            "--prefetch",
            str(self._args.prefetch),
            *(["--probe-handler"] if self._args.probe_handler else []),
            *(["--per-message"] if self._args.per_message else []),
            *(["--awaited-write"] if self._args.awaited_write else []),
        ]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=REPO
        )
        if self._args.worker_nice:
            # Both workers alike: the system under test ahead of the load generator and the
            # collector, which stand in for other machines (a negative value needs root).
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, self._args.worker_nice)
        line = await asyncio.wait_for(self._readline(), timeout)
        if line != "ready":
            raise RuntimeError(f"{self.kind} worker did not start: {line!r}")

    async def _readline(self) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"{self.kind} worker exited (code {await self.proc.wait()})")
        return raw.decode().strip()

    async def call(self, command: str, timeout: float = 30.0) -> str:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self._readline(), timeout)
        verb = command.split(" ", 1)[0]
        if not line.startswith(f"ok {verb}"):
            raise RuntimeError(f"{self.kind} worker: {command!r} -> {line!r}")
        return line[len(f"ok {verb}") :].strip()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
            self.proc.stdin.close()
            await asyncio.wait_for(self.proc.wait(), 30)
        except (TimeoutError, ConnectionError, RuntimeError):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass
class Collector:
    """Counts events by `n` as they arrive and keeps their arrival time."""

    arrived: dict[int, float] = field(default_factory=dict)
    expected: set[int] = field(default_factory=set)
    duplicates: int = 0
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, ns: Sequence[int]) -> None:
        self.expected = set(ns)
        self.arrived = {}
        self.duplicates = 0
        self._done = asyncio.Event()

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        n = json.loads(body)["payload"]["n"]
        if n not in self.expected:
            return
        if n in self.arrived:
            self.duplicates += 1
            return
        self.arrived[n] = now
        if len(self.arrived) == len(self.expected):
            self._done.set()

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        except TimeoutError:
            return False
        return True


GROUPS = ("worker", "postgres", "rabbitmq", "bench")


@dataclass
class CpuSample:
    wall: float
    machine_busy: int  # jiffies, all CPUs
    steal: int  # jiffies the host gave to other guests, all CPUs
    procs: dict[int, tuple[str, int]]  # pid -> (group, jiffies)
    waits: dict[int, float] = field(default_factory=dict)  # pid -> runqueue_wait_ms so far

    def per_group(self, later: CpuSample) -> dict[str, int]:
        """Jiffies used per group between this sample and `later`: a process born in between
        counts whole (a pool's new connection); one that ended in between is lost."""
        out = dict.fromkeys(GROUPS, 0)
        for pid, (group, jiffies) in later.procs.items():
            before = self.procs.get(pid)
            out[group] += jiffies - (before[1] if before is not None else 0)
        return out

    def wait_per_group(self, later: CpuSample) -> dict[str, float]:
        """Ms each group spent runnable but waiting for a core between the two samples."""
        out = dict.fromkeys(GROUPS, 0.0)
        for pid, (group, _) in later.procs.items():
            out[group] += later.waits.get(pid, 0.0) - self.waits.get(pid, 0.0)
        return out


def cpu_ms_per_msg(before: CpuSample, after: CpuSample, messages: int) -> dict[str, float]:
    """CPU ms per message of each group between two samples, and `other`: the machine's busy
    time not in the groups (kernel threads, softirq, other processes)."""
    n = max(messages, 1)
    out = {g: j / CLK_TCK * 1000 / n for g, j in before.per_group(after).items()}
    busy = (after.machine_busy - before.machine_busy) / CLK_TCK * 1000 / n
    out["other"] = max(0.0, busy - sum(out.values()))
    return out


def cpu_sample(worker_pid: int) -> CpuSample:
    """CPU time so far of the worker, this process, PostgreSQL and RabbitMQ (from /proc)."""
    wall, busy, steal = _machine_busy()
    me = os.getpid()
    procs: dict[int, tuple[str, int]] = {}
    for pid in pids():
        got = process_ticks(pid)
        if got is None:
            continue
        comm, ticks = got
        group = "worker" if pid == worker_pid else "bench" if pid == me else server_of(comm)
        if group is not None:
            procs[pid] = (group, ticks)
    return CpuSample(wall, busy, steal, procs, {pid: runqueue_wait_ms(pid) for pid in procs})


def _machine_busy() -> tuple[float, int, int]:
    """(now, busy ticks, stolen ticks), all CPUs so far (procfs.machine_ticks)."""
    busy, steal = machine_ticks()
    return time.perf_counter(), busy, steal


async def background_busy(quiet: float, window: float = 0.5, patience: float = 120.0) -> float:
    """Machine CPU use (%) while our workers are idle: what other tenants are doing.
    With `quiet` > 0, wait (up to `patience` s) until it is below `quiet` %."""
    deadline = time.perf_counter() + patience
    while True:
        t0, b0, _ = _machine_busy()
        await asyncio.sleep(window)
        t1, b1, _ = _machine_busy()
        pct = (b1 - b0) / CLK_TCK / ((t1 - t0) * (os.cpu_count() or 1)) * 100
        if quiet <= 0 or pct < quiet or time.perf_counter() > deadline:
            return pct


class StealSampler:
    """Host steal per vCPU over time: the time the hypervisor ran something else while a
    vCPU of this machine had work (the `steal` column of /proc/stat, in 1/CLK_TCK ticks).
    A vCPU stolen for 50-100 ms stalls whatever process was on it, and no code in this
    machine can make up for that, so each latency run says how much of its tail coincides
    with it. A thread of the load generator reads the file every 10 ms (a few µs each)."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.samples: list[tuple[float, list[int]]] = []  # (perf_counter, steal ticks per vCPU)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steal-sampler", daemon=True)

    @staticmethod
    def read() -> list[int]:
        with open("/proc/stat") as f:
            return [int(line.split()[8]) for line in f if line.startswith("cpu") and line[3].isdigit()]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.read()))
            self._stop.wait(self.every)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def since(self, start: float) -> list[tuple[float, list[int]]]:
        """The samples with times in seconds from `start` (a perf_counter time)."""
        return [(t - start, v) for t, v in self.samples]


def stolen_ms(samples: Sequence[tuple[float, Sequence[int]]], t0: float, t1: float) -> list[float]:
    """Steal per vCPU between times t0 and t1 of `samples` (ms, at tick resolution)."""
    before = next((v for t, v in reversed(samples) if t <= t0), None)
    after = next((v for t, v in samples if t >= t1), None)
    if before is None or after is None:
        return []
    return [(b - a) * 1000 / CLK_TCK for a, b in zip(before, after, strict=True)]


@dataclass
class PgSample:
    commits: int
    wal_syncs: int
    wal_segment: int  # the number of the WAL segment being written
    wal_ready: int | None  # segments made ahead of it (recycled by a checkpoint); None: not readable


def wal_segments_created(before: PgSample, after: PgSample) -> int | None:
    """WAL segments some commit had to make between two samples: every segment the writing
    went into beyond those that were ready. Making one zero-fills 16 MB while the committing
    backend holds the WAL write lock: every commit of the database waits (40-55 ms here)."""
    if before.wal_ready is None:
        return None
    return max(0, after.wal_segment - before.wal_segment - before.wal_ready)


async def pg_sample(database_url: str) -> PgSample | None:
    try:
        conn = await asyncpg.connect(database_url)
    except (OSError, asyncpg.PostgresError):
        return None
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits,"
            " (SELECT wal_sync FROM pg_stat_wal) AS wal_syncs,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
            "   / pg_size_bytes(current_setting('wal_segment_size')) AS segment"
        )
        try:
            ready = await conn.fetchval(
                "SELECT count(*) FROM pg_ls_waldir()"
                " WHERE name ~ '^[0-9A-F]{24}$' AND name > pg_walfile_name(pg_current_wal_lsn())"
            )
        except asyncpg.InsufficientPrivilegeError:  # pg_ls_waldir needs pg_monitor
            ready = None
    finally:
        await conn.close()
    assert row is not None
    return PgSample(int(row["commits"]), int(row["wal_syncs"]), int(row["segment"]), ready)


async def settle_database(database_url: str) -> None:
    """A checkpoint before each measured run, as bench/smtp.py takes. The run before it wrote
    tens of MB of WAL in seconds; a running database's periodic checkpoints recycle the segments
    behind them as the next ones, so its commits never make a segment. Without it the latency
    run's commits did, one every 7-8 s, each stalling every commit for 40-55 ms: p99 41-102 ms
    where the same code measured 20-24 ms between those stalls (2026-12-04)."""
    with contextlib.suppress(OSError, asyncpg.PostgresError):
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()


@dataclass
class Throughput:
    count: int
    seconds: float
    complete: bool
    cpu_ms_per_msg: dict[str, float]
    machine_busy_pct: float
    background_pct: float
    steal_pct: float  # vCPU time the host gave to other guests during the run
    pg_commits_per_msg: float | None = None
    wal_syncs_per_msg: float | None = None
    wal_segments_created: int | None = None

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Latency:
    rate: float
    sent: int
    received: int
    achieved_rate: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    machine_busy_pct: float
    cpu_ms_per_msg: Mapping[str, float] = field(default_factory=dict)  # per group, as Throughput's
    wait_ms_per_msg: Mapping[str, float] = field(default_factory=dict)  # per group: runnable, no core
    pg_commits_per_msg: float = float("nan")
    wal_segments_created: int | None = None
    series: Sequence[tuple[float, float]] = ()  # (send time in s from the start, latency in ms)
    steal: Sequence[tuple[float, Sequence[int]]] = ()  # StealSampler samples, s from the start


def slow_spans(
    series: Sequence[tuple[float, float]], over_ms: float, width: float = 0.1
) -> list[tuple[float, float, float]]:
    """Where the slow messages were sent: (from s, to s, max ms) for each run of adjacent
    `width`-second windows whose slowest message took more than `over_ms`. A stall shows as
    one short span of many slow messages; a standing queue as a long one."""
    worst: dict[int, float] = {}
    for t, ms in series:
        k = int(t / width)
        worst[k] = max(worst.get(k, 0.0), ms)
    spans: list[tuple[float, float, float]] = []
    for k in sorted(w for w, ms in worst.items() if ms > over_ms):
        if spans and round(spans[-1][1] / width) == k:
            spans[-1] = (spans[-1][0], (k + 1) * width, max(spans[-1][2], worst[k]))
        else:
            spans.append((k * width, (k + 1) * width, worst[k]))
    return spans


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _prepare_command(client: LeanAmqp, routing_key: str, body: bytes) -> bytes:
    """One command's frames, as another system publishes it with Palisade's `Publisher`:
    persistent, mandatory, confirmed (bench/lean_amqp.py)."""
    return client.prepare(
        COMMANDS_EXCHANGE, routing_key, body, message_id=str(uuid.uuid4()), message_type="ProbeCommand"
    )


async def _publish_all(client: LeanAmqp, routing_key: str, bodies: Sequence[bytes]) -> None:
    """Publish them all and wait for the broker's confirms."""
    for body in bodies:
        client.publish(_prepare_command(client, routing_key, body))
    await client.confirmed(timeout=60)


class Driver:
    """Drives one worker through warm-up, throughput and latency phases."""

    def __init__(
        self,
        args: argparse.Namespace,
        kind: str,
        channel: AbstractChannel,
        client: LeanAmqp,
        counter: list[int],
    ) -> None:
        self.args = args
        self.kind = kind
        self.name = f"bench-{'rt' if kind == 'palisade' else kind}-{uuid.uuid4().hex[:8]}"
        self.types = probe_types(self.name)
        self.channel = channel
        self.client = client
        self.counter = counter
        self.collector = Collector()
        self.sent_at: dict[int, float] = {}
        self.worker = WorkerProc(kind, self.name, args)

    def numbers(self, count: int) -> list[int]:
        start = self.counter[0]
        self.counter[0] += count
        return list(range(start, start + count))

    def body(self, n: int) -> bytes:
        command: Any = self.types.ProbeCommand
        # Commands spread over 64 services, each handled in order, as a real worker sees them.
        return encode(new_envelope(command(n=n), service_id=f"svc-{n % 64}"))

    async def setup(self) -> None:
        if self.kind == "floor":
            # The commands themselves, from a quorum queue as the workers' (auto-ack: nothing
            # else is done with them).
            q = await self.channel.declare_queue(
                work_queue(self.name), durable=True, arguments={"x-queue-type": "quorum"}
            )
            await q.bind(COMMANDS_EXCHANGE, self.types.ProbeCommand.routing_key())
            collect_from = q.name
        else:
            # Exclusive to the load generator's connection: it goes when that closes.
            collect_from = f"bench.collector.{self.name}"
            await self.client.declare_bound_queue(collect_from, EVENTS_EXCHANGE, self.types.ProbeDone.routing_key())
        await self.client.consume(collect_from, self.collector.on_body)
        await self.worker.start()

    async def warm_up(self, count: int) -> None:
        ns = self.numbers(count)
        self.collector.expect(ns)
        await self.worker.call("resume")
        await _publish_all(self.client, self.types.ProbeCommand.routing_key(), [self.body(n) for n in ns])
        if not await self.collector.wait(60):
            raise RuntimeError(f"{self.kind}: warm-up events missing ({len(self.collector.arrived)}/{count})")
        await self.worker.call("pause")
        await asyncio.sleep(0.5)  # let the relay mark its last batch and the broker settle

    async def throughput(self, count: int) -> Throughput:
        ns = self.numbers(count)
        bodies = [self.body(n) for n in ns]
        self.collector.expect(ns)
        await _publish_all(self.client, self.types.ProbeCommand.routing_key(), bodies)
        await settle_database(self.args.database_url)
        await asyncio.sleep(0.3)  # publishing is done and confirmed; let the broker go quiet
        background = await background_busy(self.args.quiet)
        if self.args.profile:
            await self.worker.call("profile on")
        pg0 = await pg_sample(self.args.database_url)
        cpu0 = cpu_sample(self.worker.pid)
        t0 = time.perf_counter()
        await self.worker.call("resume")
        complete = await self.collector.wait(max(60.0, count / 20))
        t1 = max(self.collector.arrived.values()) if self.collector.arrived else time.perf_counter()
        cpu1 = cpu_sample(self.worker.pid)
        await asyncio.sleep(1.5)  # PostgreSQL backends publish their statistics about once a second
        pg1 = await pg_sample(self.args.database_url)
        await self.worker.call("pause")
        if self.args.profile:
            path = Path(self.args.profile) / f"{self.kind}.pstats"
            await self.worker.call(f"profile {path}")
        got = len(self.collector.arrived)
        wall = cpu1.wall - cpu0.wall
        per_msg = cpu_ms_per_msg(cpu0, cpu1, got)
        busy_ms = (cpu1.machine_busy - cpu0.machine_busy) / CLK_TCK * 1000
        busy = busy_ms / 1000 / (wall * (os.cpu_count() or 1)) * 100
        steal = (cpu1.steal - cpu0.steal) / CLK_TCK / (wall * (os.cpu_count() or 1)) * 100
        result = Throughput(got, t1 - t0, complete, per_msg, busy, background, steal)
        if pg0 is not None and pg1 is not None and got:
            result.pg_commits_per_msg = (pg1.commits - pg0.commits) / got
            result.wal_syncs_per_msg = (pg1.wal_syncs - pg0.wal_syncs) / got
            result.wal_segments_created = wal_segments_created(pg0, pg1)
        await asyncio.sleep(0.5)
        return result

    async def latency(self, rate: float, seconds: float) -> Latency:
        count = max(1, round(rate * seconds))
        ns = self.numbers(count)
        key = self.types.ProbeCommand.routing_key()
        # Encoded before the clock starts: the run only writes each command's frames when it is due.
        prepared = [_prepare_command(self.client, key, self.body(n)) for n in ns]
        self.collector.expect(ns)
        sent: dict[int, float] = {}
        self.sent_at = sent  # perf_counter() per command (bench/latency_segments.py)
        errors: list[BaseException] = []

        await settle_database(self.args.database_url)
        await self.worker.call("resume")
        await asyncio.sleep(0.2)
        # The load generator is the stopwatch: a full collection of its heap mid-run would
        # be counted as latency of whichever worker is measured.
        freeze_startup_heap()
        if self.args.profile:
            await self.worker.call("profile on")
        pg0 = await pg_sample(self.args.database_url)
        cpu0 = cpu_sample(self.worker.pid)
        _, busy0, _ = _machine_busy()
        steal = StealSampler()
        steal.start()
        start = time.perf_counter()
        try:
            i = 0
            while i < count:
                now = time.perf_counter()
                due = min(count, int((now - start) * rate) + 1)
                while i < due:
                    sent[ns[i]] = time.perf_counter()
                    self.client.publish(prepared[i])
                    i += 1
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            last_send, busy1, _ = _machine_busy()
            try:
                await self.client.confirmed(timeout=30)
            except (LeanAmqpError, TimeoutError) as exc:
                errors.append(exc)
            await self.collector.wait(30)
        finally:
            steal.stop()
        cpu1 = cpu_sample(self.worker.pid)
        await asyncio.sleep(1.5)  # PostgreSQL backends publish their statistics about once a second
        pg1 = await pg_sample(self.args.database_url)
        await self.worker.call("pause")
        if self.args.profile:
            await self.worker.call(f"profile {Path(self.args.profile) / f'{self.kind}-latency.pstats'}")
        if errors:
            print(f"  warning: {self.kind} publishes failed: {errors[0]!r}", file=sys.stderr)
        series = [
            (sent[n] - start, (self.collector.arrived[n] - sent[n]) * 1000) for n in ns if n in self.collector.arrived
        ]
        if self.args.dump:
            text = "".join(f"{t:.4f}\t{ms:.3f}\n" for t, ms in series)
            (Path(self.args.dump) / f"latency-{self.kind}.tsv").write_text(text)
        lat = sorted(ms for _, ms in series)
        return Latency(
            rate=rate,
            sent=count,
            received=len(lat),
            achieved_rate=count / (last_send - start) if last_send > start else rate,
            p50_ms=percentile(lat, 50),
            p90_ms=percentile(lat, 90),
            p99_ms=percentile(lat, 99),
            max_ms=lat[-1] if lat else float("nan"),
            machine_busy_pct=(busy1 - busy0) / CLK_TCK / ((last_send - start) * (os.cpu_count() or 1)) * 100,
            cpu_ms_per_msg=cpu_ms_per_msg(cpu0, cpu1, len(lat)),
            wait_ms_per_msg={g: ms / max(len(lat), 1) for g, ms in cpu0.wait_per_group(cpu1).items()},
            pg_commits_per_msg=(pg1.commits - pg0.commits) / max(len(lat), 1) if pg0 and pg1 else float("nan"),
            wal_segments_created=wal_segments_created(pg0, pg1) if pg0 and pg1 else None,
            series=series,
            steal=steal.since(start),
        )

    async def cleanup(self, channel: AbstractChannel) -> None:
        await self.worker.stop()
        # (The collector queues are the load generator's exclusive ones: they go with its connection.)
        names = [work_queue(self.name), dead_queue(self.name)]
        if self.kind == "palisade":
            names += [retry_queue(self.name, d) for d in RuntimeSettings().retry_delays]
        for q in names:
            with contextlib.suppress(Exception):
                await channel.queue_delete(q)
        if self.kind == "palisade":
            conn = await asyncpg.connect(self.args.database_url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_name(self.name)}" CASCADE')
            finally:
                await conn.close()


# =====================================================================  report


def _fmt_tp(label: str, tp: Throughput) -> str:
    cpu = tp.cpu_ms_per_msg
    flag = "" if tp.complete else "  (INCOMPLETE)"
    pg = ""
    if tp.pg_commits_per_msg is not None and tp.wal_syncs_per_msg is not None and tp.pg_commits_per_msg > 0.01:
        pg = (
            f"  [PG per msg: {tp.pg_commits_per_msg:.2f} commits, {tp.wal_syncs_per_msg:.2f} WAL syncs;"
            f" WAL segments made {_fmt_count(tp.wal_segments_created)}]"
        )
    return (
        f"  {label:<22} {tp.rate:7.0f} msg/s {tp.seconds:7.2f} s   busy {tp.machine_busy_pct:3.0f}% "
        f"(before {tp.background_pct:3.0f}%, steal {tp.steal_pct:3.0f}%)  "
        f"{cpu['worker']:6.3f} {cpu['postgres']:6.3f} {cpu['rabbitmq']:6.3f} {cpu['bench']:6.3f} {cpu['other']:5.3f}"
        f"{pg}{flag}"
    )


def _fmt_count(n: int | None) -> str:
    return "n/a" if n is None else str(n)


def _fmt_lat(label: str, lat: Latency) -> str:
    return (
        f"  {label:<22} {lat.achieved_rate:7.0f} msg/s  {lat.received:>6}/{lat.sent:<6} "
        f"p50 {lat.p50_ms:6.1f} ms  p90 {lat.p90_ms:6.1f} ms  p99 {lat.p99_ms:6.1f} ms  max {lat.max_ms:6.1f} ms  "
        f"(machine {lat.machine_busy_pct:.0f}% busy, PG {lat.pg_commits_per_msg:.2f} commits per msg,"
        f" WAL segments made {_fmt_count(lat.wal_segments_created)})\n"
        f"{'':26}CPU ms per msg: "
        + ", ".join(f"{g} {ms:.3f}" for g, ms in lat.cpu_ms_per_msg.items())
        + f"\n{'':26}waiting for a core (runnable, not running), ms per msg: "
        + ", ".join(f"{g} {ms:.3f}" for g, ms in lat.wait_ms_per_msg.items())
    )


def _fmt_slow(lat: Latency) -> str:
    """Where the tail comes from: the p99 without the run's first second (the worker going from
    idle to the full rate), the host's steal, and the spans of slow messages with the steal
    around each (sent in the span or the 0.1 s before it)."""
    later = sorted(ms for t, ms in lat.series if t >= 1.0)
    spans = slow_spans(lat.series, P99_TARGET_MS)

    def ms_list(values: Sequence[float]) -> str:
        return "/".join(f"{x:.0f}" for x in values)

    def stolen(a: float, b: float) -> str:
        ms = stolen_ms(lat.steal, a - 0.1, b)
        return f", steal {ms_list(ms)}" if ms else ""

    where = ", ".join(f"{a:.1f}-{b:.1f} s (max {ms:.0f}{stolen(a, b)})" for a, b, ms in spans) or "none"
    total = stolen_ms(lat.steal, 0.0, lat.steal[-1][0]) if lat.steal else []
    clean = unstolen_latencies(lat.series, lat.steal)
    return (
        f"{'':26}p99 after the first second {percentile(later, 99):6.1f} ms; host steal per vCPU {ms_list(total)} ms;"
        f" p99 of the {len(clean)} messages with no steal in flight {percentile(clean, 99):.1f} ms\n"
        f"{'':26}sent in a 0.1 s window with a message over {P99_TARGET_MS:g} ms: {where}"
    )


def unstolen_latencies(
    series: Sequence[tuple[float, float]], steal: Sequence[tuple[float, Sequence[int]]]
) -> list[float]:
    """The latencies (ascending) of the messages during whose flight, send to arrival, no vCPU
    had a steal tick. Ticks are 1/CLK_TCK s, so a flight is checked from the sample before
    its send to the sample after its arrival."""
    times = [t for t, _ in steal]
    # Total steal of all vCPUs at each sample: a flight saw steal iff the total grew across it.
    totals = [sum(v) for _, v in steal]
    out: list[float] = []
    for t, ms in series:
        i = max(0, bisect.bisect_right(times, t) - 1)
        j = min(len(times) - 1, bisect.bisect_left(times, t + ms / 1000))
        if times and totals[j] == totals[i]:
            out.append(ms)
    return sorted(out)


async def server_versions(args: argparse.Namespace) -> tuple[str, str]:
    rabbit = "?"
    with contextlib.suppress(Exception):
        conn = await aio_pika.connect(args.amqp_url)
        props: Any = conn.transport.connection.server_properties if conn.transport else {}
        version = props.get("version", "?")
        rabbit = version.decode() if isinstance(version, bytes) else str(version)
        await conn.close()
    pg = "?"
    with contextlib.suppress(Exception):
        c = await asyncpg.connect(args.database_url.rsplit("/", 1)[0] + "/postgres")
        pg = str(await c.fetchval("SHOW server_version"))
        await c.close()
    return rabbit, pg


async def bench(args: argparse.Namespace) -> int:
    rabbit_version, pg_version = await server_versions(args)
    print(
        f"Palisade bus benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"RabbitMQ {rabbit_version}, PostgreSQL {pg_version}"
    )
    print(
        f"  work queues: quorum; prefetch {args.prefetch} (RuntimeSettings().prefetch); "
        f"group commit {'off (--per-message)' if args.per_message else 'on'}; "
        + (
            "the test probe's handler (--probe-handler); "
            if args.probe_handler
            else f"state-row update {'awaited (--awaited-write)' if args.awaited_write else 'at commit'}; "
        )
        + f"N = {args.count} commands; warm-up {args.warmup}; database {args.database_url.rsplit('/', 1)[-1]}"
        + (f"; both workers at nice {args.worker_nice} (--worker-nice)" if args.worker_nice else "")
    )
    print(
        "  throughput = N commands published with confirms while the worker's consumer is cancelled,\n"
        "               then basic.consume; time until the N-th event reached the collector queue\n"
        "               (the worker's drain rate: the load generator only counts events meanwhile)."
    )
    sys.stdout.flush()
    connection = await connect(args.amqp_url)
    counter = [1]
    drivers: list[Driver] = []
    tp_raw: Throughput | None = None
    lat_raw: Latency | None = None
    lat_floor: Latency | None = None
    client: LeanAmqp | None = None
    try:
        channel = await connection.channel()
        await declare_exchanges(channel)
        client = await LeanAmqp.connect(args.amqp_url)
        raw = Driver(args, "raw", channel, client, counter)
        rt = Driver(args, "palisade", channel, client, counter)
        floor = Driver(args, "floor", channel, client, counter)
        drivers = [rt] if args.palisade_only else [raw, rt]
        if not args.no_floor:
            drivers.append(floor)
        for d in drivers:
            await d.setup()
        for d in drivers:
            await d.warm_up(args.warmup)
        if not args.palisade_only:
            tp_raw = await raw.throughput(args.count)
        tp_rt = await rt.throughput(args.count)
        rate = args.rate or 0.5 * tp_rt.rate
        lat_rt = await rt.latency(rate, args.seconds)
        if not args.palisade_only and not args.no_raw_latency:
            lat_raw = await raw.latency(rate, args.seconds)
        if not args.no_floor:
            lat_floor = await floor.latency(rate, args.seconds)
    finally:
        for d in drivers:
            try:
                await d.cleanup(channel)
            except Exception as exc:  # noqa: BLE001 - cleanup is best effort
                print(f"cleanup of {d.name} failed: {exc!r}", file=sys.stderr)
        if client is not None:
            client.close()
        await connection.close()

    print()
    print(f"Throughput (drain of a backlog){'CPU ms per message':>60}")
    print(
        f"  {'':<22} {'rate':>13} {'time':>9}   {'machine CPU':<34}  "
        f"{'worker':>6} {'pgsql':>6} {'rabbit':>6} {'bench':>6} {'other':>5}"
    )
    if tp_raw is not None:
        print(_fmt_tp("(a) raw aio-pika", tp_raw))
    print(_fmt_tp("(b) palisade runtime", tp_rt))
    ratio = tp_rt.rate / tp_raw.rate if tp_raw is not None and tp_raw.rate else float("nan")
    print(f"  ratio b/a {ratio:.2f}")
    print(
        "  (busy = machine CPU use during the run, before = while the workers were idle just before it,\n"
        "   i.e. other tenants; steal = vCPU time the host gave to other guests while the run wanted it;\n"
        "   other = machine CPU not in the four columns: kernel, softirq, other processes)"
    )
    print()
    print(f"Latency, command publish -> event at the collector, steady {rate:.0f} msg/s for {args.seconds:g} s")
    print(_fmt_lat("(b) palisade runtime", lat_rt))
    print(_fmt_slow(lat_rt))
    if lat_raw is not None:
        print(_fmt_lat("(a) raw, same rate", lat_raw))
        print(_fmt_slow(lat_raw))
    if lat_floor is not None:
        print(_fmt_lat("(0) floor, same rate", lat_floor))
        print(
            f"{'':26}(no worker: load generator -> quorum queue -> collector; the machine's busy share here"
            " is taken before any worker runs)"
        )
    print()
    if tp_raw is not None:
        ok_ratio = ratio >= RATIO_TARGET and tp_raw.complete and tp_rt.complete
        verdict = "TARGET MET" if ok_ratio else "TARGET MISSED"
        print(f"{verdict}: throughput ratio b/a = {ratio:.2f} (target >= {RATIO_TARGET})")
    if args.rate:
        print(f"(b) p99 latency at --rate {args.rate:g} = {lat_rt.p99_ms:.1f} ms (no verdict: not half the maximum)")
        return 0
    ok_p99 = lat_rt.p99_ms <= P99_TARGET_MS and lat_rt.received == lat_rt.sent
    verdict = "TARGET MET" if ok_p99 else "TARGET MISSED"
    print(f"{verdict}: (b) p99 latency at half its maximum = {lat_rt.p99_ms:.1f} ms (target <= {P99_TARGET_MS:g} ms)")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=5000, help="commands per throughput run (default 5000)")
    p.add_argument("--warmup", type=int, default=500, help="commands through each worker before measuring")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the latency run (default 10 s)")
    p.add_argument("--rate", type=float, default=0.0, help="latency run rate; default 0.5 x (b) throughput")
    p.add_argument("--palisade-only", action="store_true", help="measure (b) only (runtime experiments)")
    p.add_argument("--no-raw-latency", action="store_true", help="skip the reference latency run of (a)")
    p.add_argument("--no-floor", action="store_true", help="skip the latency run of (0), the floor without a worker")
    p.add_argument("--amqp-url", default=os.environ.get("PALISADE_AMQP_URL", DEFAULT_AMQP))
    p.add_argument("--database-url", default=os.environ.get("PALISADE_BENCH_DATABASE_URL", DEFAULT_DB))
    p.add_argument("--prefetch", type=int, default=RuntimeSettings().prefetch, help=argparse.SUPPRESS)
    p.add_argument(
        "--quiet",
        type=float,
        default=0.0,
        metavar="PCT",
        help="before each throughput run wait (up to 2 min) until other load on the machine is below PCT %%",
    )
    p.add_argument("--dump", metavar="DIR", help="write each latency run's (send time, latency) pairs into DIR")
    p.add_argument(
        "--profile", metavar="DIR", help="cProfile each worker's runs into DIR/<kind>.pstats, DIR/<kind>-latency.pstats"
    )
    p.add_argument(
        "--per-message",
        action="store_true",
        help="(b) without group commit: one transaction per message (WorkerSpec.group_commit=False)",
    )
    p.add_argument(
        "--probe-handler",
        action="store_true",
        help="(b) runs the test probe's handler (failure switch read + effect row + state row)",
    )
    p.add_argument(
        "--awaited-write",
        action="store_true",
        help="(b)'s handler awaits its state-row update (ctx.db.execute) instead of leaving it for the COMMIT",
    )
    p.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        metavar="N",
        help="run both workers at this nice value (e.g. -10: ahead of the load generator and the collector,"
        " which stand in for other machines; the default 0 shares the two cores evenly)",
    )
    p.add_argument("--worker", choices=("raw", "palisade", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "palisade":
        uvloop.run(
            palisade_worker(
                args.name,
                args.amqp_url,
                args.database_url,
                probe_handler=args.probe_handler,
                awaited_write=args.awaited_write,
                group_commit=not args.per_message,
            )
        )
        return 0
    if args.worker == "raw":
        uvloop.run(raw_worker(args.name, args.amqp_url, args.prefetch))
        return 0
    if args.worker == "floor":
        uvloop.run(no_worker())
        return 0
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
