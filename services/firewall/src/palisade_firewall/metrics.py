"""firewall's own metrics (the runtime adds the per-message ones, hostctl the SSH ones)."""

from prometheus_client import Counter, Histogram

APPLIES = Counter(
    "palisade_firewall_applies_total",
    "Rulesets put in force on VMs, by outcome (applied, unchanged, drift_repaired, retried, refused,"
    " readback_mismatch, host_key_mismatch, failed)",
    ["outcome"],
)
APPLY_SECONDS = Histogram(
    "palisade_firewall_apply_seconds",
    "Time to validate, apply and read back a ruleset on a VM",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# Rule counts per applied ruleset, not a gauge per service (that label would be unbounded).
RULES = Histogram(
    "palisade_firewall_rules",
    "User rules in each applied ruleset (0 when the firewall is disabled)",
    buckets=(0, 1, 5, 10, 25, 50, 100, 250, 500),
)
REJECTIONS = Counter("palisade_firewall_rejections_total", "Refused firewall changes, by reason", ["reason"])
