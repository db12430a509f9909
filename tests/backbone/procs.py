"""Running the probe worker as a real process, to kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.fixtures import AMQP_URL, DATABASE_URL, TEST_RETRY_DELAYS

REPO = Path(__file__).resolve().parents[2]


class ProbeProcess:
    def __init__(self, name: str, log_path: Path, **env: str) -> None:
        self.name = name
        self.log_path = log_path
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PROBE_NAME": name,
            "PALISADE_AMQP_URL": AMQP_URL,
            "PALISADE_DATABASE_URL": DATABASE_URL,
            "PALISADE_METRICS_PORT": "0",
            "PALISADE_RETRY_DELAYS": str(TEST_RETRY_DELAYS),
            "PALISADE_OUTBOX_POLL_SECONDS": "0.2",
            "PALISADE_OUTBOX_GRACE_SECONDS": "1.0",
            "PALISADE_LOG_LEVEL": "WARNING",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.backbone.probe"], cwd=REPO, env=self.env, stdout=log, stderr=log
        )
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
