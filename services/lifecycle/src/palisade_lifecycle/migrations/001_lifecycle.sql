-- Services as lifecycle knows them, from platform.ServiceProvisioned.
CREATE TABLE services (
    service_id  text PRIMARY KEY,
    name        text        NOT NULL,
    account_id  text        NOT NULL,
    protected   boolean     NOT NULL DEFAULT false,
    state       text        NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'deleting', 'terminated', 'deprovisioned')),
    updated_at  timestamptz NOT NULL
);

-- One row per delete request that was accepted.
CREATE TABLE deletions (
    deletion_id   uuid PRIMARY KEY,
    service_id    text        NOT NULL REFERENCES services,
    requested_at  timestamptz NOT NULL,
    keep_backup   boolean     NOT NULL,
    state         text        NOT NULL CHECK (state IN ('awaiting_backup', 'approved', 'halted')),
    backup_id     text,
    approved_at   timestamptz,
    halted_reason text
);
-- At most one deletion in flight per service.
CREATE UNIQUE INDEX deletions_one_in_flight ON deletions (service_id) WHERE state = 'awaiting_backup';

-- Backups of each service, from backup.BackupCompleted; retained ones carry purge_at.
CREATE TABLE backups (
    backup_id    text PRIMARY KEY,
    service_id   text        NOT NULL,
    purpose      text        NOT NULL,
    completed_at timestamptz NOT NULL,
    purge_at     timestamptz,
    state        text        NOT NULL DEFAULT 'available'
                 CHECK (state IN ('available', 'retained', 'purge_requested', 'purged'))
);
CREATE INDEX backups_by_service ON backups (service_id);

-- The durable scheduler: actions due at a time, claimed with FOR UPDATE SKIP LOCKED
-- and marked done in the same transaction as their effects (exactly once).
CREATE TABLE scheduled_actions (
    id          bigserial PRIMARY KEY,
    action      text        NOT NULL CHECK (action IN ('purge_backup')),
    service_id  text        NOT NULL,
    backup_id   text        NOT NULL,
    due_at      timestamptz NOT NULL,
    done_at     timestamptz,
    UNIQUE (action, backup_id)
);
CREATE INDEX scheduled_actions_due ON scheduled_actions (due_at) WHERE done_at IS NULL;
