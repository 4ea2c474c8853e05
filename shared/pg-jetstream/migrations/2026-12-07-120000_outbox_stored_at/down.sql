ALTER TABLE outbox DROP COLUMN stored_at;
