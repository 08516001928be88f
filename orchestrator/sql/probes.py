"""The replication lag probes: one way to read lag, for the throttle, the cutover's gate and
the Citus workers (read through the coordinator). Catalog reads only; no identifiers."""

from __future__ import annotations

__all__ = ["REPLICA_LAG_SQL", "PRIMARY_LAG_SQL", "WORKER_SIGNALS_SQL"]

# On a standby: the age of the last replayed commit while WAL is received but not yet
# replayed, else 0 (nothing to replay: the age of an old commit is not lag).
REPLICA_LAG_SQL = (
    "SELECT CASE WHEN NOT pg_is_in_recovery() "
    "  OR pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 "
    "ELSE coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0) END::float8")

# On a primary, without sessions to its standbys: pg_stat_replication. A standby that has
# replayed all WAL counts 0 (the view keeps the last burst's replay_lag).
_WORST_STANDBY_LAG = (
    "coalesce(max(CASE WHEN replay_lsn >= pg_catalog.pg_current_wal_lsn() THEN 0 "
    "ELSE coalesce(extract(epoch FROM replay_lag), 0) END), 0)::float8")

# Also the bytes behind and how many standbys there are.
PRIMARY_LAG_SQL = (
    f"SELECT {_WORST_STANDBY_LAG}, "
    "max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint, count(*) FROM pg_stat_replication")

# On every Citus worker (run_command_on_workers returns one text): "<lag s> <slot> <bytes>",
# the worst standby lag as above and the slot that retains the most WAL ("- -" if none).
WORKER_SIGNALS_SQL = (
    f"SELECT (SELECT {_WORST_STANDBY_LAG} FROM pg_catalog.pg_stat_replication)::text"
    " || ' ' || coalesce((SELECT slot_name || ' ' || pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), "
    "restart_lsn)::bigint FROM pg_catalog.pg_replication_slots WHERE restart_lsn IS NOT NULL "
    "ORDER BY pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn) DESC LIMIT 1), '- -')")
