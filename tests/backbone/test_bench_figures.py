"""The pure arithmetic behind bench/bus.py's figures (the benchmark itself is not part of the
suite): which messages count as untouched by host steal, where the slow spans are, the CPU
per message of each process group, and the WAL segments made during a run (with the one
query the benchmark sends PostgreSQL for them)."""

from __future__ import annotations

import asyncpg
import pytest

from bench.bus import (
    CLK_TCK,
    CpuSample,
    PgSample,
    cpu_ms_per_msg,
    pg_sample,
    slow_spans,
    stolen_ms,
    unstolen_latencies,
    wal_segments_created,
)
from bench.latency_segments import STAGES, report, segment_ms
from tests.fixtures import DATABASE_URL

TICK_MS = 1000 / CLK_TCK

# Steal samples every 10 ms over 1 s: vCPU 1 loses one tick between 0.50 and 0.51 s.
STEAL = [(i / 100, [0, 0 if i <= 50 else 1]) for i in range(101)]


def test_a_message_in_flight_across_a_steal_tick_is_left_out() -> None:
    series = [
        (0.10, 5.0),  # 0.100-0.105 s: before the tick
        (0.48, 40.0),  # 0.480-0.520 s: across it
        (0.505, 3.0),  # 0.505-0.508 s: inside the sample interval that holds it
        (0.70, 20.0),  # after it
    ]
    assert unstolen_latencies(series, STEAL) == [5.0, 20.0]


def test_without_steal_every_message_counts() -> None:
    quiet = [(t, [3, 7]) for t, _ in STEAL]
    series = [(0.1 * k, float(k)) for k in range(10)]
    assert unstolen_latencies(series, quiet) == sorted(ms for _, ms in series)


def test_stolen_ms_per_vcpu_between_two_times() -> None:
    assert stolen_ms(STEAL, 0.0, 0.4) == [0.0, 0.0]
    assert stolen_ms(STEAL, 0.4, 0.6) == [0.0, TICK_MS]
    assert stolen_ms([], 0.0, 1.0) == []


def test_slow_spans_merge_adjacent_windows() -> None:
    series = [(0.05, 30.0), (0.15, 40.0), (0.25, 5.0), (0.55, 26.0)]
    assert slow_spans(series, 25.0) == [(0.0, 0.2, 40.0), (0.5, pytest.approx(0.6), 26.0)]


def test_cpu_per_message_per_group_and_the_rest_as_other() -> None:
    before = CpuSample(0.0, 1000, 0, {10: ("worker", 50), 11: ("postgres", 5), 12: ("bench", 7)})
    # 200 messages; the machine was busy 4 * CLK_TCK jiffies: the worker 2 s, postgres 0.5 s in
    # the backend that lived throughout and 0.25 s in one born meanwhile (counted whole), the
    # bench process gone meanwhile is not counted, and the rest went to nobody in the groups.
    after = CpuSample(
        1.0,
        1000 + 4 * CLK_TCK,
        0,
        {10: ("worker", 50 + 2 * CLK_TCK), 11: ("postgres", 5 + CLK_TCK // 2), 13: ("postgres", CLK_TCK // 4)},
    )
    per_msg = cpu_ms_per_msg(before, after, 200)
    assert per_msg["worker"] == pytest.approx(10.0)
    assert per_msg["postgres"] == pytest.approx(3.75, abs=2 * TICK_MS / 200)
    assert per_msg["bench"] == 0.0
    assert per_msg["other"] == pytest.approx(6.25, abs=2 * TICK_MS / 200)


def test_runqueue_wait_per_group() -> None:
    before = CpuSample(0.0, 0, 0, {10: ("worker", 0), 11: ("postgres", 0)}, {10: 100.0, 11: 40.0})
    after = CpuSample(
        1.0, 0, 0, {10: ("worker", 0), 11: ("postgres", 0), 13: ("postgres", 0)}, {10: 130.0, 11: 45.0, 13: 2.0}
    )
    assert before.wait_per_group(after) == {"worker": 30.0, "postgres": 7.0, "rabbitmq": 0.0, "bench": 0.0}


def test_wal_segments_made_are_those_written_beyond_the_ready_ones() -> None:
    before = PgSample(commits=0, wal_syncs=0, wal_segment=100, wal_ready=3)
    assert wal_segments_created(before, PgSample(50, 40, wal_segment=102, wal_ready=1)) == 0
    assert wal_segments_created(before, PgSample(50, 40, wal_segment=103, wal_ready=0)) == 0
    assert wal_segments_created(before, PgSample(90, 80, wal_segment=106, wal_ready=0)) == 3
    unreadable = PgSample(commits=0, wal_syncs=0, wal_segment=100, wal_ready=None)
    assert wal_segments_created(unreadable, PgSample(50, 40, wal_segment=106, wal_ready=None)) is None


async def test_the_wal_sample_follows_the_server_into_its_next_segment() -> None:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        # Some WAL in the current segment, then a switch: the next sample is one segment on.
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_wal_probe (n int)")
        await conn.execute("INSERT INTO bench_wal_probe VALUES (1)")
        before = await pg_sample(DATABASE_URL)
        await conn.execute("SELECT pg_switch_wal()")
        after = await pg_sample(DATABASE_URL)
        await conn.execute("DROP TABLE bench_wal_probe")
    finally:
        await conn.close()
    assert before is not None
    assert after is not None
    assert before.wal_ready is not None
    assert before.wal_ready >= 0
    assert after.wal_segment >= before.wal_segment + 1  # (more only if other sessions wrote 16 MB meanwhile)
    assert after.commits > before.commits


def test_latency_segments_per_command_and_the_slowest_percent() -> None:
    # 200 commands, each 1 ms per stage, except command 7, whose batch waited 30 ms.
    sent = {n: float(n) for n in range(200)}
    stamps = {stage: {n: n + (k + 1) / 1000 for n in range(200)} for k, stage in enumerate(STAGES)}
    for stage in ("handler", "committed", "confirmed"):
        stamps[stage][7] += 0.030
    arrived = {n: stamps["committed"][n] + 0.0005 for n in range(200)}
    del stamps["confirmed"][9]  # handled alone: no batch stamps
    segments, incomplete = segment_ms(sent, arrived, stamps)
    assert incomplete == 1
    assert len(segments["total (send -> arrived)"]) == 199
    assert sorted(segments["delivered -> handler"])[-1] == pytest.approx(31.0)
    assert sorted(segments["committed -> arrived"]) == pytest.approx([0.5] * 199)
    text = report(segments, incomplete)
    # The slowest 1 % (one command here) is command 7: 30 ms more waiting for its batch.
    row = text.splitlines()[2].split()
    assert row[:3] == ["delivered", "->", "handler"]
    assert row[-1] == "31.00"
    assert "199 commands had every stamp, 1 went alone" in text
