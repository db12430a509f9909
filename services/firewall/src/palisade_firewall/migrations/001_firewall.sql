-- The firewall worker's projection of services (SSH identity, software), each service's
-- rule set (replaced as a whole), what is in force on its VM, and its TLS domains.
CREATE TABLE services (
    service_id         text PRIMARY KEY,
    software           text NOT NULL,
    ssh_host           text NOT NULL,
    ssh_port           integer NOT NULL,
    host_key           text NOT NULL,
    enabled            boolean NOT NULL DEFAULT true,
    version            bigint NOT NULL DEFAULT 0,  -- bumped by every accepted change of the rule set
    rules              jsonb NOT NULL DEFAULT '[]',  -- normalised rules (domain.Rule.to_json); [] when disabled
    -- applied: the VM enforces `version`; pending: an apply is due; failed: the last apply failed
    apply_state        text NOT NULL DEFAULT 'pending' CHECK (apply_state IN ('applied', 'pending', 'failed')),
    apply_requested_at timestamptz,
    applied_version    bigint,
    applied_checksum   text,
    applied_at         timestamptz,
    last_error         text,
    updated_at         timestamptz NOT NULL
);

CREATE INDEX services_pending ON services (apply_requested_at) WHERE apply_state = 'pending';

-- From tls.DomainAccepted / tls.DomainReleased: while a service has any, closing 80/tcp needs an acknowledgement.
-- No foreign key: the TLS worker's events may arrive before or after ServiceProvisioned.
CREATE TABLE tls_domains (
    service_id  text NOT NULL,
    domain      text NOT NULL,
    accepted_at timestamptz NOT NULL,
    PRIMARY KEY (service_id, domain)
);
