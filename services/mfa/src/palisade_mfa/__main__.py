"""`python -m palisade_mfa`: the same as `palisade run mfa` (run until SIGTERM)."""

from palisade_events.cli.main import run_worker_process

run_worker_process("mfa")
