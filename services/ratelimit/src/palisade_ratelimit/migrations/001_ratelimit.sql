-- The ratelimit worker's projection of services (their SSH identity) and their web policy.
CREATE TABLE services (
    service_id         text PRIMARY KEY,
    ssh_host           text NOT NULL,
    ssh_port           integer NOT NULL,
    host_key           text NOT NULL,
    has_ipv6           boolean NOT NULL DEFAULT false,
    rate_requests      integer NOT NULL CHECK (rate_requests BETWEEN 1 AND 100000),
    rate_per           text NOT NULL CHECK (rate_per IN ('second', 'minute')),
    rate_enabled       boolean NOT NULL,
    cache_ttl_seconds  integer NOT NULL CHECK (cache_ttl_seconds BETWEEN 0 AND 3600),
    cache_enabled      boolean NOT NULL,
    policy_version     bigint NOT NULL DEFAULT 1,  -- bumped by every change of the policy
    -- applied: the VM's nginx runs the rendered policy; pending: an apply is due; failed: the last one failed
    apply_state        text NOT NULL DEFAULT 'pending' CHECK (apply_state IN ('applied', 'pending', 'failed')),
    applied_version    bigint,
    applied_checksum   text,
    last_error         text,
    apply_requested_at timestamptz,
    applied_at         timestamptz,
    updated_at         timestamptz NOT NULL
);

CREATE INDEX services_pending ON services (apply_requested_at) WHERE apply_state = 'pending';
