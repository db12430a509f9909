"""Faults of the backing servers under load: PostgreSQL restarted, RabbitMQ stopped for
10 s, while 1,000 commands flow through the lifecycle and mfa workers.

Both servers are private to this module (`fault_servers`): the machine's shared
PostgreSQL and RabbitMQ, which other test runs use at the same time, are never
touched. Each test gets its own database and vhost on them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fixtures import unique, wait_until
from tests.hardening.fault_load import Figures, Load, all_ready, same_objects
from tests.hardening.fault_servers import PrivatePostgres, PrivateRabbit

COMMANDS = 1000


@pytest.fixture(scope="module")
async def servers() -> AsyncIterator[tuple[PrivatePostgres, PrivateRabbit]]:
    pg, rabbit = PrivatePostgres(), PrivateRabbit()
    try:
        await asyncio.gather(pg.start(), rabbit.start())
        yield pg, rabbit
    finally:
        await asyncio.gather(pg.destroy(), rabbit.destroy(), return_exceptions=True)


@pytest.fixture
async def load(servers: tuple[PrivatePostgres, PrivateRabbit]) -> AsyncIterator[Load]:
    pg, rabbit = servers
    vhost = unique("fault")
    await rabbit.ctl("add_vhost", vhost)
    await rabbit.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    database = unique("fault").replace("-", "_")
    harness = Load(f"{rabbit.url}{vhost}", pg.url(database))
    try:
        await harness.start()
        yield harness
    finally:
        await harness.stop()


def report(figures: Figures, record_property: Any, capsys: pytest.CaptureFixture[str]) -> None:
    record_property("fault_figures", figures.line())
    with capsys.disabled():
        print("\n" + figures.line())


@pytest.mark.timeout(180)
async def test_postgresql_restarted_twice_under_load_loses_nothing_and_does_nothing_twice(
    load: Load, servers: tuple[PrivatePostgres, PrivateRabbit], record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    pg, _ = servers
    before = dict(load.runtimes)
    figures = Figures("postgresql restarted (fast, then immediate) under 1,000 commands")
    await load.queue_up(load.make_commands(COMMANDS))
    recover: list[float] = []
    in_flight: list[int] = []
    for threshold, mode in ((250, "fast"), (600, "immediate")):
        await load.wait_handled(threshold)
        in_flight.append(load.published - load.handled())
        await pg.stop(mode)
        mark = load.handled()  # nothing commits while the server is down
        await pg.start()
        back = time.perf_counter()
        recover.append(await load.first_progress_after(mark, back))
    await load.wait_committed(COMMANDS, timeout=90)
    await wait_until(load.outboxes_drained, timeout=60, what="outboxes drained")
    figures.drain_seconds = time.perf_counter() - back
    figures.recover_seconds = max(recover)
    figures.in_flight_at_fault = max(in_flight)
    figures.extra = {"recover_fast_s": recover[0], "recover_immediate_s": recover[1]}
    await load.verdict(figures)
    report(figures, record_property, capsys)

    assert same_objects(load, before), "a worker was replaced"
    assert await all_ready(load), "a worker did not come back to ready"
    assert await load.committed() == COMMANDS
    assert (figures.lost, figures.duplicated_effects, figures.parked) == (0, 0, 0)


@pytest.mark.timeout(180)
async def test_rabbitmq_stopped_for_10_s_under_load_loses_nothing_and_the_outboxes_drain(
    load: Load, servers: tuple[PrivatePostgres, PrivateRabbit], record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _, rabbit = servers
    before = dict(load.runtimes)
    figures = Figures("rabbitmq app stopped 10 s under 1,000 commands")
    commands = load.make_commands(COMMANDS)
    first, rest = commands[:600], commands[600:]
    await load.queue_up(first)
    await load.wait_handled(250)
    figures.in_flight_at_fault = load.published - load.handled()
    await rabbit.stop_app()
    down_at = time.perf_counter()
    # The rest arrive while the broker is down: the publisher retries them until it is back.
    publishing = asyncio.create_task(load.publish_all(rest))
    handled_while_down = load.handled()
    # The fault itself lasts 10 s; nothing here waits for a condition.
    await asyncio.sleep(10)
    committed_while_down = load.handled() - handled_while_down
    waiting = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
    pending_rows = [await load.scalar(w, waiting) for w in load.runtimes]
    await rabbit.start_app()
    back = time.perf_counter()
    mark = load.handled()
    figures.recover_seconds = await load.first_progress_after(mark, back)
    await publishing
    await load.wait_committed(COMMANDS, timeout=90)
    await wait_until(load.outboxes_drained, timeout=60, what="outboxes drained after the broker came back")
    figures.drain_seconds = time.perf_counter() - back
    figures.extra = {
        "down_s": back - down_at,
        "committed_while_down": committed_while_down,
        "outbox_rows_waiting_at_restart": sum(int(n or 0) for n in pending_rows),
    }
    await load.verdict(figures)
    report(figures, record_property, capsys)

    assert same_objects(load, before), "a worker was replaced"
    assert await all_ready(load), "a worker did not come back to ready"
    assert await load.committed() == COMMANDS
    assert (figures.lost, figures.duplicated_effects, figures.parked) == (0, 0, 0)
