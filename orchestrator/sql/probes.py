"""The replication lag probes: one way to read lag, for the throttle, the cutover's gate and
the Citus workers (read through the coordinator); then the throttle's other checks (slots,
transaction age, the xmin horizon, the heartbeat). Catalog reads only (and the state
schema's heartbeat, schema-qualified); no identifiers.

The lag probes are text (WORKER_SIGNALS_SQL is sent to the workers as a string); the
throttle's checks, which only ``conn.execute`` runs, are ``SQL`` constants."""

from __future__ import annotations

from orchestrator.sql.compose import SQL

__all__ = ["REPLICA_LAG_SQL", "PRIMARY_LAG_SQL", "WORKER_SIGNALS_SQL", "SLOT_RETAINED_SQL", "OLDEST_XACT_SQL",
           "XMIN_HORIZON_SQL", "ACTIVE_SESSIONS_SQL", "HEARTBEAT_EXISTS_SQL", "HEARTBEAT_LAG_SQL",
           "SINCE_FIRST_BEAT_SQL"]

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

# --- the throttle's other checks (orchestrator/throttle.py) ------------------------------

# The replication slot that retains the most WAL: (slot_name, bytes).
SLOT_RETAINED_SQL = SQL(
    "SELECT slot_name, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained "
    "FROM pg_replication_slots WHERE restart_lsn IS NOT NULL ORDER BY 2 DESC LIMIT 1")

# The oldest open transaction of a client in this database: (pid, application_name, age in
# seconds). Parameter: orchestrate's own backend pids (not counted).
OLDEST_XACT_SQL = SQL(
    "SELECT pid, coalesce(application_name, ''), "
    "extract(epoch FROM clock_timestamp() - xact_start)::float8 "
    "FROM pg_stat_activity WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() "
    "AND datname = current_database() AND backend_type = 'client backend' "
    "AND pid <> ALL (%s::int[]) "
    "ORDER BY xact_start LIMIT 1")

# The server's load, as gh-ost's max-load: sessions of this database running a statement,
# ours excluded (their backend pids). Other roles' state reads NULL without pg_read_all_stats.
ACTIVE_SESSIONS_SQL = SQL(
    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() "
    "AND datname = current_database() AND backend_type = 'client backend' AND pid <> ALL (%s::int[])")

# What holds back vacuum's horizon in this database, oldest first: a session's snapshot (a
# walsender's too: hot_standby_feedback without a slot), a replication slot, a prepared
# transaction. orchestrate's own sessions are short and not counted (parameter: their pids).
XMIN_HORIZON_SQL = SQL("""
SELECT who, age FROM (
  SELECT 'pid ' || pid || coalesce(' (' || nullif(application_name, '') || ')', '') AS who,
         age(backend_xmin) AS age
    FROM pg_stat_activity
   WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()
     AND (datname = current_database() OR backend_type = 'walsender')
     AND pid <> ALL (%s::int[])
  UNION ALL
  SELECT 'replication slot ' || slot_name, greatest(age(xmin), age(catalog_xmin))
    FROM pg_replication_slots WHERE xmin IS NOT NULL OR catalog_xmin IS NOT NULL
  UNION ALL
  SELECT 'prepared transaction ' || gid, age(transaction) FROM pg_prepared_xacts WHERE database = current_database()
) AS horizon ORDER BY age DESC NULLS LAST LIMIT 1""")

# On a replica: has it the heartbeat table yet?
HEARTBEAT_EXISTS_SQL = SQL("SELECT to_regclass('orchestrate.heartbeat') IS NOT NULL")

# On a replica: seconds since its copy of the last beat, or since this run's first beat
# (parameter) if it has not replayed that one yet.
HEARTBEAT_LAG_SQL = SQL(
    "SELECT extract(epoch FROM clock_timestamp() - greatest(max(ts), %s::timestamptz))::float8 "
    "FROM orchestrate.heartbeat WHERE id = 1")

# On a replica without the heartbeat table: seconds since this run's first beat (parameter).
SINCE_FIRST_BEAT_SQL = SQL("SELECT extract(epoch FROM clock_timestamp() - %s::timestamptz)::float8")
