"""Palisade's message contract and worker runtime."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .audit import AuditRecord
from .clock import Clock, ManualClock, SystemClock
from .errors import PermanentError, Rejected, TransientError
from .messages import (
    SYSTEM,
    Actor,
    Command,
    Envelope,
    Event,
    Payload,
    Query,
    QueryRejected,
    Registry,
    Reply,
    StrictModel,
    new_envelope,
)
from .settings import RuntimeSettings

if TYPE_CHECKING:
    from .runtime import Context, Job, WorkerRuntime, WorkerSpec

# The runtime (asyncpg, the outbox, the consumer) loads on first use: a `palisade` call that
# publishes or reads the audit stream imports this package without running a worker.
_RUNTIME = frozenset({"Context", "Job", "WorkerRuntime", "WorkerSpec"})


def __getattr__(name: str) -> Any:
    if name not in _RUNTIME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".runtime", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "SYSTEM",
    "Actor",
    "AuditRecord",
    "Clock",
    "Command",
    "Context",
    "Envelope",
    "Event",
    "Job",
    "ManualClock",
    "Payload",
    "PermanentError",
    "Query",
    "QueryRejected",
    "Registry",
    "Rejected",
    "Reply",
    "RuntimeSettings",
    "StrictModel",
    "SystemClock",
    "TransientError",
    "WorkerRuntime",
    "WorkerSpec",
    "new_envelope",
]
