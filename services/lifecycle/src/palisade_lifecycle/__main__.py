"""`python -m palisade_lifecycle`: the same as `palisade run lifecycle` (run until SIGTERM)."""

from palisade_events.cli.main import run_worker_process

run_worker_process("lifecycle")
