-- Writers publish their own events right after their commit and delete the
-- rows once JetStream has acknowledged them; the relay only sweeps up rows
-- that no writer confirmed. The outbox so holds nothing but unconfirmed
-- events: nothing is marked published, and nobody needs waking.
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
DROP INDEX outbox_published;
DROP INDEX outbox_pending;
DELETE FROM outbox WHERE published_at IS NOT NULL;
ALTER TABLE outbox DROP COLUMN published_at;
-- A redelivered message whose events are still unconfirmed publishes them
-- again before it is acknowledged: they are found by their cause.
CREATE INDEX outbox_by_cause ON outbox (causation_id) WHERE causation_id IS NOT NULL;
