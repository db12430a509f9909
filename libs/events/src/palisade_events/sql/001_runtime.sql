-- Tables the runtime keeps in every worker's schema.

-- Inbox: one row per handled message, written in the handler's transaction,
-- so a redelivered message is recognised and acked without a second effect.
CREATE TABLE inbox (
    message_id  uuid PRIMARY KEY,
    type        text        NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now()
);

-- Outbox: events and audit records, inserted in the handler's transaction and
-- published afterwards by the relay (with publisher confirms).
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    message_id    uuid        NOT NULL,
    exchange      text        NOT NULL,
    routing_key   text        NOT NULL,
    message_type  text        NOT NULL,
    correlation_id uuid,
    body          bytea       NOT NULL,
    headers       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
