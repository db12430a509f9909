"""Injected time.

Every rule that depends on time (grace periods, code expiry, quotas, renewals)
reads a `Clock`, never `datetime.now()`, so tests move time instead of sleeping.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that only moves when told to; for tests running a worker in-process."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._now += delta
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when


class OffsetFileClock:
    """System time plus an offset (seconds) read from a file.

    Lets a test or a demo move the clock of a worker running in another process
    (`palisade clock advance 7d` writes the file); a missing file means no offset.
    """

    def __init__(self, path: Path) -> None:
        self._path = path

    def offset(self) -> timedelta:
        try:
            return timedelta(seconds=float(self._path.read_text().strip() or 0))
        except FileNotFoundError:
            return timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset()

    def advance(self, delta: timedelta) -> None:
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(str((self.offset() + delta).total_seconds()))
        tmp.replace(self._path)
