-- What a saga step that applies a batch of events in one statement of its
-- own (no BEGIN, no COMMIT: the statement commits by itself) calls from
-- that statement. The step read what it decides on beforehand, without
-- locks; its statement writes the change only if what it read still holds,
-- the events' inbox rows and the events it emits, all or nothing.

-- The inbox rows of `ids` for `consumer`, every one new: an event recorded
-- already (a redelivery, or a copy another replica applied meanwhile)
-- raises unique_violation on inbox_pkey, and the whole statement is undone.
-- The rows go in in id order (see the consumer's batches).
CREATE FUNCTION inbox_write(consumer text, ids uuid[]) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    WITH written AS (
        INSERT INTO inbox (consumer, event_id)
        SELECT consumer, id FROM unnest(ids) AS id
        ORDER BY id
        RETURNING 1)
    SELECT count(*) FROM written
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
