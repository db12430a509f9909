"""1,000 commands through two real workers (lifecycle and mfa, in this process) on
private servers, and the bookkeeping that proves what happened to each of them.

Every command has exactly one visible effect per handling: lifecycle approves a reboot
(`ServiceRebootApproved`), mfa records a support reset (`MfaDisabled`); each also
writes one audit record. Both land in the worker's outbox in the handler's transaction,
so counting outbox rows by the command's id counts effects: a command handled twice
would show two. The events that left the outbox are caught by a durable queue on the
broker, read only at the end, so a broker restart cannot lose what it already holds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
from prometheus_client import REGISTRY
from pydantic import SecretStr

from palisade_events import Actor, Envelope, RuntimeSettings, WorkerRuntime
from palisade_events.amqp import PublishError
from palisade_events.client import PalisadeClient
from palisade_events.contract import lifecycle as lc
from palisade_events.contract import mfa as m
from palisade_events.db import schema_name
from palisade_events.topology import EVENTS_EXCHANGE, dead_queue, declare_exchanges
from palisade_lifecycle.worker import spec as lifecycle_spec
from palisade_mfa.crypto import generate_key
from palisade_mfa.settings import MfaSettings
from palisade_mfa.worker import spec as mfa_spec
from tests.fixtures import unique, wait_until
from tests.provisioning import service_provisioned

SUPPORT = Actor(kind="support", id="jane.support")
WORKERS = ("lifecycle", "mfa")
# Long enough that a server restart (well under a second here) is ridden out on the
# ladder, short enough to keep the test quick: 7.5 s in all before a message is parked.
RETRY_DELAYS = [0.5, 1.0, 2.0, 4.0]


def messages_total(worker: str, outcome: str) -> float:
    """Sum of palisade_messages_total over every type, for one worker and outcome."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "palisade_messages":
            continue
        for sample in metric.samples:
            if (
                sample.name == "palisade_messages_total"
                and sample.labels.get("worker") == worker
                and sample.labels.get("outcome") == outcome
            ):
                total += sample.value
    return total


@dataclass
class Figures:
    """What one fault did, printed by the test and recorded in its report."""

    fault: str
    commands: int = 0
    in_flight_at_fault: int = 0
    lost: int = 0
    duplicated_effects: int = 0
    redeliveries_deduplicated: int = 0
    retried: int = 0
    parked: int = 0
    publish_attempts_refused: int = 0
    events_published: int = 0
    events_delivered_twice: int = 0
    recover_seconds: float = 0.0  # server back -> first message committed again
    drain_seconds: float = 0.0  # server back -> every command handled and every outbox drained
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        parts = {k: v for k, v in self.__dict__.items() if k not in ("fault", "extra")}
        parts.update(self.extra)
        shown = ", ".join(f"{k}={round(v, 2) if isinstance(v, float) else v}" for k, v in parts.items())
        return f"[fault] {self.fault}: {shown}"


