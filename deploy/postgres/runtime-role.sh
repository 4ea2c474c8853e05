#!/bin/sh
# The service's runtime role, made when the database is first initialised
# (docker-entrypoint-initdb.d): it may connect to its own database and, once
# the migration step has granted them, read and write rows; nothing else.
# POSTGRES_USER owns the schema and is what the migration step runs as.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE "$RUNTIME_USER" LOGIN PASSWORD '$RUNTIME_PASSWORD';
REVOKE ALL ON DATABASE "$POSTGRES_DB" FROM PUBLIC;
GRANT CONNECT ON DATABASE "$POSTGRES_DB" TO "$RUNTIME_USER";
SQL
