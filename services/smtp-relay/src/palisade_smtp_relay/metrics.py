"""The relay's own metrics (the runtime adds the per-message ones).

`palisade_smtp_quota_used{service_id}` is bounded by exporting only the top
services: every `quota_gauge_seconds` the relay recomputes, from the database, the
`quota_gauge_top` (default 20) services with the most sends inside the rolling
window and replaces the gauge's series with theirs. Thousands of services thus cost
at most 20 series, and the ones an operator cares about (close to 300) are always
among them.
"""

from prometheus_client import Counter, Gauge, Histogram

EMAILS = Counter(
    "palisade_smtp_emails_total",
    "SMTP transactions (a refused connection counts as one) by outcome: "
    "relayed, rejected (5xx), deferred (4xx: quota, upstream unavailable)",
    ["outcome"],
)
REJECTIONS = Counter("palisade_smtp_rejections_total", "Refusals by reason", ["reason"])
QUOTA_USED = Gauge(
    "palisade_smtp_quota_used",
    "Emails sent inside the rolling 3600 s window, for the top services only (bounded cardinality)",
    ["service_id"],
)
SUSPENSIONS = Counter("palisade_smtp_suspensions_total", "Services suspended for repeated marketing mail")
SESSION_SECONDS = Histogram(
    "palisade_smtp_session_seconds",
    "Duration of SMTP client sessions, connect to close",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
UPSTREAM_SECONDS = Histogram(
    "palisade_smtp_upstream_seconds",
    "Time to hand one message to the smarthost",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RESERVATIONS_PER_STATEMENT = Histogram(
    "palisade_smtp_reservations_per_statement",
    "Quota reservations decided by one database statement (sessions that reach DATA together share one)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 100),
)
