#!/usr/bin/env bash
# Entrypoint of the `replica` service: a hot standby of `primary`.
#
# On a first start (empty data directory) it clones the primary with
# pg_basebackup -R, which also writes primary_conninfo and standby.signal; on every
# start it then runs postgres, which comes up as a streaming hot standby.
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
: "${PRIMARY_HOST:=primary}"
: "${PRIMARY_PORT:=5432}"
: "${REPLICATION_USER:=replicator}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}"

# Started as root (the image's default): fix the data directory's owner, drop to postgres.
if [ "$(id -u)" = "0" ]; then
    mkdir -p "$PGDATA"
    chown -R postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    exec gosu postgres bash "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "$(ls -A "$PGDATA")" ]; then
        echo "standby: $PGDATA is neither empty nor a data directory; refusing to clone into it" >&2
        exit 1
    fi
    echo "standby: waiting for ${PRIMARY_HOST}:${PRIMARY_PORT}"
    until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do sleep 1; done
    echo "standby: cloning ${PRIMARY_HOST}:${PRIMARY_PORT} with pg_basebackup"
    # The password goes in the connection string so that -R records it in
    # primary_conninfo, which the standby reconnects with.
    pg_basebackup \
        --dbname="host=${PRIMARY_HOST} port=${PRIMARY_PORT} user=${REPLICATION_USER} password=${REPLICATION_PASSWORD} application_name=replica" \
        --pgdata="$PGDATA" \
        --write-recovery-conf \
        --wal-method=stream \
        --checkpoint=fast \
        --progress
    chmod 700 "$PGDATA"
fi

exec postgres -c hot_standby=on "$@"
