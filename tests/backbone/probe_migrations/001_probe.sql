-- effects has no unique key on purpose: a second effect of one message shows up as a second row.
CREATE TABLE effects (id bigserial PRIMARY KEY, message_id uuid, n integer NOT NULL);
-- One row: the schema is ready once it exists.
CREATE TABLE counter (value bigint NOT NULL);
INSERT INTO counter VALUES (0);
CREATE TABLE service_state (service_id text PRIMARY KEY, handled bigint NOT NULL);
CREATE TABLE switch (failing boolean NOT NULL);
INSERT INTO switch VALUES (false);
