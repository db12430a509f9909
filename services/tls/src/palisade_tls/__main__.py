"""`python -m palisade_tls`: the same as `palisade run tls` (run until SIGTERM)."""

from palisade_events.cli.main import run_worker_process

run_worker_process("tls")
