DROP INDEX outbox_by_cause;
ALTER TABLE outbox ADD COLUMN published_at TIMESTAMPTZ;
CREATE INDEX outbox_pending ON outbox (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('pg_jetstream.wakes_own_relay', true), '') <> 'on' AND NOT EXISTS (
        SELECT 1 FROM outbox
        WHERE published_at IS NULL AND seq < (SELECT min(seq) FROM inserted)
    ) THEN
        PERFORM pg_notify('outbox', '');
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
