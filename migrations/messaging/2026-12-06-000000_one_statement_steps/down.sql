DROP FUNCTION stale_unless(boolean, text);
DROP FUNCTION inbox_write(text, uuid[]);
