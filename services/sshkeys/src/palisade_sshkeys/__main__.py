"""`python -m palisade_sshkeys`: the same as `palisade run sshkeys` (run until SIGTERM)."""

from palisade_events.cli.main import run_worker_process

run_worker_process("sshkeys")
