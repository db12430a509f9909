"""hostctl's metrics, shared by every worker that talks to VMs (no per-host labels:
the number of hosts is unbounded)."""

from prometheus_client import Counter, Gauge, Histogram

CONNECTS = Counter(
    "palisade_hostctl_connects_total",
    "SSH connection attempts, by outcome (ok, unreachable, host_key_mismatch, auth_failed, negotiation_failed)",
    ["outcome"],
)
SESSIONS_IN_USE = Gauge("palisade_hostctl_sessions_in_use", "SSH sessions (channels) open right now, all hosts")
COMMAND_SECONDS = Histogram(
    "palisade_hostctl_command_seconds",
    "Time of one remote command, from waiting for a session slot to its exit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
