-- How often each event's handler failed, per consumer. Only these attempts
-- count toward the dead-letter limit; a delivery that ended otherwise (a nak
-- at shutdown, a process that stopped with the message in hand, a batch
-- kept while the database was away) spends nothing. Pruned with the inbox.
CREATE TABLE consumer_failures (
    consumer TEXT NOT NULL,
    event_id UUID NOT NULL,
    failures INT NOT NULL,
    failed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX consumer_failures_by_age ON consumer_failures (consumer, failed_at);
