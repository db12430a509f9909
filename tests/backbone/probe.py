"""A small worker for testing the runtime: its own messages, one table, one event.

Its message types are built per owner name, so every test gets its own queues and
schema. `python -m tests.backbone.probe` runs it as a process (PROBE_NAME names it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, ClassVar

from pydantic import Field

from palisade_events import Command, Context, Event, Query, Reply, TransientError, WorkerRuntime, WorkerSpec
from palisade_events.settings import RuntimeSettings


@dataclass(frozen=True)
class ProbeTypes:
    ProbeCommand: type[Command]
    ProbeDone: type[Event]
    ProbeCount: type[Query]
    ProbeCountReply: type[Reply]


def probe_types(owner_name: str) -> ProbeTypes:
    class ProbeCountReply(Reply):
        effects: int

    class ProbeCommand(Command):
        """Record one effect for `n`."""

        owner: ClassVar[str] = owner_name
        n: int = Field(ge=0, le=10_000_000)
        reject: bool = False

    class ProbeDone(Event):
        owner: ClassVar[str] = owner_name
        n: int

    class ProbeCount(Query):
        owner: ClassVar[str] = owner_name
        reply: ClassVar[type[Reply]] = ProbeCountReply

    return ProbeTypes(ProbeCommand, ProbeDone, ProbeCount, ProbeCountReply)


def probe_spec(name: str) -> tuple[WorkerSpec[None], ProbeTypes]:
    t = probe_types(name)

    async def on_command(cmd: Any, ctx: Context[None]) -> None:
        if await ctx.db.fetchval("SELECT failing FROM switch"):
            raise TransientError("probe switch says the backend is down")
        if cmd.reject:
            from palisade_events import Rejected

            raise Rejected("probe_rejected", t.ProbeDone(n=-1))
        await ctx.db.execute(
            "INSERT INTO effects (message_id, n) VALUES ($1, $2)",
            ctx.envelope.message_id if ctx.envelope else None,
            cmd.n,
        )
        # The state row of the command's service, as a real worker's handler locks and updates it.
        await ctx.db.execute(
            "INSERT INTO service_state (service_id, handled) VALUES ($1, 1)"
            " ON CONFLICT (service_id) DO UPDATE SET handled = service_state.handled + 1",
            ctx.service_id or "",
        )
        await ctx.emit(t.ProbeDone(n=cmd.n))

    async def on_count(_: Any, ctx: Context[None]) -> Reply:
        return t.ProbeCountReply(effects=await ctx.db.fetchval("SELECT count(*) FROM effects"))

    spec: WorkerSpec[None] = WorkerSpec(
        name=name,
        handlers={t.ProbeCommand: on_command, t.ProbeCount: on_count},
        migrations=files("tests.backbone") / "probe_migrations",
    )
    return spec, t


def main() -> None:
    logging.basicConfig(level=os.environ.get("PALISADE_LOG_LEVEL", "WARNING"))
    spec, _ = probe_spec(os.environ["PROBE_NAME"])
    asyncio.run(WorkerRuntime(spec, RuntimeSettings()).run_forever())


if __name__ == "__main__":
    main()
