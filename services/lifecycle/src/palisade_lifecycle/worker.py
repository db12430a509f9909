"""The lifecycle worker's definition, found by `palisade run lifecycle`."""

from __future__ import annotations

from importlib.resources import files

from palisade_events import WorkerSpec

from .handlers import HANDLERS, JOBS


def spec() -> WorkerSpec[None]:
    return WorkerSpec(
        name="lifecycle",
        handlers=HANDLERS,
        migrations=files("palisade_lifecycle") / "migrations",
        jobs=JOBS,
        # Every handler only reads and writes the worker's tables (its VM-facing work is the
        # orchestrator's, reached through events): messages that arrive together commit together.
        group_commit=True,
    )