class Load:
    """The two workers, a client, the event catcher, and the commands."""

    def __init__(self, amqp_url: str, database_url: str) -> None:
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.runtimes: dict[str, WorkerRuntime[Any]] = {}
        self.client: PalisadeClient
        self.catcher = unique("fault-events")
        self.services = [unique("svc") for _ in range(25)]
        self.accounts = [unique("acc") for _ in range(50)]
        self.commands: dict[str, list[Envelope[Any]]] = {w: [] for w in WORKERS}
        self.publish_retries = 0
        self.published = 0
        self._baseline: dict[tuple[str, str], float] = {}

    def settings(self) -> RuntimeSettings:
        return RuntimeSettings(
            amqp_url=self.amqp_url,
            database_url=self.database_url,
            metrics_port=0,
            retry_delays=RETRY_DELAYS,
            outbox_poll_seconds=0.2,
            outbox_grace_seconds=1.0,
            shutdown_grace_seconds=10.0,
        )

    async def start(self) -> None:
        self.client = await PalisadeClient.connect(self.amqp_url)
        channel = await self.client.connection.channel()
        await declare_exchanges(channel)
        queue = await channel.declare_queue(self.catcher, durable=True)
        for worker in WORKERS:
            await queue.bind(EVENTS_EXCHANGE, f"{worker}.#")
        await channel.close()
        mfa_settings = MfaSettings(
            mfa_key=SecretStr(generate_key("fault")), platform_smtp=SecretStr("smtp://127.0.0.1:9")
        )
        for spec in (lifecycle_spec(), mfa_spec(mfa_settings)):
            rt: WorkerRuntime[Any] = WorkerRuntime(spec, self.settings())
            await rt.start()
            self.runtimes[spec.name] = rt
        for service_id in self.services:
            await self.client.publish(
                service_provisioned(
                    service_id,
                    service_id[:30],
                    hostname=f"{service_id}.vm.example.net",
                    ipv4="203.0.113.10",
                    private_ip="10.0.0.5",
                ),
                service_id=service_id,
            )
        await wait_until(
            lambda: self.scalar("lifecycle", "SELECT count(*) FROM services", len(self.services)),
            timeout=30,
            what="services projected by lifecycle",
        )
        for worker in WORKERS:
            for outcome in ("retried", "parked", "duplicate"):
                self._baseline[(worker, outcome)] = messages_total(worker, outcome)

    async def stop(self) -> None:
        for rt in self.runtimes.values():
            await rt.stop()
        await self.client.close()

    def metric_delta(self, outcome: str) -> int:
        return round(sum(messages_total(w, outcome) - self._baseline[(w, outcome)] for w in WORKERS))

    # ------------------------------------------------------------------ commands

    def make_commands(self, count: int) -> list[Envelope[Any]]:
        """Half for each worker, interleaved (each service/account gets several, in order)."""
        out: list[Envelope[Any]] = []
        for i in range(count):
            if i % 2 == 0:
                service_id = self.services[i % len(self.services)]
                env = self.client.envelope(lc.ServiceRebootRequested(), service_id=service_id)
                self.commands["lifecycle"].append(env)
            else:
                env = self.client.envelope(
                    m.MfaResetBySupport(ticket=f"SUP-{i}", operator="jane.support"),
                    account_id=self.accounts[i % len(self.accounts)],
                    actor=SUPPORT,
                )
                self.commands["mfa"].append(env)
            out.append(env)
        return out

    async def publish_all(self, commands: Sequence[Envelope[Any]], *, deadline_seconds: float = 120.0) -> None:
        """Publish with confirms, retrying a publish the broker did not confirm (it was
        down): same envelope, same message id, so a retry cannot be a second command."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_seconds
        sem = asyncio.Semaphore(50)

        async def one(env: Envelope[Any]) -> None:
            async with sem:
                while True:
                    try:
                        await self.client.publisher.publish(env)
                        self.published += 1
                        return
                    except PublishError:
                        if loop.time() > deadline:
                            raise
                        self.publish_retries += 1
                        await asyncio.sleep(0.2)

        await asyncio.gather(*(one(env) for env in commands))

    async def queue_up(self, commands: Sequence[Envelope[Any]]) -> None:
        """Publish with the consumers paused, so the commands wait in the queues (and,
        once resumed, in each worker's prefetch): the backlog a fault then hits."""
        for rt in self.runtimes.values():
            await rt.pause()
        try:
            await self.publish_all(commands)
        finally:
            for rt in self.runtimes.values():
                await rt.resume()

    def handled(self) -> int:
        return sum(rt.handled for rt in self.runtimes.values()) - len(self.services)

    async def wait_handled(self, at_least: int, timeout: float = 60.0) -> None:
        await wait_until(lambda: self.handled() >= at_least, timeout=timeout, what=f"{at_least} commands handled")

    async def committed(self) -> int:
        """The commands in the workers' inboxes: the database's count. The processes' own
        counters miss a commit whose answer was lost with the server (its redelivery is then
        a duplicate), so the end of a fault is judged here."""
        total = 0
        for worker, commands in self.commands.items():
            conn = await asyncpg.connect(self.database_url, server_settings={"search_path": schema_name(worker)})
            try:
                ids = [e.message_id for e in commands]
                total += await conn.fetchval("SELECT count(*) FROM inbox WHERE message_id = ANY($1::uuid[])", ids)
            finally:
                await conn.close()
        return total

    async def wait_committed(self, count: int, timeout: float) -> None:
        async def done() -> bool:
            return await self.committed() >= count

        try:
            await wait_until(done, timeout=timeout, interval=0.1, what=f"{count} commands committed")
        except AssertionError:
            # Where the stuck handlings are, for the failure report: the heads of the chains,
            # suspended deeper than _process's wait for their service's previous handling.
            for worker, rt in self.runtimes.items():
                heads = [chain for t in rt._inflight if len(chain := _awaiting(t)) > 1]
                print(f"--- {worker}: {len(rt._inflight)} in flight, {len(heads)} not waiting on another")
                for chain in heads[:8]:
                    print("  " + " <- ".join(reversed(chain)))
            raise

    async def first_progress_after(self, mark: int, started: float, timeout: float = 60.0) -> float:
        """Seconds from `started` (perf_counter) until a commit beyond `mark` commits."""
        await wait_until(lambda: self.handled() > mark, timeout=timeout, interval=0.01, what="progress after the fault")
        return time.perf_counter() - started

    # ------------------------------------------------------------------ the database's view

    async def scalar(self, worker: str, sql: str, expected: int | None = None) -> Any:
        try:
            conn = await asyncpg.connect(self.database_url, server_settings={"search_path": schema_name(worker)})
        except (OSError, asyncpg.PostgresError):
            return False if expected is not None else None
        try:
            value = await conn.fetchval(sql)
        except asyncpg.PostgresError:
            return False if expected is not None else None
        finally:
            await conn.close()
        return value == expected if expected is not None else value

    async def fetch(self, worker: str, sql: str) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url, server_settings={"search_path": schema_name(worker)})
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    async def outboxes_drained(self) -> bool:
        for worker in WORKERS:
            if await self.scalar(worker, "SELECT count(*) FROM outbox WHERE published_at IS NULL", 0) is not True:
                return False
        return True

    async def parked(self) -> int:
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            total = 0
            for worker in WORKERS:
                queue = await channel.declare_queue(dead_queue(worker), passive=True)
                total += queue.declaration_result.message_count or 0
            return total
        finally:
            await connection.close()

    async def caught_events(self, expected: int, timeout: float = 30.0) -> Counter[str]:
        """Every message id the catcher queue holds (it keeps duplicates: it dedupes nothing)."""
        seen: Counter[str] = Counter()
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await channel.declare_queue(self.catcher, durable=True)

            async def on(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                seen[message.message_id or ""] += 1

            await queue.consume(on, no_ack=True)
            await wait_until(lambda: len(seen) >= expected, timeout=timeout, what=f"{expected} events on the broker")
            # Copies published twice arrive right behind the first: let the queue empty.
            await wait_until(lambda: _queue_empty(channel, self.catcher), timeout=timeout, what="catcher queue empty")
        finally:
            await connection.close()
        return seen

    # ------------------------------------------------------------------ the verdict

    async def verdict(self, figures: Figures) -> None:
        """Fill `figures` with what happened to every command; assert none lost, none twice."""
        figures.commands = sum(len(c) for c in self.commands.values())
        lost: set[str] = set()
        twice = 0
        event_ids: set[str] = set()
        for worker, commands in self.commands.items():
            sent = {str(e.message_id) for e in commands}
            inbox = {str(r["message_id"]) for r in await self.fetch(worker, "SELECT message_id FROM inbox")}
            lost |= sent - inbox
            rows = await self.fetch(
                worker,
                "SELECT message_id::text AS id, exchange, convert_from(body, 'UTF8')::jsonb AS body FROM outbox",
            )
            effects: Counter[str] = Counter()
            audits: Counter[str] = Counter()
            for row in rows:
                body = json.loads(row["body"]) if isinstance(row["body"], str) else row["body"]
                if row["exchange"] == EVENTS_EXCHANGE:
                    effects[body.get("causation_id") or ""] += 1
                    if body.get("causation_id") in sent:
                        event_ids.add(row["id"])
                else:
                    audits[body.get("message_id") or ""] += 1
            lost |= {c for c in sent if effects[c] == 0 or audits[c] == 0}
            twice += sum(1 for c in sent if effects[c] > 1 or audits[c] > 1)
        figures.lost = len(lost)
        figures.duplicated_effects = twice
        figures.retried = self.metric_delta("retried")
        figures.redeliveries_deduplicated = self.metric_delta("duplicate")
        figures.parked = await self.parked()
        figures.publish_attempts_refused = self.publish_retries
        caught = await self.caught_events(len(event_ids))
        figures.events_published = len(event_ids)
        figures.events_delivered_twice = sum(n - 1 for i, n in caught.items() if i in event_ids)
        assert event_ids <= set(caught), f"{len(event_ids - set(caught))} events never reached the broker"


async def _queue_empty(channel: aio_pika.abc.AbstractChannel, name: str) -> bool:
    queue = await channel.declare_queue(name, durable=True, passive=True)
    return (queue.declaration_result.message_count or 0) == 0


def same_objects(load: Load, before: dict[str, WorkerRuntime[Any]]) -> bool:
    return all(load.runtimes[w] is before[w] for w in WORKERS)


async def all_ready(load: Load) -> bool:
    return all([await rt.ready() for rt in load.runtimes.values()])


def _awaiting(task: asyncio.Task[Any]) -> list[str]:
    """The whole chain of coroutines a task is suspended in, outermost first."""
    frames: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames
