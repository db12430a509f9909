"""Lifecycle's own metrics (the runtime adds the per-message ones)."""

from prometheus_client import Counter, Gauge

PROTECTED_SERVICES = Gauge("palisade_lifecycle_protected_services", "Services with termination protection on")
REJECTIONS = Counter("palisade_lifecycle_rejections_total", "Refused lifecycle commands", ["reason"])
BACKUPS_RETAINED = Gauge("palisade_lifecycle_backups_retained", "Pre-deletion backups inside their grace period")
PURGES = Counter("palisade_lifecycle_purges_total", "Backup purges requested, by reason", ["reason"])
