"""`python -m palisade_smtp_relay`: the same as `palisade run smtp-relay` (run until SIGTERM)."""

from palisade_events.cli.main import run_worker_process

run_worker_process("smtp-relay")
