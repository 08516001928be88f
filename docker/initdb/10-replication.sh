#!/usr/bin/env bash
# Runs once, on the primary's first start (an empty data directory), from
# /docker-entrypoint-initdb.d of the postgres image: creates the replication role
# the replica clones and streams with, and lets it connect for replication.
set -euo pipefail

: "${REPLICATION_USER:=replicator}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     --set=repl_user="$REPLICATION_USER" --set=repl_password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"repl_user" WITH REPLICATION LOGIN PASSWORD :'repl_password';
SQL

# The image's pg_hba.conf lets "all" databases in over the network, but the keyword
# "all" does not cover replication connections: allow them for this role.
echo "host replication ${REPLICATION_USER} all scram-sha-256" >> "$PGDATA/pg_hba.conf"
