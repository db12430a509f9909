"""A worker process freezes its startup heap (runtime.freeze_startup_heap): a full collection
walking every module and model object cost ~50 ms pauses under steady traffic (issue 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_run_forever_freezes_what_start_built_and_still_stops_on_sigterm() -> None:
    # run_forever with a start() that only asks for the stop, and a stop() that reports what
    # the collector left frozen: the process's own startup objects, thousands of them.
    script = textwrap.dedent(
        """
        import asyncio, gc, os, signal, uvloop
        from palisade_events.runtime import WorkerRuntime

        class Bare(WorkerRuntime):
            async def start(self, consume=True):
                asyncio.get_running_loop().call_later(0.01, os.kill, os.getpid(), signal.SIGTERM)
            async def stop(self):
                print(gc.get_freeze_count(), flush=True)

        uvloop.run(object.__new__(Bare).run_forever())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert int(done.stdout.strip()) > 10_000, done.stdout + done.stderr
