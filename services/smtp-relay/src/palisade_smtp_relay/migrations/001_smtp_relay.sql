-- Services as the relay knows them (from platform.ServiceProvisioned), with the
-- relay's own state of each: suspension and the quota window.
CREATE TABLE services (
    service_id      text PRIMARY KEY,
    slug            text        NOT NULL,  -- first label of the hostname: the sender's local part
    private_ip      text        NOT NULL,  -- canonical text form (domain.normalize_ip)
    provisioned_at  timestamptz NOT NULL,
    suspended       boolean     NOT NULL DEFAULT false,
    suspended_at    timestamptz,
    -- The newest marketing violations inside 24 h, at most 5 (domain.record_violation).
    violations      timestamptz[] NOT NULL DEFAULT '{}',
    -- The quota ring: one send time per recipient still inside the rolling window,
    -- sorted, at most 300 (domain.reserve explains why that is exact). Read and
    -- written only with this row locked FOR UPDATE.
    sends           timestamptz[] NOT NULL DEFAULT '{}',
    last_send_at    timestamptz
);

-- The connect-time lookup: which service owns this private address.
CREATE INDEX services_by_private_ip ON services (private_ip, provisioned_at DESC);
-- No index on last_send_at or sends: a reservation then changes no indexed column,
-- so its UPDATE stays a HOT update.
