"""`python -m palisade_firewall`: the same as `palisade run firewall` (run until SIGTERM)."""

from palisade_events.cli.main import run_worker_process

run_worker_process("firewall")
