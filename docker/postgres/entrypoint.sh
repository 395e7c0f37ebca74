#!/bin/sh
# On first start make the cluster in $PGDATA: superuser $POSTGRES_USER with $POSTGRES_PASSWORD
# (scram-sha-256 from the network, trust only on the local socket) and database $POSTGRES_DB.
# Then run the command (postgres).
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "$POSTGRES_PASSWORD" ]; then
        echo "postgres-entrypoint: set POSTGRES_PASSWORD" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" -E UTF8 \
        --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\";" \
        | postgres --single -D "$PGDATA" -j postgres >/dev/null
fi
exec "$@"
