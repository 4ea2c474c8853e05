DROP FUNCTION outbox_write(jsonb);
