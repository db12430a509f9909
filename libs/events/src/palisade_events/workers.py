"""Discovering the installed workers: each service package declares an entry point
in the group `palisade.workers`, named after the worker, pointing at a function
that returns its `WorkerSpec`."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from .runtime import WorkerSpec

GROUP = "palisade.workers"


def installed_workers() -> dict[str, Any]:
    """name -> entry point, sorted by name."""
    eps = entry_points(group=GROUP)
    return {ep.name: ep for ep in sorted(eps, key=lambda e: e.name)}


def load_worker(name: str) -> WorkerSpec[Any]:
    eps = installed_workers()
    if name not in eps:
        known = ", ".join(eps) or "none installed"
        raise KeyError(f"unknown worker {name!r} (installed: {known})")
    factory = eps[name].load()
    spec = factory()
    if not isinstance(spec, WorkerSpec):
        raise TypeError(f"entry point {name} did not return a WorkerSpec")
    return spec
