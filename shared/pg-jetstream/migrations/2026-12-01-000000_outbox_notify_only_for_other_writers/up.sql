-- A writer whose own process runs a relay wakes that relay in-process after
-- its commit (`Outbox::committed`); its pool's sessions say so with
-- `pg_jetstream.wakes_own_relay = on`. For those writers a notification would only
-- wake the relay a second time for rows it is already publishing, and cost
-- the commit the notification queue's lock and the listening backend a
-- wake-up. Everyone else (a process without a relay, an operator's SQL)
-- still notifies.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
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
