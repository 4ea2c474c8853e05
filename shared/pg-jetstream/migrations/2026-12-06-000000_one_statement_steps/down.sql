DROP FUNCTION stale_unless(boolean, text);
DROP FUNCTION inbox_write(text, uuid[]);
CREATE OR REPLACE FUNCTION outbox_write(events jsonb) RETURNS bigint
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
