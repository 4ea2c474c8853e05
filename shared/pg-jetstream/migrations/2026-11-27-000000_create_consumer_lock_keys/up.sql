-- A consumer's batch locks what its events name before any handler runs:
-- one transaction-level advisory lock per key, taken in the order given
-- (ascending, so that two batches never wait on each other crosswise).
-- A function, so that the client prepares the statement once and the locks
-- cost one round trip.
CREATE FUNCTION consumer_lock_keys(keys BIGINT[]) RETURNS INT
    LANGUAGE sql VOLATILE AS $$
    SELECT count(pg_advisory_xact_lock(key))::INT FROM unnest(keys) AS key
$$;
