-- The transactional outbox: a use case writes its state change and the events
-- it causes in one transaction; the relay publishes the rows to JetStream and
-- marks them published. `event_id` is the CloudEvents id and the JetStream
-- message id, so a row published twice is stored once.
CREATE TABLE outbox (
    event_id UUID PRIMARY KEY,
    -- Insertion order: the relay publishes oldest first.
    seq BIGSERIAL NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    event_type TEXT NOT NULL,
    source TEXT NOT NULL,
    payload BYTEA NOT NULL,
    correlation_id TEXT,
    causation_id UUID,
    -- The W3C trace context of the span that wrote the row.
    traceparent TEXT,
    tracestate TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ
);

-- What the relay scans: only rows still to publish.
CREATE INDEX outbox_pending ON outbox (seq) WHERE published_at IS NULL;
-- What the clean-up scans.
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake an idle relay when events arrive in an empty outbox. Only then: every
-- NOTIFY takes a lock that serialises committing transactions, which would
-- cap the commit rate of a busy service; and a busy relay keeps polling for
-- a moment after each batch, so it needs no wake-up. Notifications are
-- delivered at commit and coalesced per transaction.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
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

-- The idempotent consumer's memory: a consumer's handler transaction inserts
-- (consumer, event id) first; a row already there means the event was
-- applied, and the redelivery is acknowledged without effect.
CREATE TABLE inbox (
    consumer TEXT NOT NULL,
    event_id UUID NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX inbox_by_age ON inbox (received_at);
