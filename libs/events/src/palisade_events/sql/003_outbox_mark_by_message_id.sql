-- A committing process publishes its rows from memory and marks them published afterwards by
-- message id: its rows go in with the transaction's COMMIT, in one round trip, which returns no
-- ids (the simple query protocol; outbox.insert_statement). Only unpublished rows are indexed,
-- as for the poll's index on id.
CREATE INDEX outbox_unpublished_message_id ON outbox (message_id) WHERE published_at IS NULL;
