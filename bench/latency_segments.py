#!/usr/bin/env python
"""Where (b)'s command -> event latency goes, stage by stage.

Runs bench/bus.py's palisade arm (drain, then the latency run at `--rate`) with its worker
stamping each command on the machine's monotonic clock, which the load generator's process
reads too: delivered to the worker, its handler started (its batch taken and its transaction
open), its batch committed, its batch's events and audit records confirmed by the broker. With
the send and arrival times of the load generator and the collector, per command:

  send -> delivered          the broker: the quorum queue to the worker
  delivered -> handler       waiting for a batch (the one committing, the pace) and its BEGIN
  handler -> committed       the batch's writes, its outbox insert and COMMIT
  committed -> arrived       the batch's publishing (after the batch before) to the collector
  committed -> confirmed     ... until the broker confirmed it (what the pace waits for)

Only commands that went in a batch of two or more have every stamp; the count alone is printed.
The stamps cost the worker a few percent of CPU. The runtime's private methods are wrapped
here, in the worker's process only: this is a diagnostic, not part of the runtime.

Run from the repository root:  .venv/bin/python bench/latency_segments.py --rate 1400
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from bench import bus  # noqa: E402
from palisade_events import WorkerRuntime  # noqa: E402

STAMPS_ENV = "PALISADE_BENCH_STAMPS"
STAGES = ("delivered", "handler", "committed", "confirmed")
SEGMENTS = {
    "send -> delivered": ("sent", "delivered"),
    "delivered -> handler": ("delivered", "handler"),
    "handler -> committed": ("handler", "committed"),
    "committed -> arrived": ("committed", "arrived"),
    "committed -> confirmed": ("committed", "confirmed"),
    "total (send -> arrived)": ("sent", "arrived"),
}


def segment_ms(
    sent: Mapping[int, float], arrived: Mapping[int, float], stamps: Mapping[str, Mapping[int, float]]
) -> tuple[dict[str, list[float]], int]:
    """Each segment's duration in ms per command with every stamp (the same command at the same
    index in every list), and how many commands lacked a stamp."""
    times = {"sent": sent, "arrived": arrived, **stamps}
    complete = [n for n in sent if all(n in t for t in times.values())]
    out = {name: [(times[b][n] - times[a][n]) * 1000 for n in complete] for name, (a, b) in SEGMENTS.items()}
    return out, len(sent) - len(complete)


def report(segments: Mapping[str, Sequence[float]], incomplete: int) -> str:
    total = segments["total (send -> arrived)"]
    slowest = sorted(range(len(total)), key=total.__getitem__)[-max(1, len(total) // 100) :]
    lines = [f"  {'segment':<26} {'p50':>7} {'p90':>7} {'p99':>7}  {'slowest 1 %':>11}  (ms)"]
    for name, values in segments.items():
        ordered = sorted(values)
        mean_slowest = sum(values[i] for i in slowest) / len(slowest)
        lines.append(
            f"  {name:<26} {bus.percentile(ordered, 50):7.2f} {bus.percentile(ordered, 90):7.2f}"
            f" {bus.percentile(ordered, 99):7.2f}  {mean_slowest:11.2f}"
        )
    lines.append(
        f"  (slowest 1 %: each segment's mean over the 1 % of commands with the longest total;"
        f" {len(total)} commands had every stamp, {incomplete} went alone or lacked one)"
    )
    return "\n".join(lines)


# =====================================================================  in the worker's process


def stamp_the_worker(path: Path) -> None:
    """Wrap the runtime's delivery, batch commit and pause, and the bench handler, to stamp each command."""
    stamps: dict[str, dict[int, float]] = {stage: {} for stage in STAGES}
    on_message, commit_group, pause = WorkerRuntime._on_message, WorkerRuntime._commit_group, WorkerRuntime.pause
    make_handler = bus.one_state_row_update

    async def delivered(self: Any, message: Any) -> None:
        stamps["delivered"][json.loads(message.body)["payload"]["n"]] = time.perf_counter()
        await on_message(self, message)

    async def committed(self: Any, items: Any) -> Any:
        results = await commit_group(self, items)
        now = time.perf_counter()
        ns = [env.payload.n for _, env, _ in items]
        stamps["committed"].update(dict.fromkeys(ns, now))

        def confirmed(_: Any) -> None:
            stamps["confirmed"].update(dict.fromkeys(ns, time.perf_counter()))

        results[0][2].add_done_callback(confirmed)  # the batch's publishing (_commit_group)
        return results

    async def paused(self: Any) -> None:
        await pause(self)
        await asyncio.to_thread(path.write_text, json.dumps(stamps))

    def timed_handler(types: Any, **kwargs: Any) -> Any:
        handler = make_handler(types, **kwargs)

        async def on_command(cmd: Any, ctx: Any) -> None:
            stamps["handler"][cmd.n] = time.perf_counter()
            await handler(cmd, ctx)

        return on_command

    WorkerRuntime._on_message = delivered  # type: ignore[method-assign]
    WorkerRuntime._commit_group = committed  # type: ignore[method-assign]
    WorkerRuntime.pause = paused  # type: ignore[method-assign]
    bus.one_state_row_update = timed_handler


# =====================================================================  the driver


def main(argv: Sequence[str]) -> int:
    if "--worker" in argv:
        stamp_the_worker(Path(os.environ[STAMPS_ENV]))
        return bus.main(argv)
    if "--rate" not in argv:
        print("usage: latency_segments.py --rate R [bench/bus.py options]", file=sys.stderr)
        return 2
    bus.SCRIPT = Path(__file__).resolve()  # the worker process runs this file, stamped
    runs: list[tuple[Any, dict[int, float], dict[int, float]]] = []
    latency = bus.Driver.latency

    async def kept(self: Any, rate: float, seconds: float) -> Any:
        result = await latency(self, rate, seconds)
        runs.append((result, dict(self.sent_at), dict(self.collector.arrived)))
        return result

    bus.Driver.latency = kept  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stamps.json"
        os.environ[STAMPS_ENV] = str(path)
        code = bus.main([*argv, "--palisade-only", "--no-floor"])
        if code or not runs or not path.exists():
            return code or 1
        # The worker rewrote the file at each pause: the last one followed the latency run.
        stamps = {k: {int(n): t for n, t in v.items()} for k, v in json.loads(path.read_text()).items()}
    _, sent, arrived = runs[-1]
    print()
    print("Where the latency went (bench/latency_segments.py)")
    print(report(*segment_ms(sent, arrived, stamps)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
