-- When a row was stored, by the database's clock (the start of the
-- transaction that stored it): what the relay's sweep measures a row's age
-- by. `created_at` is the writer's clock (the event's `ce-time`, the same
-- whether it goes out from memory or from its row); a writer whose clock
-- runs ahead would make its rows look young, and the oldest of them, which
-- the sweep looks at first, would hold up every sweep of every replica
-- until the writer's clock was reached.
ALTER TABLE outbox ADD COLUMN stored_at TIMESTAMPTZ NOT NULL DEFAULT now();
