-- What a saga step that applies a batch of events in one statement of its
-- own (no BEGIN, no COMMIT: the statement commits by itself) calls from
-- that statement. The step read what it decides on beforehand, without
-- locks; its statement writes the change only if what it read still holds,
-- the events' inbox rows and the events it emits, all or nothing.
--
-- The functions are PL/pgSQL, whose statements are planned once per
-- session: a SQL function's body is planned again at every call, which
-- made it cost about half as much again as the statement calling it.

-- The inbox rows of `ids` for `consumer`, every one new: an event recorded
-- already (a redelivery, or a copy another replica applied meanwhile)
-- raises unique_violation on inbox_pkey, and the whole statement is undone.
-- The rows go in in id order (see the consumer's batches).
CREATE FUNCTION inbox_write(consumer text, ids uuid[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    written bigint;
BEGIN
    INSERT INTO inbox (consumer, event_id)
    SELECT inbox_write.consumer, id FROM unnest(ids) AS id
    ORDER BY id;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END
$$;

-- Raises serialization_failure (40001) unless `holds`: what the step read
-- changed before its statement ran (`what` says which), and the whole
-- statement is undone, to be read and decided again.
CREATE FUNCTION stale_unless(holds boolean, what text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF holds IS NOT TRUE THEN
        RAISE EXCEPTION 'stale read: %', what USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN true;
END
$$;

-- outbox_write (see its migration), planned once per session.
CREATE OR REPLACE FUNCTION outbox_write(events jsonb) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    written bigint;
BEGIN
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
    ORDER BY row.position;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END
$$;
