"""`python -m palisade_ratelimit`: the same as `palisade run ratelimit` (run until SIGTERM)."""

from palisade_events.cli.main import run_worker_process

run_worker_process("ratelimit")
