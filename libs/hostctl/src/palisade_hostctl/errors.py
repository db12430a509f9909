"""What can go wrong on the way to a VM, split by what the caller should do about it.

`transient` errors are worth another attempt later (a worker raises
`TransientError` for them, so the message goes round the retry ladder); the
others will fail the same way again until a person or an event changes something.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar


class HostctlError(Exception):
    """Base of every hostctl failure."""

    transient: ClassVar[bool] = False

    def __init__(self, message: str, *, host: str = "") -> None:
        super().__init__(message)
        self.host = host


class HostKeyMismatch(HostctlError):  # noqa: N818 - named for what happened
    """The server did not prove the projected host key. Never retried, never logged into."""

    def __init__(self, message: str, *, host: str, expected: str, presented: str | None) -> None:
        super().__init__(message, host=host)
        self.expected_fingerprint = expected
        self.presented_fingerprint = presented


class AuthenticationFailed(HostctlError):  # noqa: N818 - named for what happened
    """The host key was right but the VM refused Palisade's automation key."""


class NegotiationFailed(HostctlError):  # noqa: N818 - named for what happened
    """No common algorithms with the server; retrying cannot change that."""


class HostUnreachable(HostctlError):  # noqa: N818 - named for what happened
    """No connection after the retries, or the connection died during a command."""

    transient = True


class CommandTimeout(HostctlError):  # noqa: N818 - named for what happened
    """A command ran longer than its timeout; its channel was closed."""

    transient = True


class CommandFailed(HostctlError):  # noqa: N818 - named for what happened
    """A command exited non-zero (or was killed by a signal)."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        argv: Sequence[str],
        exit_status: int | None,
        stdout: bytes = b"",
        stderr: bytes = b"",
    ) -> None:
        super().__init__(message, host=host)
        self.argv = list(argv)
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr

    @property
    def output(self) -> str:
        """stdout then stderr, decoded for people."""
        return (self.stdout + self.stderr).decode("utf-8", "replace").strip()


class ValidationFailed(CommandFailed):
    """The validate command refused the new file; the previous file is back in place."""


class ActivationFailed(CommandFailed):
    """The file passed validation and is in place, but the activate command failed."""
