"""The three ways a message can fail, and what the runtime does with each."""

from __future__ import annotations

from .messages import Event


class Rejected(Exception):  # noqa: N818 - a decision, not an error
    """A domain rejection: a normal outcome, not a failure.

    The handler's own writes are rolled back; the message is recorded in the
    inbox, `event` (if any) is emitted, an audit record `rejected` with the
    reason is written, and the message is acked.
    """

    def __init__(self, reason: str, event: Event | None = None, **detail: str | int | bool | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event = event
        self.detail = detail


class PermanentError(Exception):
    """Retrying cannot help (e.g. a host key mismatch): parked at once with the reason."""


class TransientError(Exception):
    """Worth retrying later (a VM or upstream unreachable): goes round the retry ladder."""
