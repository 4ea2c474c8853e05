-- Writes events into the outbox from a JSON array of rows as pg-jetstream
-- renders them (`OutboxWrite::json`: the payload in hex), in the array's
-- order, and returns how many. A statement of a service's own writes its
-- change and its events at once, in one round trip and one implicit
-- transaction, by calling it from the common table expression that returns
-- a row when the change was made:
--
--   WITH placed AS (INSERT INTO orders ... RETURNING order_id),
--        events AS (SELECT outbox_write($8::jsonb) FROM placed)
--   SELECT EXISTS (SELECT FROM placed), (SELECT count(*) FROM events)
--
-- The outbox's columns are so named here and in pg-jetstream alone.
CREATE FUNCTION outbox_write(events jsonb) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    WITH written AS (
        INSERT INTO outbox (event_id, subject, event_type, source, payload,
                            correlation_id, causation_id, traceparent, tracestate,
                            created_at)
        SELECT (row.event ->> 'event_id')::uuid,
               row.event ->> 'subject',
               row.event ->> 'event_type',
               row.event ->> 'source',
               decode(row.event ->> 'payload', 'hex'),
               row.event ->> 'correlation_id',
               (row.event ->> 'causation_id')::uuid,
               row.event ->> 'traceparent',
               row.event ->> 'tracestate',
               (row.event ->> 'created_at')::timestamptz
        FROM jsonb_array_elements(events) WITH ORDINALITY AS row (event, position)
        ORDER BY row.position
        RETURNING 1)
    SELECT count(*) FROM written
$$;
