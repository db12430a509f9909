"""ratelimit's own metrics (the runtime adds the per-message ones, hostctl the SSH ones)."""

from prometheus_client import Counter, Histogram

APPLIES = Counter(
    "palisade_webpolicy_applies_total",
    "Applies of a web policy to a VM's nginx, by outcome"
    " (applied, unchanged, retried, nginx_refused, host_key_mismatch, failed)",
    ["outcome"],
)
APPLY_SECONDS = Histogram(
    "palisade_webpolicy_apply_seconds",
    "Time to write a web policy to a VM, validate it and reload nginx",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
