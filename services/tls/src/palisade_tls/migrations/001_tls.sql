-- The TLS worker: its projection of services (identity, addresses, port 80), their domains,
-- their certificates (private keys encrypted), and the ACME account (key encrypted).

CREATE TABLE services (
    service_id          text PRIMARY KEY,
    hostname            text NOT NULL,
    ipv4                text,
    ipv6                text,
    ssh_host            text NOT NULL,
    ssh_port            integer NOT NULL,
    host_key            text NOT NULL,
    -- issuance: when the certificate should next be obtained or renewed, and why
    next_attempt_at     timestamptz,
    attempt_reason      text,
    issue_requested_at  timestamptz,          -- a CertificateIssueRequested is on its way
    force_issue         boolean NOT NULL DEFAULT false,  -- renew/reset asked: issue even if not due
    reset_requested     boolean NOT NULL DEFAULT false,  -- reset asked: the served certificate is set aside
    failures            integer NOT NULL DEFAULT 0,      -- consecutive failed attempts
    retry_not_before    timestamptz,          -- the CA's Retry-After
    last_error          text,
    -- the VM's configuration
    apply_requested_at  timestamptz,          -- a TlsConfigApplyRequested is on its way
    applied_checksum    text,
    applied_serial      text,
    apply_error         text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);

CREATE INDEX services_due ON services (next_attempt_at) WHERE next_attempt_at IS NOT NULL;

-- Port 80 as the firewall last reported it; kept apart from services so that a
-- FirewallApplied arriving before ServiceProvisioned is not lost.
CREATE TABLE firewall (
    service_id    text PRIMARY KEY,
    port_80_open  boolean NOT NULL,
    version       bigint NOT NULL,
    updated_at    timestamptz NOT NULL
);

CREATE TABLE domains (
    seq              bigserial,
    service_id       text NOT NULL REFERENCES services (service_id) ON DELETE CASCADE,
    domain           text NOT NULL,   -- A-label form
    kind             text NOT NULL CHECK (kind IN ('hostname', 'custom')),
    state            text NOT NULL CHECK (state IN ('pending_dns', 'proxied', 'blocked', 'issuing', 'active', 'failed')),
    added_at         timestamptz NOT NULL,
    pending_since    timestamptz,     -- DNS not right since (the 7-day limit counts from here)
    dns_checks       integer NOT NULL DEFAULT 0,
    next_dns_check_at timestamptz,
    last_error       text,
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (service_id, domain)
);

CREATE INDEX domains_dns_due ON domains (next_dns_check_at) WHERE state IN ('pending_dns', 'proxied');

CREATE TABLE certificates (
    id              bigserial PRIMARY KEY,
    service_id      text NOT NULL REFERENCES services (service_id) ON DELETE CASCADE,
    serial          text NOT NULL,
    domains         text[] NOT NULL,
    not_before      timestamptz NOT NULL,
    not_after       timestamptz NOT NULL,
    issued_at       timestamptz NOT NULL,   -- by the worker's clock
    renew_at        timestamptz NOT NULL,
    fullchain_pem   text NOT NULL,
    key_id          text NOT NULL,          -- which configured key encrypted the private key
    key_ciphertext  bytea NOT NULL,         -- AES-GCM, bound to (service, serial)
    status          text NOT NULL CHECK (status IN ('current', 'replaced', 'set_aside')),
    expiry_warned_at timestamptz
);

CREATE UNIQUE INDEX certificates_one_current ON certificates (service_id) WHERE status = 'current';

CREATE TABLE acme_accounts (
    directory_url   text PRIMARY KEY,
    account_uri     text,
    key_id          text NOT NULL,
    key_ciphertext  bytea NOT NULL,         -- AES-GCM, bound to the directory URL
    created_at      timestamptz NOT NULL
);
