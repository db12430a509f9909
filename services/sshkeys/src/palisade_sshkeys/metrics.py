"""sshkeys' own metrics (the runtime adds the per-message ones, hostctl the SSH ones)."""

from prometheus_client import Counter, Histogram

APPLIES = Counter(
    "palisade_ssh_applies_total",
    "Writes of authorized_keys to VMs, by outcome (applied, unchanged, retried, host_key_mismatch, failed)",
    ["outcome"],
)
APPLY_SECONDS = Histogram(
    "palisade_ssh_apply_seconds",
    "Time to write authorized_keys to a VM and read it back",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REJECTIONS = Counter("palisade_sshkeys_rejections_total", "Refused key changes, by reason", ["reason"])
