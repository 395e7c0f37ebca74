#!/bin/sh
# Make or upgrade Placement's schema, then run the command (gunicorn). Replicas sharing a database
# start together: a sync that loses the race to create the tables, or finds the database not yet
# up, is tried again (PLACEMENT_DB_SYNC_TRIES times, 2 s apart).
set -e
tries=0
until placement-manage --config-file "$OS_PLACEMENT_CONFIG_DIR/placement.conf" db sync; do
    tries=$((tries + 1))
    if [ "$tries" -ge "${PLACEMENT_DB_SYNC_TRIES:-30}" ]; then
        echo "placement-entrypoint: db sync failed $tries times" >&2
        exit 1
    fi
    sleep 2
done
exec "$@"
