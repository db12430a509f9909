# The shared fixtures serve every test directory (libs/*/tests, services/*/tests, tests/).
from __future__ import annotations

import faulthandler
import os
from pathlib import Path
from typing import IO

import pytest

pytest_plugins = ["tests.fixtures", "tests.vms", "tests.hardening.hardening_secrets_scan"]

# pytest-timeout bounds each test, but not what runs after a test it stopped (session
# teardown, plugins' end-of-session work): a hang there once ran CI into its 90-minute
# limit with nothing printed. The whole session gets a limit too; past it every thread's
# stack is written to HANG_FILE (pytest holds stdout and stderr; .ci/run prints the file)
# and the process exits, so the hang is a failure that says where it was.
SESSION_LIMIT_SECONDS = float(os.environ.get("PALISADE_TEST_SESSION_LIMIT", "1800"))
HANG_FILE = Path(__file__).parent / ".run" / f"test-hang-{os.getpid()}.txt"  # one per session
_hang_file: IO[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _hang_file
    if SESSION_LIMIT_SECONDS > 0:
        HANG_FILE.parent.mkdir(exist_ok=True)
        _hang_file = HANG_FILE.open("w")
        _hang_file.write(f"pytest session still running after {SESSION_LIMIT_SECONDS:.0f}s; every thread's stack:\n")
        _hang_file.flush()
        faulthandler.dump_traceback_later(SESSION_LIMIT_SECONDS, exit=True, file=_hang_file)


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.cancel_dump_traceback_later()
    if _hang_file is not None:
        _hang_file.close()
        HANG_FILE.unlink(missing_ok=True)
