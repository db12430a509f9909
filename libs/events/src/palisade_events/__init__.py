"""Palisade's message contract and worker runtime."""

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
    Registry,
    Reply,
    StrictModel,
    new_envelope,
)
from .runtime import Context, Job, QueryRejected, WorkerRuntime, WorkerSpec
from .settings import RuntimeSettings

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
