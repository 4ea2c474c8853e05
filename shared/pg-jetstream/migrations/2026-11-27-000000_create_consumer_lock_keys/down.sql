DROP FUNCTION consumer_lock_keys(BIGINT[]);
