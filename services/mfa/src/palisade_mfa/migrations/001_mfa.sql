-- One row per platform account the worker has seen (from platform.AccountRegistered,
-- or any message naming it). A new account uses email codes.
-- Secrets: the TOTP secret is AES-GCM ciphertext (nonce || ciphertext || tag) with the
-- id of its key beside it; codes are only ever stored as keyed hashes (HMAC-SHA256).
CREATE TABLE accounts (
    account_id         text PRIMARY KEY,
    email              text,
    mode               text        NOT NULL DEFAULT 'email' CHECK (mode IN ('disabled', 'email', 'totp')),
    totp_key_id        text,
    totp_secret        bytea,
    totp_last_step     bigint,      -- the last accepted TOTP step: never accepted again
    pending_key_id     text,
    pending_secret     bytea,       -- a TOTP secret handed out, awaiting its confirmation code
    pending_expires_at timestamptz,
    failures           timestamptz[] NOT NULL DEFAULT '{}',  -- failed codes inside the window
    locked_until       timestamptz,
    email_codes_sent   timestamptz[] NOT NULL DEFAULT '{}',  -- for the email rate limit
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    CHECK ((totp_secret IS NULL) = (totp_key_id IS NULL)),
    CHECK ((pending_secret IS NULL) = (pending_key_id IS NULL)),
    CHECK (mode <> 'totp' OR totp_secret IS NOT NULL)
);

-- One row per login (the dashboard's login id) that asked for a challenge.
CREATE TABLE login_challenges (
    login_id     text PRIMARY KEY,
    account_id   text        NOT NULL REFERENCES accounts ON DELETE CASCADE,
    mode         text        NOT NULL CHECK (mode IN ('disabled', 'email', 'totp')),
    code_key_id  text,
    code_hash    bytea,        -- email mode: HMAC of the emailed code, bound to account and login
    issued_at    timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    verified_at  timestamptz,
    CHECK ((code_hash IS NULL) = (code_key_id IS NULL))
);
CREATE INDEX login_challenges_expiry ON login_challenges (expires_at);

-- The latest emailed code that confirms a security change (e.g. disable) in email mode.
CREATE TABLE action_codes (
    account_id  text PRIMARY KEY REFERENCES accounts ON DELETE CASCADE,
    code_key_id text        NOT NULL,
    code_hash   bytea       NOT NULL,
    issued_at   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

-- Single-use recovery codes, handed out once when TOTP is enabled.
CREATE TABLE recovery_codes (
    id          bigserial PRIMARY KEY,
    account_id  text        NOT NULL REFERENCES accounts ON DELETE CASCADE,
    code_key_id text        NOT NULL,
    code_hash   bytea       NOT NULL,
    issued_at   timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX recovery_codes_unused ON recovery_codes (account_id) WHERE used_at IS NULL;
