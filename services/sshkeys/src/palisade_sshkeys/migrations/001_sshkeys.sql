-- The sshkeys worker's projection of services (their SSH identity) and their keys.
CREATE TABLE services (
    service_id        text PRIMARY KEY,
    ssh_host          text NOT NULL,
    ssh_port          integer NOT NULL,
    host_key          text NOT NULL,
    keys_version      bigint NOT NULL DEFAULT 0,  -- bumped by every change of the key list
    -- applied: the VM has exactly the rendered keys; pending: a write is due; failed: the last write failed
    apply_state       text NOT NULL DEFAULT 'applied' CHECK (apply_state IN ('applied', 'pending', 'failed')),
    applied_checksum  text,
    last_error        text,
    apply_requested_at timestamptz,
    applied_at        timestamptz,
    updated_at        timestamptz NOT NULL
);

CREATE TABLE keys (
    seq         bigserial,  -- the order keys were added in, the order of the file
    service_id  text NOT NULL REFERENCES services (service_id) ON DELETE CASCADE,
    fingerprint text NOT NULL,
    title       text NOT NULL,
    algorithm   text NOT NULL,
    bits        integer NOT NULL,
    line        text NOT NULL,
    added_at    timestamptz NOT NULL,
    PRIMARY KEY (service_id, fingerprint)
);

CREATE INDEX services_pending ON services (apply_requested_at) WHERE apply_state = 'pending';
