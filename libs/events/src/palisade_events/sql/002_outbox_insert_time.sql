-- The relay's poll leaves rows younger than a grace period to the process that wrote them
-- (it publishes them itself right after its commit). Their age must count from the insert,
-- which comes last in a handler's transaction, not from the transaction's start: a handler
-- that spent longer than the grace on a VM would otherwise have its rows published twice.
ALTER TABLE outbox ALTER COLUMN created_at SET DEFAULT clock_timestamp();
