"""The TLS worker's own metrics (the runtime adds the per-message ones, hostctl the SSH ones).

`palisade_tls_certificate_expiry_timestamp_seconds` has one series per service (the
cardinality of the fleet, which Prometheus handles; alert on `min(...) - time()`).
`palisade_tls_domains` is read from the database, so every replica reports the whole
fleet's counts: aggregate with `max`, not `sum`.
"""

from prometheus_client import Counter, Gauge, Histogram

CERTIFICATE_EXPIRY = Gauge(
    "palisade_tls_certificate_expiry_timestamp_seconds",
    "When the certificate a service serves expires (Unix time)",
    ["service_id"],
)
ISSUANCES = Counter(
    "palisade_tls_issuances_total",
    "Certificate orders, by outcome (issued, validation_failed, self_check_failed, rate_limited, ca_error,"
    " ca_unreachable, port_80_closed, vm_error)",
    ["outcome"],
)
ISSUANCE_SECONDS = Histogram(
    "palisade_tls_issuance_seconds",
    "Time from ordering a certificate to having it (challenges, validation, issuance)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
DOMAINS = Gauge("palisade_tls_domains", "Domains by state, fleet-wide", ["state"])
DNS_CHECKS = Counter(
    "palisade_tls_dns_checks_total", "DNS checks of domains, by verdict (ok, proxied, pending)", ["verdict"]
)
REJECTIONS = Counter("palisade_tls_domain_rejections_total", "Refused domains, by reason", ["reason"])
CONFIG_APPLIES = Counter(
    "palisade_tls_config_applies_total",
    "Writes of server blocks and certificates to VMs, by outcome (applied, unchanged, retried, failed)",
    ["outcome"],
)

DOMAIN_STATES = ("pending_dns", "proxied", "blocked", "issuing", "active", "failed")
STORED_SECRETS = Gauge(
    "palisade_tls_stored_secrets",
    "Encrypted keys at rest, by kind (certificate_key, account_key) and the id of the key that encrypts them;"
    " an old key id can be retired once it has no series above zero",
    ["kind", "key_id"],
)
ACME_BAD_NONCES = Counter(
    "palisade_tls_acme_bad_nonces_total", "badNonce rejections by the CA, each retried with a fresh nonce"
)
